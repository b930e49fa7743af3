"""From `optim.*` config to an optimizer: a registry of inner optimizers and outer wrappers.

    inner (optim.inner)    adamw | muon | schedule_free_adamw
    outer (optim.outer)    none | snoo | gpa | ema_nesterov

Adding an optimizer is one `build` function and one registry entry here (plus its YAML in
`snoo_train/configs/groups/optim/`); the trainer, the checkpoints and export only ever call
`build_optimizer`. The config's value checks read their choices from the same registry.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from snoo_train.optim.ema_nesterov import EMANesterov
from snoo_train.optim.gpa import GPA
from snoo_train.optim.kernels import keep_kernel_after_load, kernel_flags
from snoo_train.optim.muon import Muon, muon_param_groups
from snoo_train.optim.snoo import SNOO


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, biases and the token embedding (and with it a tied LM head)
    keep weight_decay=0, the usual choice for transformers."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# -- inner optimizers: (model, optim config) -> torch.optim.Optimizer ------------------------------


def build_adamw(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """torch's AdamW with the kernel optim.implementation asks for (optim/kernels.py), kept
    when a checkpoint written with another kernel is loaded."""
    groups = weight_decay_groups(model, cfg.weight_decay)
    flags = kernel_flags((p for g in groups for p in g["params"]), cfg.implementation)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **flags)
    keep_kernel_after_load(optimizer, flags)
    return optimizer


def build_muon(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Muon takes the parameter categories in optim.muon_categories at optim.muon_lr; the rest
    (embedding, head, norms, router) get its AdamW rule at optim.lr."""
    groups = muon_param_groups(
        model,
        muon_categories=cfg.muon_categories,
        lr=cfg.muon_lr,
        adamw_lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    return Muon(
        groups,
        momentum=cfg.muon_momentum,
        ns_steps=cfg.ns_steps,
        period=cfg.muon_period,
        adamw_betas=tuple(cfg.betas),
        adamw_eps=cfg.eps,
        adamw_implementation=cfg.implementation,
    )


def build_schedule_free_adamw(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Stands alone (it averages its iterates itself); its warm-up is the trainer's constant
    schedule's (the same (k + 1) / warmup formula). The package has foreach and per-parameter
    kernels only: optim.implementation=fused is refused (config.py), auto is its default, foreach."""
    from snoo_train.optim.schedule_free import ScheduleFreeAdamW

    flags = {"foreach": cfg.implementation != "forloop"}
    optimizer = ScheduleFreeAdamW(
        weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **flags
    )
    keep_kernel_after_load(optimizer, flags)
    return optimizer


INNER: dict[str, Callable[[nn.Module, Any], torch.optim.Optimizer]] = {
    "adamw": build_adamw,
    "muon": build_muon,
    "schedule_free_adamw": build_schedule_free_adamw,
}


# -- outer wrappers: (inner optimizer, optim config, replicate group, model) -> wrapper -------------

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_fragments(model: nn.Module, n: int) -> list[list[torch.Tensor]]:
    """The trainable parameters in `n` fragments of contiguous layers (`layers.<i>.` in the
    parameter's name; layer j of L goes to fragment j * n // L, so sizes differ by one at most).
    Parameters outside the layers join the nearest end: the token embedding (and with it a tied
    head) fragment 0, the others (final norm, head) fragment n - 1. With a `config` naming
    `num_hidden_layers`, L is the whole model's: a pipeline stage cuts the same fragments."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    layer_of = [int(m.group(1)) if (m := _LAYER.search(name)) else None for name, _ in named]
    # The whole model's layer count: a pipeline stage holds some of them and must cut the same
    # fragments as every other stage (and as one process).
    total = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    layers = range(total) if total else sorted({layer for layer in layer_of if layer is not None})
    if len(layers) < n:
        raise ValueError(f"fragments={n} needs at least as many layers; the model has {len(layers)}")
    index = {layer: j * n // len(layers) for j, layer in enumerate(layers)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    fragments: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for (_, p), layer in zip(named, layer_of):
        fragments[index[layer] if layer is not None else (0 if id(p) in embeddings else n - 1)].append(p)
    return fragments


def build_snoo(
    inner: torch.optim.Optimizer, cfg, replicate_group=None, model: nn.Module | None = None, pp: int = 1
) -> torch.optim.Optimizer:
    # replicate_group (DiLoCo, parallel.replicas > 1): SNOO averages the pseudo-gradient over
    # the replicas at each outer step. optim.fragments > 1 splits the model by layer (streaming).
    fragments = None
    if cfg.fragments > 1:
        if model is None:
            raise ValueError("optim.fragments > 1 needs the model, to split its parameters by layer")
        fragments = layer_fragments(model, cfg.fragments)
    return SNOO(
        inner, k=cfg.k, lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=cfg.nesterov,
        replicate_group=replicate_group,
        reduce_dtype=torch.bfloat16 if cfg.outer_reduce_dtype == "bf16" else None,
        state_device="cpu" if cfg.outer_state_device == "cpu" else None,
        outer_quant=None if cfg.outer_quant == "none" or replicate_group is None else cfg.outer_quant,
        error_feedback=cfg.error_feedback and cfg.outer_quant != "none" and replicate_group is not None,
        fragments=fragments, sync_delay=cfg.sync_delay, pp=pp,
    )  # fmt: skip


def build_gpa(inner: torch.optim.Optimizer, cfg, replicate_group=None, model=None, pp=1) -> torch.optim.Optimizer:
    return GPA(inner, mu_x=cfg.gpa_mu_x, mu_y=cfg.gpa_mu_y)


def build_ema_nesterov(inner: torch.optim.Optimizer, cfg, replicate_group=None, model=None, pp=1) -> torch.optim.Optimizer:
    return EMANesterov(inner, gamma=cfg.ema_gamma, beta=cfg.ema_beta, beta_follows_lr=cfg.ema_beta_follows_lr)


OUTER: dict[str, Callable[..., torch.optim.Optimizer] | None] = {
    "none": None,
    "snoo": build_snoo,
    "gpa": build_gpa,
    "ema_nesterov": build_ema_nesterov,
}


def build_optimizer(model: nn.Module, cfg, *, replicate_group=None, pp: int = 1) -> torch.optim.Optimizer:
    """The inner optimizer `optim.inner` on the fast weights, wrapped by `optim.outer` (`pp`:
    the pipeline-parallel size, for SNOO's norms)."""
    inner = INNER[cfg.inner](model, cfg)
    outer = OUTER[cfg.outer]
    return inner if outer is None else outer(inner, cfg, replicate_group, model, pp)
