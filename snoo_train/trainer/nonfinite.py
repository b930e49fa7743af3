"""What a step whose loss or gradient norm is not finite does (trainer.nonfinite), decided on
the device so that the loop never waits for it: `NonFinitePolicy` tallies bad steps on the device
and reads the tally at log steps and before checkpoints; `SkipMask` makes a bad step a no-op for
the weights and the optimizer state (trainer.nonfinite=skip)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from snoo_train.dist import all_gather_floats, on_every_rank

log = logging.getLogger("snoo_train")


class TrainingDiverged(RuntimeError):
    """The training loss or gradient norm became NaN or infinite."""


class NonFinitePolicy:
    """trainer.nonfinite, decided on the device and enforced on the host at checks.

    `record(step, loss, grad_norm)` runs every step: it returns the device flag ok (loss and
    norm finite) and tallies the non-finite steps on the device; under skip, `record_skip` tallies
    the steps that were not applied. `check(step)` reads the tallies (one host sync); the loop
    calls it at log steps and at the end, the checkpoint before every save, so nothing
    non-finite is published:

    * `stop`: raises TrainingDiverged naming the first non-finite step, its cause and the range
      of bad steps since the last check. The steps in between were applied (their weights are not
      finite); the run stops before it saves or logs any of them.
    * `skip`: the bad steps were masked on the device (SkipMask); raises once more than
      trainer.nonfinite_max_skips steps in a row were skipped, otherwise warns.

    The flag covers the ranks that average one loss and one gradient norm: every rank, or one
    replica under DiLoCo (`replicas` > 1), where each replica decides its inner steps alone and
    nothing crosses replicas between outer steps. There `check` merges every replica's tallies
    (one gather on the control group, at a step that syncs anyway), so every rank raises the
    same error or reports the same counts; and SNOO's outer step carries each replica's flag in
    its all-reduce (`outer_step_flag`), so an outer step is taken by every replica or by none:
    a non-finite step on any replica at an outer step drops that step (inner and outer) on
    every replica under skip; under stop any non-finite step since the last check drops every
    outer step until the check stops the run. `skipped_steps` then counts replica steps: a step
    skipped by r replicas counts r times.

    `skipped_steps` and `consecutive_skips` are host values as of the last check, the same on
    every rank; they are part of a checkpoint (which always checks first, so they are exact)."""

    def __init__(self, trainer_cfg, optim_cfg, *, replicas: int = 1):
        self.t, self.o = trainer_cfg, optim_cfg
        self.replicas = replicas
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._tally: dict[str, torch.Tensor] | None = None

    def _new_tally(self, device: torch.device) -> dict[str, torch.Tensor]:
        # torch.full fills on the device: a host value copied over would be a sync on CUDA.
        def full(value: float) -> torch.Tensor:
            return torch.full((), value, dtype=torch.float64, device=device)

        run = full(self.consecutive_skips)
        return {
            "bad": full(0), "first": full(0), "last": full(0), "first_loss": full(0), "first_norm": full(0),
            "skipped": full(0), "run": run, "longest_run": run.clone(),
        }  # fmt: skip

    def _tally_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._tally is None:
            self._tally = self._new_tally(device)
        return self._tally

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """The device flag "this step is finite"; tallies a bad one (device ops only)."""
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
        t, bad = self._tally_on(loss.device), (~ok).to(torch.float64)
        first = bad * (t["bad"] == 0)  # 1 on the first bad step since the last check
        t["first"] += first * step
        t["first_loss"] = torch.where(first > 0, loss.to(torch.float64), t["first_loss"])
        t["first_norm"] = torch.where(first > 0, grad_norm.to(torch.float64), t["first_norm"])
        t["last"] = torch.where(ok, t["last"], float(step))
        t["bad"] += bad
        return ok

    def record_skip(self, skipped: torch.Tensor) -> None:
        """trainer.nonfinite=skip: whether this step was left unapplied (its own flag, or, at an
        outer step under DiLoCo, another replica's)."""
        t, skipped = self._tally_on(skipped.device), skipped.to(torch.float64)
        t["skipped"] += skipped
        t["run"] = (t["run"] + 1) * skipped  # skipped steps in a row
        t["longest_run"] = torch.maximum(t["longest_run"], t["run"])

    def outer_step_flag(self, ok: torch.Tensor) -> torch.Tensor:
        """Whether this replica's fast weights are finite after this step (a device bool, for
        SNOO.guard_outer_step): under skip a bad step is undone, so only this step's flag counts;
        under stop every bad step since the last check left its mark in the weights."""
        if self.t.nonfinite == "skip":
            return ok
        return self._tally["bad"] == 0

    def check(self, step: int) -> None:
        """Read the tallies since the last check (a host sync), merged over the replicas, and
        apply the policy: the same decision on every rank."""
        if self._tally is None:
            return
        names = list(self._tally)
        rows = [torch.stack([self._tally[k] for k in names]).tolist()]
        self._tally = None
        if self.replicas > 1:
            rows = replica_rows(rows[0], self.replicas)
        per_replica = [dict(zip(names, row)) for row in rows]
        self.consecutive_skips = int(max(v["run"] for v in per_replica))
        skipped = int(sum(v["skipped"] for v in per_replica))
        bad = int(sum(v["bad"] for v in per_replica))
        if not bad:
            return
        # The first non-finite step of any replica names the cause (the lowest replica on a tie).
        replica = min((v["first"], r) for r, v in enumerate(per_replica) if v["bad"])[1]
        values = per_replica[replica]
        first = int(values["first"])
        last = int(max(v["last"] for v in per_replica if v["bad"]))
        loss, norm = values["first_loss"], values["first_norm"]
        what = f"training loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
        where = f"at step {first}" + (f" on replica {replica}" if self.replicas > 1 else "")
        if bad > 1:
            where += f" ({bad} non-finite {'replica steps' if self.replicas > 1 else 'steps'} in steps {first}-{last})"
        if self.t.nonfinite == "skip":
            self._skipped(skipped, int(max(v["longest_run"] for v in per_replica)), what, where)
        else:
            self._stop(what, where, step)

    def _skipped(self, skipped: int, longest_run: int, what: str, where: str) -> None:
        self.skipped_steps += skipped
        limit = self.t.nonfinite_max_skips
        if longest_run > limit:
            raise on_every_rank(TrainingDiverged(
                f"{what} {where}: {longest_run} non-finite steps in a row, more than "
                f"trainer.nonfinite_max_skips={limit}; lower optim.lr (now {self.o.lr})"
            ))  # fmt: skip
        log.warning("%s %s: skipped (%d skipped in all)", what, where, self.skipped_steps)

    def _stop(self, what: str, where: str, step: int) -> None:
        hint = " or set trainer.grad_clip (now 0)" if not self.t.grad_clip else ""
        if self.o.outer == "snoo":
            hint += f", or lower optim.outer_lr (now {self.o.outer_lr})"
        raise on_every_rank(TrainingDiverged(
            f"{what} {where}, found at step {step}; lower optim.lr (now {self.o.lr}){hint}, or set "
            "trainer.nonfinite=skip (no checkpoint holds a non-finite step)"
        ))  # fmt: skip


def replica_rows(row: list[float], replicas: int) -> list[list[float]]:
    """Every replica's tally row, on every rank: one gather of host values over the control
    group, then the row of each replica's first rank (the ranks of a replica hold the same)."""
    rows = all_gather_floats(row)
    per_replica = len(rows) // replicas
    return [rows[r * per_replica] for r in range(replicas)]


def _host_counter(t: torch.Tensor) -> bool:
    """A 0-d tensor on the CPU: an optimizer step counter that torch keeps on the host by design
    (AdamW's non-capturable `step`, Muon's), read by its step() with .item() at no device cost."""
    return t.ndim == 0 and t.device.type == "cpu"


class SkipMask:
    """trainer.nonfinite=skip without a host sync: the optimizer step runs every step, and when
    the device flag says the step was not finite, every tensor it changed is put back.

    Before the step the parameters and the optimizer state tensors the step may write (local
    shards) are copied into a persistent snapshot; after it `torch.where(ok, new, saved)` keeps
    the new values of a good step bitwise and restores a bad step's bitwise. That works for any
    optimizer (AdamW, Muon, SNOO, Lookahead, GPA, EMA-Nesterov, schedule-free) without touching
    its math. An outer wrapper that can drop its own outer step on the device (SNOO:
    `guard_outer_step`, the guard DiLoCo uses) is handed the flag instead, and the state it keeps
    bitwise on a dropped step (`guarded_state_keys`: SNOO's slow weights and momentum, written
    only at outer steps) stays out of the snapshot; after the step it is told which steps stood
    (`masked_step`), so that it never takes fast weights put back by the mask for its slow ones.

    Why `torch.where`, one per tensor: no foreach op selects bitwise. A blend by multiplication
    (`_foreach_mul_` / `_foreach_lerp_` with the flag as a weight) keeps a NaN (NaN * 0 = NaN), and
    the exact integer blend on bit views needs 7 passes over the memory instead of where's 3. The
    flag is moved once per device per step.

    Cost: memory for one more copy of the parameters and of the inner optimizer's device state
    (AdamW: 3 x parameters, per rank, sharded like them; SNOO(AdamW) the same, its outer state
    is guarded), and two passes over that memory per step (the copy and the select),
    bandwidth-bound element-wise work; only with trainer.nonfinite=skip. bench/skip_mask.py
    (llama_small, SNOO(AdamW), 8 x 64 tokens, one CPU thread, the three sides interleaved in one
    process, 2026-12-02): stop 100.4 ms per step, this mask 110.2 (+9.7%, a 3.00 x params
    snapshot), the mask before issue 21 116.2 (+15.7%, 5.00 x params). The shared machine's noise
    moves the overheads by a few points between runs (another run: +3.3% vs +9.2%); the ~6 ms
    per step between the two masks held in both.

    What a skipped step does not undo, because it lives on the host and knowing the flag there
    would need a sync: the LR schedule, the optimizers' step counters (AdamW's and Muon's bias
    correction `step`, fused AdamW's on the device too, SNOO's `snoo_step`, schedule-free's `k` and
    weight sum) and EMA-Nesterov's
    applied beta all advance as if the step had been taken. So an outer step due on a skipped
    step is dropped with it, and the steps after a skip run one position further along the
    schedule. Parameters and device state after a skipped step equal those before it, bitwise.

    The optimizer's first step creates its state, which a snapshot cannot cover: while some
    parameter with a gradient has no state yet, the flag is read on the host (a sync, once per
    run) and a bad step is not taken at all, nor is the LR schedule advanced."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._saved: list[torch.Tensor] = []
        self._guard = getattr(optimizer, "guard_outer_step", None)
        self._guarded = frozenset(getattr(optimizer, "guarded_state_keys", ())) if self._guard else frozenset()

    def _tensors(self) -> list[torch.Tensor]:
        """The parameters and the state tensors a step may change, host counters and the outer
        state the optimizer guards itself left out."""
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                out.append(p)
                state = self.optimizer.state.get(p, {})
                out += [v for k, v in state.items() if k not in self._guarded and _is_masked(v, k)]
        return out

    def _state_missing(self) -> bool:
        state = self.optimizer.state
        return any(
            p.grad is not None and not state.get(p) for group in self.optimizer.param_groups for p in group["params"]
        )

    def step(
        self,
        ok: torch.Tensor,
        *,
        agreed: Callable[[torch.Tensor], torch.Tensor] = lambda ok: ok,
        agree_on_host: Callable[[bool], bool] = lambda ok: ok,
    ) -> tuple[bool, torch.Tensor]:
        """The optimizer step, undone on the device unless it was applied: `agreed(ok)`, asked
        after the step, may narrow the flag (DiLoCo: a step whose outer step another replica
        dropped). Returns (whether the step was taken at all, the device flag "applied").

        Before the optimizer has its state the flag is read on the host and a bad step is not
        taken at all; `agree_on_host` makes that decision the same on every rank whose optimizer
        steps must stay in step (DiLoCo's replicas: a replica one step behind would pair its
        outer all-reduces with the wrong ones)."""
        if self._state_missing():
            # host read: only before the optimizer has made its state
            if not agree_on_host(bool(ok)):
                return False, torch.zeros_like(ok)
            self._step(ok)
            return True, agreed(ok)
        tensors = self._tensors()
        with torch.no_grad():
            self._snapshot([_local(t) for t in tensors])
        self._step(ok)
        applied = agreed(ok)
        after = self._tensors()
        if len(after) != len(tensors) or any(a is not b for a, b in zip(after, tensors)):
            raise RuntimeError(
                f"{type(self.optimizer).__name__}.step() replaced or added state tensors after its first step; "
                "trainer.nonfinite=skip cannot mask such a step (use trainer.nonfinite=stop)"
            )
        with torch.no_grad():
            self._restore_if_bad([_local(t) for t in tensors], applied)
        if self._guard is not None:
            self.optimizer.masked_step(applied)
        return True, applied

    def _step(self, ok: torch.Tensor) -> None:
        if self._guard is not None:
            self._guard(ok)  # a bad step's outer step is dropped by the wrapper, on the device
        self.optimizer.step()

    def _snapshot(self, tensors: list[torch.Tensor]) -> None:
        if [(s.shape, s.dtype, s.device) for s in self._saved] != [(t.shape, t.dtype, t.device) for t in tensors]:
            self._saved = [t.clone() for t in tensors]
        else:
            torch._foreach_copy_(self._saved, tensors)

    def _restore_if_bad(self, tensors: list[torch.Tensor], ok: torch.Tensor) -> None:
        # The flag once per device (state kept on another device, optim.outer_state_device=cpu,
        # needs it there: one device-to-host copy per step, not one per tensor).
        flags = {device: ok.to(device) for device in {t.device for t in tensors}}
        for t, saved in zip(tensors, self._saved):
            torch.where(flags[t.device], t, saved, out=t)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _is_masked(v: Any, key: str = "") -> bool:
    # A 0-d `step` is a step counter wherever it lives: fused AdamW keeps its counters on the
    # device, and they advance on a skipped step like the host ones (one behaviour on every
    # device, and no two extra kernels per parameter per step).
    if not isinstance(v, torch.Tensor) or (key == "step" and v.ndim == 0):
        return False
    return not _host_counter(_local(v))
