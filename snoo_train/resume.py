"""What a resumed run may change, and making the changes happen.

A checkpoint records the config it was written with. On resume the run's own config is compared
key by key with it:

* **structural** keys (the optimizer, the data and its order, the global batch, replicas) cannot
  change: the saved state would not mean what the new config says. The resume is refused, naming
  each key (the model's shape is checked against the checkpoint's tensors by the trainer too).
  One exception: a DiLoCo run may resume with another `parallel.replicas` when each replica
  keeps its batch (trainer.batch_size scaled with it): replica_change_refusal;
* every other key is a **hyper-parameter**: the new value applies from the resumed step on, and
  one warning line per key says old -> new. Optimizer hyper-parameters live in the optimizer's
  param groups, which loading the checkpoint restores, so they are written back from the
  freshly built optimizer afterwards; a new peak learning rate (or a new schedule) rebases the
  LR schedule, so the next step's lr is new_peak x schedule(step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Keys whose change makes the saved state meaningless, with the reason given to the user.
STRUCTURAL = {
    "optim.name": "a different optimizer",
    "optim.inner": "a different inner optimizer",
    "optim.outer": "a different outer optimizer",
    "optim.muon_categories": "other parameters under Muon (other optimizer state)",
    "optim.gpa_mu_y": "GPA's parameters hold the mu_y point, which would change meaning",
    "optim.fragments": "another split into fragments (each fragment's slow weights and any sync in flight "
    "belong to the old fragments' outer steps)",
    "trainer.seed": "another data order and initialisation",
    "trainer.batch_size": "another data order (the loader's position counts global batches)",
    # Changed under DiLoCo's elastic rule (replica_change_refusal), it is applied with the batch.
    "parallel.replicas": "another layout of per-replica state",
}
STRUCTURAL_PREFIXES = {"data.": "other data or another data order"}
STRUCTURAL_EXEMPT = {"data.cache_dir"}  # where tokens are cached, not what they are
# Not compared: the model (checked against the checkpoint itself), where things are written,
# how a run is resumed or displayed, how batches reach the device, and the layout within a
# replica (tensor, expert and pipeline parallelism: DCP reshards every DTensor, optimizer state
# included, onto the new layout; pipeline stages keep the whole model's names).
IGNORED_PREFIXES = ("model.", "logging.", "checkpoint.", "trainer.profile.")
IGNORED = {
    "run_dir", "trainer.resume", "trainer.archive_previous_run", "trainer.progress", "trainer.preemption_check_interval",
    "parallel.tp", "parallel.ep",
    "parallel.pp", "parallel.pp_schedule", "parallel.pp_microbatches", "parallel.pp_layers_per_stage",
    # How batches reach the device, not which: the same batches in the same order either way.
    "data.prefetch", "data.pin_memory",
}  # fmt: skip

# Optimizer hyper-parameters: config key -> the param-group keys that hold it. optim.lr and
# optim.muon_lr are the schedule's peaks and are rebased through the scheduler instead.
PARAM_GROUP_KEYS = {
    "optim.betas": ("betas",),
    "optim.eps": ("eps",),
    "optim.weight_decay": ("weight_decay",),
    "optim.k": ("snoo_k",),
    "optim.outer_lr": ("snoo_lr",),
    "optim.outer_momentum": ("snoo_momentum",),
    "optim.nesterov": ("snoo_nesterov",),
    "optim.gpa_mu_x": ("gpa_mu_x",),
    "optim.ema_gamma": ("ema_gamma",),
    "optim.ema_beta": ("ema_beta",),
    "optim.ema_beta_follows_lr": ("ema_beta_follows_lr",),
    "optim.muon_momentum": ("momentum",),
    "optim.ns_steps": ("ns_steps",),
    "optim.muon_period": ("period",),
}
# optim.outer_quant and optim.error_feedback are SNOO's constructor arguments, applied by building
# the optimizer from this run's config; residuals a checkpoint lacks start at zero (trainer/state.py).
LR_KEYS = {"optim.lr", "optim.muon_lr"}
SCHEDULE_KEYS = {
    "trainer.max_steps",
    "trainer.warmup_steps",
    "trainer.lr_schedule",
    "trainer.min_lr_ratio",
    "trainer.decay_fraction",
}


@dataclass
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def replica_change_refusal(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why a resume cannot change parallel.replicas (flat configs), or None: an elastic DiLoCo
    resume, where each replica keeps its batch and its data stream (docs/checkpoints.md)."""
    r0, r1 = old["parallel.replicas"], new["parallel.replicas"]
    b0, b1 = old["trainer.batch_size"], new["trainer.batch_size"]
    if new.get("optim.outer") != "snoo":
        return f"optim.outer={new.get('optim.outer')!r}: only DiLoCo (optim.outer=snoo) resumes with another replica count"
    if new.get("data.streaming"):
        return "streaming data: each rank's position in its share of the stream is saved for its rank only"
    if not new.get("data.path") and len(new.get("data.paths") or ()) > 1:
        return "a mixture of stores (data.paths) draws its stores per global batch, not per replica"
    if b0 % r0 or b1 * r0 != b0 * r1:
        return (
            f"each replica keeps its batch of trainer.batch_size / parallel.replicas = {b0} / {r0} windows "
            f"and its data stream: resume with trainer.batch_size={b0 * r1 // r0 if b0 % r0 == 0 else '?'}"
        )
    return None


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[Change]]:
    """(refusals, hyper-parameter changes) between a checkpoint's config and this run's, both as
    plain nested dicts. A key the checkpoint does not record (an older release) is not compared.
    A replica count changed under replica_change_refusal's rule is a change, with the batch."""
    old, new = flatten(saved), flatten(current)
    replicas_reason, elastic = None, set()
    if "parallel.replicas" in old and "parallel.replicas" in new and old["parallel.replicas"] != new["parallel.replicas"]:
        replicas_reason = replica_change_refusal(old, new)
        elastic = {"parallel.replicas", "trainer.batch_size"} if replicas_reason is None else set()
    refusals, changes = [], []
    for key in sorted(new):
        if key not in old or old[key] == new[key] or key in IGNORED or key.startswith(IGNORED_PREFIXES):
            continue
        if key in elastic:
            changes.append(Change(key, old[key], new[key]))
            continue
        reason = replicas_reason if key == "parallel.replicas" else STRUCTURAL.get(key)
        if reason is None and key not in STRUCTURAL_EXEMPT:
            reason = next((r for p, r in STRUCTURAL_PREFIXES.items() if key.startswith(p)), None)
        if reason is not None:
            refusals.append(f"{key}={old[key]!r} (this run: {new[key]!r}; {reason})")
        else:
            changes.append(Change(key, old[key], new[key]))
    return refusals, changes


