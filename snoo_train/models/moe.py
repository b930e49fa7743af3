"""Llama-style mixture-of-experts models: transformers' Mixtral classes, built from a ModelConfig.

Why Mixtral (not Qwen3-MoE or OLMoE): its attention, norms, rotary embedding and SwiGLU experts
are exactly Llama's, so the dense model's init, rotary reset and FSDP layout carry over and an
MoE preset differs from a dense one only in the feed-forward block. Qwen3-MoE and OLMoE add
QK-norm (and OLMoE drops the top-k renormalisation), which would mix two changes in every
dense-vs-MoE comparison.

Experts are 3-D parameters (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]),
run by transformers' experts kernels: `grouped_mm` (one grouped GEMM per projection, no loop
over experts) on CUDA and CPU when the widths are aligned for it, else the per-expert `eager`
loop (correct everywhere); see `experts_implementation`.

The router's load-balancing loss (Switch Transformer, transformers' `load_balancing_loss_func`)
comes back as `outputs.aux_loss` when the forward is asked for router logits; `RouterStats`
adds it to the training loss with `router_aux_loss_coef` and keeps per-layer expert load for
the metrics file.
"""

from __future__ import annotations

import torch
from transformers import MixtralConfig

from snoo_train.config import ModelConfig
from snoo_train.models.decoder import decoder_config_kwargs

EXPERTS_IMPLEMENTATIONS = ("auto", "grouped_mm", "batched_mm", "eager")


def moe_intermediate_size(cfg: ModelConfig) -> int:
    """Width of one expert's SwiGLU (falls back to the dense `intermediate_size`)."""
    return cfg.moe_intermediate_size or cfg.intermediate_size


def experts_implementation(cfg: ModelConfig) -> str:
    """`auto`: grouped_mm where its kernels accept the shapes, else the per-expert `eager` loop.

    torch's grouped GEMM (CUDA, and CPU in torch >= 2.10) needs 16-byte aligned strides, i.e.
    hidden and expert widths that are multiples of 8 in bf16 (4 in fp32); transformers does not
    check this and the kernel raises otherwise. On CPU, moe_small measured grouped_mm ~10%
    faster than eager and `batched_mm` (which materialises every selected expert's weights
    per token) ~25x slower, so batched_mm is never picked automatically.
    """
    if cfg.experts_implementation != "auto":
        return cfg.experts_implementation
    aligned = cfg.hidden_size % 8 == 0 and moe_intermediate_size(cfg) % 8 == 0
    return "grouped_mm" if aligned else "eager"


def mixtral_config(cfg: ModelConfig, vocab_size: int) -> MixtralConfig:
    """The transformers config for an MoE `cfg`; `vocab_size` is the tokenizer's (padded)."""
    return MixtralConfig(
        vocab_size=vocab_size,
        intermediate_size=moe_intermediate_size(cfg),
        **decoder_config_kwargs(cfg),
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        # The training loop asks for router logits itself (training only); evaluation skips them.
        output_router_logits=False,
        router_jitter_noise=0.0,
        sliding_window=None,
        experts_implementation=experts_implementation(cfg),
    )


class RouterStats:
    """Adds the balancing loss to the training loss and accumulates expert load between logs.

    Call `loss(outputs)` once per micro-batch with the outputs of a forward run with
    `output_router_logits=True`; `metrics(...)` at a log step sums the counts over ranks (one
    all-reduce, every rank must call it) and resets them.
    """

    def __init__(self, num_experts: int, top_k: int, coef: float):
        self.num_experts, self.top_k, self.coef = num_experts, top_k, coef
        self._counts: torch.Tensor | None = None  # [layers, experts] token assignments
        self._aux_sum: torch.Tensor | float = 0.0
        self._aux_n = 0

    def loss(self, outputs) -> torch.Tensor:
        """coef x balancing loss (a differentiable scalar); records the unscaled loss and load."""
        aux = outputs.aux_loss
        with torch.no_grad():
            counts = torch.stack(
                [
                    torch.bincount(
                        logits.topk(self.top_k, dim=-1).indices.flatten(),
                        minlength=self.num_experts,
                    ).to(torch.float64)
                    for logits in outputs.router_logits
                ]
            )
            # Kept as tensors: a float() here would sync the GPU on every micro-batch.
            self._counts = counts if self._counts is None else self._counts + counts
            self._aux_sum = self._aux_sum + aux.detach().double()
            self._aux_n += 1
        return self.coef * aux

    def metrics(self, all_reduce_sum) -> dict[str, float]:
        """`moe/aux_loss` (unscaled, mean over ranks and micro-batches), per-layer
        `moe/layer{i}/load` (fraction of routed tokens per expert, summing to 1) and
        `moe/layer{i}/max_over_mean` (1.0 is perfect balance), plus the mean of the latter."""
        if self._counts is None:
            return {}
        flat = [float(self._aux_sum), float(self._aux_n), *self._counts.flatten().tolist()]
        summed = all_reduce_sum(flat)
        aux_sum, aux_n, counts = (
            summed[0],
            summed[1],
            torch.tensor(summed[2:]).view_as(self._counts),
        )
        self._counts, self._aux_sum, self._aux_n = None, 0.0, 0
        fractions = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
        record: dict[str, object] = {"moe/aux_loss": aux_sum / max(aux_n, 1.0)}
        ratios = []
        for i, f in enumerate(fractions):
            ratio = float(f.max() / f.mean())
            ratios.append(ratio)
            record[f"moe/layer{i}/load"] = [round(x, 6) for x in f.tolist()]
            record[f"moe/layer{i}/max_over_mean"] = ratio
        record["moe/max_over_mean"] = sum(ratios) / len(ratios)
        return record
