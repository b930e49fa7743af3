"""Build a model of any family from a ModelConfig, without downloading: a registry of families
(`model.family`: llama, moe), each a transformers class and the config builder for it.

The model is always constructed on the meta device and then materialized, so a 1B model costs
no memory until it has a home, and the single-process and the sharded model are initialized by
the same code: every parameter is drawn on CPU from a generator seeded by (seed, parameter name),
each rank drawing only as far as its own shard and keeping its own elements. The weights
therefore depend on the seed only, not on the device, the layout, the world size, or the order
in which modules were built.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from snoo_train.config import ConfigError, ModelConfig
from snoo_train.models.decoder import padded_vocab_size
from snoo_train.models.llama import llama_config
from snoo_train.models.pretrained import load_pretrained, resolve_pretrained
from snoo_train.models.shard_init import fill_normal_shard, local_indices

# Wrappers that parallelize() may insert into parameter names; the init seed must not see them.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _mixtral(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    # Imported on use: the dense path does not pay for the MoE module's transformers imports.
    from snoo_train.models.moe import build_mixtral

    return build_mixtral(cfg, padded_vocab_size(cfg, vocab_size))


def _llama(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    return LlamaForCausalLM(llama_config(cfg, vocab_size))


# model.family -> (model config, tokenizer vocabulary) -> a transformers model (on the current device)
FAMILIES: dict[str, Callable[[ModelConfig, int], Any]] = {"llama": _llama, "moe": _mixtral}


def build_model(
    cfg: ModelConfig, vocab_size: int, *, seed: int, device: str | torch.device = "cpu"
) -> LlamaForCausalLM:
    """A freshly initialized LlamaForCausalLM (MixtralForCausalLM for family=moe) in fp32.

    `device="meta"` returns the model unmaterialized (no memory): shard it with `parallelize`
    first, then call `materialize(model, device=..., seed=seed)`; the result equals the
    single-process model built with the same seed.
    """
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family={cfg.family!r} is not allowed; choose one of {', '.join(FAMILIES)}")
    with torch.device("meta"):
        model = FAMILIES[cfg.family](cfg, vocab_size)
    if torch.device(device).type != "meta":
        materialize(model, device=device, seed=seed)
    return model


@torch.no_grad()
def materialize(
    model: LlamaForCausalLM, *, device: str | torch.device, seed: int, pretrained: str | None = None
) -> LlamaForCausalLM:
    """Allocate a meta-device (possibly FSDP-sharded) model on `device` and initialize it.

    `to_empty` leaves garbage in every tensor, buffers included: the rotary `inv_freq` is not a
    parameter, so a plain re-init would miss it and the model would train with random position
    frequencies. It also unties a tied head on plain tensors, which is re-tied here. Buffers
    that are not recomputed (the MoE routing bias) start at zero. With `pretrained` (a
    `model.from_pretrained` name) the weights are read from that checkpoint instead of drawn.
    """
    model.to_empty(device=device)
    for buffer in model.buffers():
        buffer.zero_()
    if (
        model.config.tie_word_embeddings
        and model.lm_head.weight is not model.model.embed_tokens.weight
    ):
        model.lm_head.weight = model.model.embed_tokens.weight
    if pretrained:
        load_pretrained(model, resolve_pretrained(pretrained), _canonical_name)
    else:
        init_weights(model, seed=seed)
    reset_rotary(model)
    return model


def _canonical_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _init_std(name: str, cfg: LlamaConfig) -> float:
    # GPT-2 style: the two projections that write into the residual stream are scaled by
    # 1/sqrt(2 * layers) so the residual variance does not grow with depth.
    # (`experts.down_proj` is the MoE experts' 3-D down projection.)
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
        return cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers)
    return cfg.initializer_range


@torch.no_grad()
def init_weights(model: nn.Module, *, seed: int) -> None:
    """Initialize every parameter from a CPU generator seeded by (seed, canonical name).

    Normal(0, std) matrices, ones for norm weights, zeros for biases. A matrix's values are
    those of the full tensor drawn on CPU (`torch.empty(shape).normal_(0, std, generator)`), but
    each rank draws only up to its own shard's rows, in chunks, and keeps its own elements
    (snoo_train/models/shard_init.py): no rank ever holds a full tensor, and all ranks agree
    with a single-process build, bit for bit, without any communication.
    """
    cfg = model.config
    for name, param in model.named_parameters():
        name = _canonical_name(name)
        local = param.to_local() if isinstance(param, DTensor) else param
        if name.endswith("bias"):
            local.zero_()
        elif param.ndim == 1:
            local.fill_(1.0)
        elif (index := local_indices(param)) is not None:
            generator = torch.Generator().manual_seed(
                (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
            )
            fill_normal_shard(local, param.shape, index, _init_std(name, cfg), generator)


@torch.no_grad()
def reset_rotary(model: nn.Module) -> None:
    """Recompute the rotary inverse frequencies (non-persistent buffers, absent from checkpoints)."""
    for module in model.modules():
        if not hasattr(module, "original_inv_freq"):
            continue
        if module.rope_type != "default":
            raise ValueError(
                f"rotary type {module.rope_type!r} is not supported; llama_config builds 'default'"
            )
        inv_freq, scaling = module.compute_default_rope_parameters(module.config)
        module.inv_freq.copy_(inv_freq)
        module.original_inv_freq.copy_(inv_freq)
        module.attention_scaling = scaling