def param_group_hyperparameters(optimizer: Any) -> list[dict[str, Any]]:
    """A copy of every param group's values except its parameters: taken from the optimizer as
    built from this run's config, before the checkpoint overwrites them."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def apply_changes(changes: list[Change], optimizer: Any, scheduler: Any, fresh: list[dict[str, Any]]) -> None:
    """Make each change take effect on the loaded optimizer and scheduler. `fresh`: the param
    groups as this run's config built them (param_group_hyperparameters before loading)."""
    keys = {c.key for c in changes}
    groups = optimizer.param_groups
    for key in keys & PARAM_GROUP_KEYS.keys():
        for group, built in zip(groups, fresh, strict=True):
            for name in PARAM_GROUP_KEYS[key]:
                if name in built:
                    group[name] = built[name]
    if keys & LR_KEYS:
        # The new peak of each group, as the scheduler recorded it when it was built (the muon
        # groups' peak is optim.muon_lr, the others' optim.lr).
        scheduler.base_lrs = [built["initial_lr"] for built in fresh]
        for group, built in zip(groups, fresh, strict=True):
            group["initial_lr"] = built["initial_lr"]
    if keys & (LR_KEYS | SCHEDULE_KEYS):
        # The schedule's multipliers were built from this run's config; the loaded lr was the
        # old schedule's. The next step must already use the new one.
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
