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

Auxiliary-loss-free balancing (DeepSeek-V3; `model.router_bias_update_rate` > 0) swaps each
router for a `BiasedTopKRouter`: a per-expert bias added to the router's probabilities for the
top-k choice only, nudged after every optimizer step towards the under-loaded experts
(`update_router_bias`). The combine weights and the balancing loss still come from the
unbiased router, so `aux_loss` keeps its meaning and both mechanisms can run together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

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


def build_mixtral(cfg: ModelConfig, vocab_size: int) -> MixtralForCausalLM:
    """The MoE model (on the current default device); biased routers when
    `cfg.router_bias_update_rate` > 0. `vocab_size` is already padded."""
    model = MixtralForCausalLM(mixtral_config(cfg, vocab_size))
    if cfg.router_bias_update_rate > 0:
        for i, layer in enumerate(model.model.layers):
            # Same parameter name (`mlp.gate.weight`), so the seeded init is unchanged.
            layer.mlp.gate = BiasedTopKRouter(model.config, cfg.router_bias_update_rate, layer_index=i)
    return model


def select_experts(probs: torch.Tensor, bias: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Indices of the top-k experts per token: of the probabilities, plus `bias` when given."""
    scores = probs if bias is None else probs + bias
    return scores.topk(top_k, dim=-1).indices


class BiasedTopKRouter(MixtralTopKRouter):
    """Mixtral's router with a routing bias for the choice of experts only (DeepSeek-V3).

    `expert_bias` is a persistent buffer: checkpoints carry it, and `update_router_bias` keeps
    it identical on every rank. `expert_load` counts the tokens routed to each expert in
    training forwards since the last update (not saved: it restarts every step). An activation
    checkpointing recompute counts a micro-batch twice, which scales every expert's load alike
    and so leaves the update (a sign) unchanged.
    """

    def __init__(self, config: MixtralConfig, update_rate: float, layer_index: int = 0):
        super().__init__(config)
        self.update_rate = update_rate
        self.layer_index = layer_index  # in the whole model (a pipeline stage holds some layers)
        self.register_buffer("expert_bias", torch.zeros(self.num_experts), persistent=True)
        self.register_buffer("expert_load", torch.zeros(self.num_experts), persistent=False)

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        probs = torch.softmax(router_logits.float(), dim=-1)
        indices = select_experts(probs, self.expert_bias, self.top_k)
        # The combine weights come from the unbiased probabilities: the bias only steers the choice.
        weights = probs.gather(-1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.training:
            with torch.no_grad():
                ones = torch.ones(indices.numel(), dtype=self.expert_load.dtype, device=indices.device)
                self.expert_load.index_add_(0, indices.flatten(), ones)
        return router_logits, weights, indices


def biased_routers(model: nn.Module) -> list[BiasedTopKRouter]:
    """The model's biased routers in layer order (empty without auxiliary-loss-free balancing)."""
    return [m for m in model.modules() if isinstance(m, BiasedTopKRouter)]


@torch.no_grad()
def update_router_bias(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """After optimizer.step(): bias += rate x sign(mean load - load) per layer, then reset the loads.

    The loads are summed over `group` (default: every rank; ranks that see the same tokens, as
    under TP, only scale the loads, which the sign ignores) in one all-reduce on the device, so
    the host does not wait and every rank applies the same update. Every rank must call it.
    """
    routers = biased_routers(model)
    if not routers:
        return
    loads = torch.stack([r.expert_load for r in routers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads, group=group)
    steps = torch.sign(loads.mean(dim=-1, keepdim=True) - loads)
    for router, step in zip(routers, steps):
        router.expert_bias.add_(step, alpha=router.update_rate)
        router.expert_load.zero_()


def _expert_counts(chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many times each expert was chosen, float64. Not torch.bincount: on CUDA it reads the
    largest index on the host to size its output, a device sync on every micro-batch."""
    counts = torch.zeros(num_experts, dtype=torch.float64, device=chosen.device)
    return counts.index_add_(0, chosen, torch.ones_like(chosen, dtype=torch.float64))


class RouterStats:
    """Adds the balancing loss to the training loss and accumulates expert load between logs.

    Call `loss(outputs)` once per micro-batch with the outputs of a forward run with
    `output_router_logits=True`; `metrics(...)` at a log step sums the counts over ranks (one
    all-reduce, every rank must call it) and resets them. With auxiliary-loss-free balancing
    pass `routers=biased_routers(model)` so the load counts the experts the biased choice took.
    """

    def __init__(
        self, num_experts: int, top_k: int, coef: float, routers: list[BiasedTopKRouter] | None = None,
        *, num_layers: int | None = None,
    ):  # fmt: skip
        """`num_layers` (pipeline parallelism): the whole model's, so that every stage's counts
        have one shape for the all-reduce; each stage fills its own layers' rows (`record`)."""
        self.num_experts, self.top_k, self.coef = num_experts, top_k, coef
        # By whole-model layer index: a pipeline stage holds some layers.
        self.routers = {r.layer_index: r for r in routers} if routers else {}
        self.num_layers = num_layers
        self._counts: torch.Tensor | None = None  # [layers, experts] token assignments
        self._aux_sum: torch.Tensor | float = 0.0
        self._aux_n: float = 0

    def loss(self, outputs) -> torch.Tensor:
        """coef x balancing loss (a differentiable scalar); records the unscaled loss and load."""
        self.record(outputs.aux_loss, outputs.router_logits, list(range(len(outputs.router_logits))))
        return self.coef * outputs.aux_loss

    @torch.no_grad()
    def record(self, aux: torch.Tensor, router_logits, layers: list[int], weight: float = 1.0) -> None:
        """Adds one forward's balancing loss (x `weight`, a pipeline stage's share of the layers)
        and the experts chosen in `layers` (whole-model indices) to the tallies."""
        chosen = [_expert_counts(self._chosen(i, x).flatten(), self.num_experts) for i, x in zip(layers, router_logits)]
        counts = torch.stack(chosen)
        if self.num_layers is not None and layers != list(range(self.num_layers)):
            full = counts.new_zeros(self.num_layers, self.num_experts)
            full[layers] = counts
            counts = full
        # Kept as tensors: a float() here would sync the GPU on every micro-batch.
        self._counts = counts if self._counts is None else self._counts + counts
        self._aux_sum = self._aux_sum + weight * aux.detach().double()
        self._aux_n += weight

    def _chosen(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        if not self.routers:
            return logits.topk(self.top_k, dim=-1).indices
        probs = torch.softmax(logits.float(), dim=-1)
        return select_experts(probs, self.routers[layer].expert_bias, self.top_k)

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
        record: dict[str, object] = {"moe/aux_loss": aux_sum / aux_n if aux_n else 0.0}
        ratios = []
        for i, f in enumerate(fractions):
            ratio = float(f.max() / f.mean())
            ratios.append(ratio)
            record[f"moe/layer{i}/load"] = [round(x, 6) for x in f.tolist()]
            record[f"moe/layer{i}/max_over_mean"] = ratio
        record["moe/max_over_mean"] = sum(ratios) / len(ratios)
        return record
