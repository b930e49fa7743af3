"""SNOO: Step-K Nesterov Outer Optimizer (arXiv 2510.15830).

SNOO wraps any inner optimizer. Every step it lets the inner optimizer move the parameters
(the *fast* weights); every K steps it treats `slow - fast` as a gradient, applies Nesterov
momentum to it, moves the slow weights, and restarts the fast weights from them:

    s = w - p;  b = mu * b + s;  w = w - eta * (s + mu * b)   (w - eta * b without Nesterov);  p <- w

That is `torch.optim.SGD(lr=eta, momentum=mu, nesterov=True)` applied to `w` with gradient `s`
(the tests check it against torch's SGD). The math is written with `torch._foreach_*` on each
parameter's *local* tensor: on any device mesh (FSDP2, TP x FSDP, EP, their N-D mixes) the
slow weights and momentum are DTensors with exactly the parameter's mesh and placements, so the
outer step is purely element-wise on the local shard and issues no collective
(tests/test_optim_meshes.py counts them).

Where things live, so that schedulers, `state_dict()` and distributed checkpointing work
without special code (the pattern of timm's Lookahead):
  * hyper-parameters (`snoo_k`, `snoo_lr`, `snoo_momentum`, `snoo_nesterov`) and the inner-step
    counter (`snoo_step`) in the inner optimizer's param groups;
  * per-parameter tensors (`snoo_slow`, `snoo_momentum`) in the inner optimizer's `state[p]`.
`param_groups`, `state` and `defaults` are properties that always read the inner optimizer, so a
wrapper cannot go stale when `load_state_dict` replaces the inner optimizer's group dicts.

The end of training (`flush()`): when training stops in the middle of a window (max_steps not a
multiple of K) the slow weights would miss the last inner steps, the lowest-learning-rate ones.
`flush()` takes the outer step on that partial window, with the same formula; the trainer calls it
after its last step, so the final evaluation, the last checkpoint and the export hold every step.

Multi-replica DiLoCo (`replicate_group`): R replicas of the model each train on their own data,
each fully sharded over its own ranks, with no communication between replicas during the inner
steps. At an outer step the pseudo-gradient `s` is averaged over the replicas (ONE all-reduce of
this rank's local shards over `replicate_group`, optionally in bf16; or, with `outer_quant`, one
all_gather of quantized shards with error feedback: optim/outer_quant.py) and the same Nesterov
update follows; all replicas then hold identical slow (and fast) weights. Without a group (or with a
one-rank group) SNOO issues no collective at all.

Non-finite training under DiLoCo (`guard_outer_step`): each replica says, as a device bool,
whether its fast weights are finite; the flag rides in the outer all-reduce as one more element,
and if any replica's is False every replica drops that outer step (slow weights and momentum
unchanged, fast weights restarted from them). All replicas take the outer step or none does,
decided on the device, and the slow weights never take in a non-finite pseudo-gradient. The
same guard serves trainer.nonfinite=skip on one replica too: the trainer's SkipMask hands SNOO
its flag and so needs no copy of the slow weights and momentum (`guarded_state_keys`), and
tells SNOO afterwards which steps it undid (`masked_step`).

Streaming DiLoCo (`fragments`, `sync_delay`; docs/parallelism.md): the parameters in F
fragments, fragment i taking its outer step after the inner steps t with t % k == (i + 1) k / F
(mod k); its pseudo-gradient's all-reduce starts there (asynchronous with sync_delay > 0, the
flag in the same buffer) and sync_delay inner steps later the update lands in its slow weights
and its fast weights restart from them. One fragment and no delay is the path above, unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from snoo_train.optim._dtensor import replication_factor as _replication_factor
from snoo_train.optim._dtensor import world_size
from snoo_train.optim._wrapper import InnerWrapper, _local
from snoo_train.optim.outer_quant import CODECS, PendingAverage
from snoo_train.optim.outer_sync import OuterSync
from snoo_train.optim.outer_sync import start as start_sync

try:  # DTensor is public from torch 2.5; keep the optimizer importable without it.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - very old torch
    DTensor = None  # type: ignore[assignment,misc]

SLOW = "snoo_slow"
MOMENTUM = "snoo_momentum"
RESIDUAL = "snoo_residual"  # error feedback: what quantization left out of this replica's sends
# In each param group: the inner-step count at which flush() last took an outer step (0: never),
# so that a flushed window counts as closed (in a checkpoint too) and a second flush is a no-op.
FLUSHED_AT = "snoo_flushed_at"
# Streaming (fragments > 1 or sync_delay > 0), in each param group: the inner step at which the
# sync whose fast-weight restart is still to come started (0: none), and its fragment.
INFLIGHT_START = "snoo_inflight_start"
INFLIGHT_FRAGMENT = "snoo_inflight_fragment"


def _cpu_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A CPU copy of a plain tensor (always a new tensor); with `pin`, page-locked when CUDA is
    present, so that copying it to the device is fast."""
    out = t.detach().to("cpu", copy=True)
    return out.pin_memory() if pin and torch.cuda.is_available() else out


def _check_outer_args(k: Any, lr: float, momentum: float, reduce_dtype: Any, state_device: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not lr > 0.0:
        raise ValueError(f"lr (the outer learning rate) must be > 0, got {lr!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum (the outer momentum) must be in [0, 1), got {momentum!r}")
    if reduce_dtype is not None and not (
        isinstance(reduce_dtype, torch.dtype) and reduce_dtype.is_floating_point
    ):
        raise ValueError(f"reduce_dtype must be None or a floating torch.dtype, got {reduce_dtype!r}")
    if state_device is not None and torch.device(state_device).type != "cpu":
        raise ValueError(f"state_device must be None (the parameter's device) or 'cpu', got {state_device!r}")


def _check_quant(codec: str | None, error_feedback: bool, group: Any, reduce_dtype: torch.dtype | None) -> None:
    if codec is not None and codec not in CODECS:
        raise ValueError(f"outer_quant must be None or one of {sorted(CODECS)}, got {codec!r}")
    if codec is not None and group is None:
        raise ValueError("outer_quant needs a replicate_group: one replica communicates nothing")
    if codec is not None and reduce_dtype is not None:
        raise ValueError("outer_quant and reduce_dtype both set the wire format: pass one")
    if error_feedback and codec is None:
        raise ValueError("error_feedback needs outer_quant: without quantization there is no residual")


def _check_streaming_args(k: int, fragments: list | None, sync_delay: int) -> None:
    if isinstance(sync_delay, bool) or not isinstance(sync_delay, int) or sync_delay < 0:
        raise ValueError(f"sync_delay must be an integer >= 0, got {sync_delay!r}")
    n_fragments = 1 if fragments is None else len(fragments)
    if n_fragments < 1 or k % n_fragments:
        raise ValueError(f"fragments: k={k} must be a multiple of the number of fragments, got {n_fragments}")
    if sync_delay >= k // n_fragments:
        raise ValueError(
            f"sync_delay={sync_delay} must be < k / fragments = {k // n_fragments}: a fragment's sync "
            "must be applied before the next fragment's starts (one sync in flight)"
        )


class SNOO(InnerWrapper):
    """Step-K Nesterov Outer Optimizer around any `torch.optim.Optimizer`.

    Args:
        inner: the optimizer that takes every step (AdamW, Muon, ...). Its learning rate is the
            one LR schedulers act on.
        k: inner steps per outer step.
        lr: outer learning rate eta.
        momentum: outer momentum mu, in [0, 1). `momentum=0` gives Lookahead.
        nesterov: Nesterov momentum on the pseudo-gradient (the paper's choice).
        replicate_group: multi-replica DiLoCo: the process group joining this rank to the ranks
            that hold the same shard in the other replicas (the `replicate` dimension of a
            (replicate, shard) device mesh, `mesh.get_group("replicate")`). The pseudo-gradient
            is averaged over it before every outer step, in one all-reduce of this rank's local
            shards; every rank of the group must hold the same parameter shapes. The model must
            NOT synchronise gradients across replicas (FSDP on the shard dimension only).
            None (the default): one replica, no collective.
        fragments: streaming DiLoCo: the inner optimizer's parameters split into lists (e.g.
            optim.build.layer_fragments), each with its own outer step, k / len(fragments)
            steps apart; len(fragments) must divide k. None: one fragment.
        sync_delay: inner steps between the start of a fragment's all-reduce (async) and its
            update; < k / len(fragments). 0: synchronous.
        reduce_dtype: dtype of that all-reduce (e.g. `torch.bfloat16`: half the bytes; the
            averaged pseudo-gradient is rounded to bf16, the slow weights and momentum stay in
            their own dtype). None: the pseudo-gradient's dtype.
        outer_quant: with `replicate_group`, average quantized pseudo-gradients instead:
            "bf16" | "fp8" | "int8" | "int4" with one absmax scale per 128-element block; every
            replica all_gathers the others' codes and sums them in replica order, so all end
            bitwise equal (snoo_train/optim/outer_quant.py). A non-finite value on any replica
            drops that outer step on every replica, as guard_outer_step does. None: all-reduce.
        error_feedback: with `outer_quant`, keep per parameter the quantization residual e
            (`state[p]["snoo_residual"]`, like the slow weights) and send s + e: what one outer
            step leaves out is sent at the next (e <- s + e - deQ(Q(s + e)); a dropped step
            leaves e as it was).
        state_device: None keeps the slow weights and momentum on the parameter's device;
            "cpu" keeps them in CPU memory (page-locked where CUDA is present), saving
            2 x parameter bytes of accelerator memory at the price of a device-to-host copy of
            the fast weights and a host-to-device copy of the new slow weights at every outer
            step (plus, with `replicate_group`, the pseudo-gradient's trip to the device for the
            all-reduce), and of the outer update running on CPU. They stay DTensors with the
            parameter's mesh and placements (a CPU local tensor, as FSDP2's CPU offload does),
            so state_dict() and distributed checkpointing see the usual layout.

    Example::

        inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        opt = SNOO(inner, k=20, lr=0.7, momentum=0.5)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        inner: Optimizer,
        k: int = 20,
        lr: float = 0.7,
        momentum: float = 0.5,
        nesterov: bool = True,
        *,
        replicate_group: dist.ProcessGroup | None = None,
        reduce_dtype: torch.dtype | None = None,
        state_device: str | torch.device | None = None,
        outer_quant: str | None = None,
        error_feedback: bool = False,
        fragments: list[list[torch.Tensor]] | None = None,
        sync_delay: int = 0,
        pp: int = 1,
    ) -> None:
        _check_outer_args(k, lr, momentum, reduce_dtype, state_device)
        _check_quant(outer_quant, error_feedback, replicate_group, reduce_dtype)
        _check_streaming_args(k, fragments, sync_delay)

        super().__init__(
            inner,
            {
                "snoo_k": k,
                "snoo_lr": float(lr),
                "snoo_momentum": float(momentum),
                "snoo_nesterov": bool(nesterov),
            },
        )
        self.outer_step_taken = False
        # guard_outer_step(): the flag for the coming step(), and the agreed result of its outer step.
        self._finite: torch.Tensor | None = None
        self.outer_step_ok: torch.Tensor | None = None
        # Squared global-norm shares (pseudo-gradient, slow weights) of the last applied outer step.
        self._last_outer_sq: torch.Tensor | None = None
        self.replicate_group = replicate_group
        self.pp = pp  # pipeline stages on other ranks hold other parameters: for the metrics' norms
        self.reduce_dtype = reduce_dtype
        self.outer_quant = outer_quant
        self.error_feedback = bool(error_feedback)
        self.state_device = None if state_device is None else torch.device(state_device)
        self._metrics_device: torch.device | None = None
        # masked_step(): per group whose last outer step a SkipMask may have undone, (the group,
        # the device bool "it stood"); the host counters alone would say fast == slow there.
        self._restarts: dict[int, tuple[dict[str, Any], torch.Tensor]] = {}
        self._last_due: list[dict[str, Any]] = []
        # Streaming DiLoCo (docs/parallelism.md): F fragments, each with its own outer step
        # k / F steps after the previous one's, applied sync_delay inner steps after it started.
        self.sync_delay = sync_delay
        self._fragments = self._check_fragments(fragments)
        self.streaming = len(self._fragments) > 1 or sync_delay > 0
        self._inflight: tuple[int, list[torch.Tensor], OuterSync | PendingAverage] | None = None
        self._fragment_sq: dict[int, torch.Tensor] = {}  # each fragment's last applied norms
        for group in self.param_groups:
            self._init_group(group)  # the streaming keys, now that `streaming` is known

    # -- torch.optim.Optimizer API (the rest is InnerWrapper's) ------------------------------

    def _init_group(self, group: dict[str, Any]) -> None:
        super()._init_group(group)  # snoo_k, snoo_lr, snoo_momentum, snoo_nesterov
        group.setdefault("snoo_step", 0)
        group.setdefault(FLUSHED_AT, 0)  # absent from checkpoints of earlier releases: never flushed
        if getattr(self, "streaming", False):  # set after InnerWrapper.__init__ calls this
            group.setdefault(INFLIGHT_START, 0)
            group.setdefault(INFLIGHT_FRAGMENT, -1)

    # state_dict() is the inner optimizer's: the outer state is part of its state and groups,
    # one format that torch.distributed.checkpoint saves, loads and reshards like any other.

    def state_dict(self) -> dict[str, Any]:
        # A sync in flight is waited for and its update applied to the slow weights and momentum
        # here; the fast weights' restart stays due at its step (INFLIGHT_START), resumed or not.
        self._settle()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._restarts = {}  # the groups are new dicts
        self._inflight = None  # the loaded groups say which restart is due (INFLIGHT_START)
        self._restarts_from_weights()
        if self.state_device is not None:
            # Optimizer.load_state_dict moves every state tensor to its parameter's device.
            for state in self.state.values():
                for key in (SLOW, MOMENTUM, RESIDUAL):
                    if key in state and _local(state[key]).device != self.state_device:
                        state[key] = self._to_state_device(state[key], pin=key == SLOW)

    _repr_prefix = "snoo_"  # SNOO(k=20, lr=0.7, ...): the group keys without their namespace

    # -- the update --------------------------------------------------------------------------

    def guard_outer_step(self, finite: torch.Tensor) -> None:
        """For the next step() only: `finite` (a 0-d device bool, never read on the host) says
        whether this replica's fast weights are finite as that step leaves them; it must be the
        same on every rank of the replica (e.g. from the replica's loss and global grad norm).

        If an outer step is due in that step(), it is applied only when every replica's flag is
        True: the flags travel as one more element of the pseudo-gradient's all-reduce (no extra
        collective, no host sync). Otherwise every replica drops it: the slow weights and
        momentum stay as they were (bitwise), the fast weights restart from them, and
        `outer_step_ok` (a device bool, the same on every replica) is False. The rule, in short:
        a non-finite replica at an outer step drops that outer step on every replica."""
        self._finite = finite

    # What a step guarded with False leaves bitwise as it was: a SkipMask (trainer.nonfinite=skip)
    # hands SNOO its flag through guard_outer_step and leaves these out of its snapshot.
    guarded_state_keys = (SLOW, MOMENTUM, RESIDUAL)

    def masked_step(self, applied: torch.Tensor) -> None:
        """A SkipMask's word after step(): the step stands only where the device bool `applied`
        is True, elsewhere the parameters were put back as they were before it. If that step
        took an outer step, its restart (fast <- slow) may have been undone with it: evaluation
        and flush() then no longer take fast == slow for granted (no host read of `applied`)."""
        for group in self._last_due:
            self._restarts[id(group)] = (group, applied)

    @torch.no_grad()
    def _restarts_from_weights(self) -> None:
        """After a load, at an outer step's position: masked_step's flag did not travel with the
        checkpoint, and the restart stood exactly where fast == slow bitwise (it is a copy), so
        the flag is taken from the weights (on the device, once per load; call after the
        parameters are loaded: set_state_dict loads the model first)."""
        if self.streaming:  # no masked steps there (masked_step refuses)
            return
        for group in self.param_groups:
            pairs = [(p, self.state[p][SLOW]) for p in group["params"] if SLOW in self.state.get(p, ())]
            if not pairs or not self._restarted(group):
                continue
            equal = [(_local(p) == _local(w).to(_local(p).device)).all() for p, w in pairs]
            self._restarts[id(group)] = (group, torch.stack(equal).all())

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        finite, self._finite = self._finite, None
        self.outer_step_ok = None
        return self._step(closure, finite)

    def _step(self, closure: Callable[[], float] | None, finite: torch.Tensor | None) -> Any:
        # The slow weights start at the parameters before the first inner step. They are written
        # into state[p] only after that step: AdamW (and others) initialise a parameter's state
        # only while state[p] is empty. A parameter joins when it first has a gradient (until
        # then the inner optimizer has not moved it, so w = p still holds). With a closure the
        # gradients only appear inside the inner step (Lightning works this way), so every
        # trainable newcomer is snapshotted and kept if it came out with a gradient.
        first_seen = {
            p: self._to_state_device(p.detach()) if self.state_device else p.detach().clone()
            for group in self.param_groups
            for p in group["params"]
            if SLOW not in self.state.get(p, ())
            and (p.grad is not None if closure is None else p.requires_grad)
        }

        with torch.enable_grad():
            loss = self._inner.step(closure) if closure is not None else self._inner.step()

        for p, slow in first_seen.items():
            if p.grad is not None:
                self.state[p][SLOW] = slow
                self.state[p][MOMENTUM] = torch.zeros_like(slow)
                if self.error_feedback:
                    self.state[p][RESIDUAL] = torch.zeros_like(slow)

        self.outer_step_taken = False
        if self.streaming:
            for group in self.param_groups:
                group["snoo_step"] += 1
            self._streaming_step(finite)
            return loss
        due = []
        for group in self.param_groups:
            group["snoo_step"] += 1
            if group["snoo_step"] % group["snoo_k"] == 0:
                due.append(group)
                self._restarts.pop(id(group), None)  # a new restart: masked_step may follow
        self._last_due = due
        if due:
            self._outer_step(due, finite)
            self.outer_step_taken = True
        return loss

    @torch.no_grad()
    def flush(self) -> None:
        """Take the outer step now on the inner steps since the last one (a partial window), so
        that the slow weights hold every inner step taken; a no-op right after an outer step.

        The update is the usual one on a shorter window: s = w - p, b = mu * b + s,
        w = w - eta * (s + mu * b), p <- w; with `replicate_group` (DiLoCo) s is averaged over
        the replicas first, so this is a collective: call it on every rank together. The
        trainer calls it once, after the step at trainer.max_steps, so that the final evaluation,
        the last checkpoint and the export hold the last (lowest learning-rate) inner steps;
        call it in your own loop before evaluating or saving the final model (timm's Lookahead
        calls the same thing `sync_lookahead`). Training may go on afterwards: the next outer
        step is still at the next multiple of k, after a window that much shorter.

        Right after an outer step that a SkipMask may have undone (`masked_step`), the step is
        taken where the device flag says it was undone, and dropped (a no-op) where it stood.

        Streaming (fragments, sync_delay): a sync in flight is waited for and applied now, and
        every other fragment not restarted at this step takes its outer step on its partial
        window (one all-reduce each)."""
        if self.streaming:
            self._streaming_flush()
            return
        due = [group for group in self.param_groups if not self._restarted(group)]
        if due:
            self._outer_step(due)
        undone: dict[int, tuple[torch.Tensor, list[dict[str, Any]]]] = {}
        for group, stood in self._restarts.values():
            if self._restarted(group):
                undone.setdefault(id(stood), (stood, []))[1].append(group)
        for stood, groups in undone.values():  # one flag per outer step; in practice one
            self._outer_step(groups, ~stood)
            due += groups
        self._restarts = {}
        for group in due:
            group[FLUSHED_AT] = group["snoo_step"]
        if due:
            self.outer_step_taken = True

    def _to_state_device(self, t: torch.Tensor, pin: bool = True) -> torch.Tensor:
        """A copy of `t` on `state_device`: a DTensor keeps its mesh and placements around a CPU
        local tensor (what FSDP2's CPU offload does with the sharded parameters). `pin`: the
        slow weights, copied into the parameters at every outer step, are page-locked."""
        if DTensor is not None and isinstance(t, DTensor):
            return DTensor.from_local(
                _cpu_copy(t.to_local(), pin),
                device_mesh=t.device_mesh,
                placements=t.placements,
                run_check=False,
                shape=t.shape,
                stride=t.stride(),
            )
        return _cpu_copy(t, pin)

    def _outer_step(self, groups: list[dict[str, Any]], finite: torch.Tensor | None = None) -> None:
        """The outer step of every group due now: pseudo-gradients (averaged over the replicas
        in one all-reduce for all groups together), then each group's Nesterov update; with
        `finite` (guard_outer_step) applied only if every replica's flag is True."""
        todo = []  # (group, params)
        for group in groups:
            params = [p for p in group["params"] if SLOW in self.state.get(p, ())]
            if params:
                todo.append((group, params))
        if not todo:
            return
        pseudo_grads_list, ok = self._pseudo_gradients(
            [_local(self.state[p][SLOW]) for _, params in todo for p in params],
            [_local(p) for _, params in todo for p in params],
            finite,
            [_local(self.state[p][RESIDUAL]) for _, params in todo for p in params] if self.error_feedback else None,
        )
        self.outer_step_ok = ok
        pseudo_grads = iter(pseudo_grads_list)

        sq_norms: dict[str, list[torch.Tensor]] = {"pseudo_grad": [], "slow_weight": []}
        for group, params in todo:
            pseudo_grad = [next(pseudo_grads) for _ in params]
            sq_pseudo, sq_slow = self._nesterov_update(group, params, pseudo_grad, ok)
            sq_norms["pseudo_grad"] += sq_pseudo
            sq_norms["slow_weight"] += sq_slow
        self._metrics_device = todo[0][1][0].device
        sq = torch.stack([torch.stack(sq_norms[key]).sum() for key in ("pseudo_grad", "slow_weight")]).double()
        if ok is not None:
            # A dropped step reports the last applied one's norms (NaN before the first).
            previous = self._last_outer_sq if self._last_outer_sq is not None else torch.full_like(sq, float("nan"))
            sq = torch.where(ok.to(sq.device), sq, previous.to(sq.device))
        self._last_outer_sq = sq

    def _nesterov_update(
        self, group: dict[str, Any], params: list[torch.Tensor], pseudo_grad: list[torch.Tensor],
        ok: torch.Tensor | None, restart: bool = True,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One group's update from its pseudo-gradients (local shards, consumed in place):
        b = mu * b + s, w = w - eta * (s + mu * b) (or w - eta * b), p <- w (not with `restart`
        False: streaming restarts the fast weights later); nothing moves where `ok` (every replica
        finite) is False. Returns the local squared norms of s and of w."""
        fast = [_local(p) for p in params]
        slow = [_local(self.state[p][SLOW]) for p in params]
        buf = [_local(self.state[p][MOMENTUM]) for p in params]
        eta, mu = group["snoo_lr"], group["snoo_momentum"]
        keep = None if ok is None else ok.to(slow[0].device)
        if keep is not None:
            # A dropped step: s = -0 (a NaN never meets arithmetic), b * 1 + (-0) = b and
            # w - eta * 0 = w bitwise (x + -0 is x for every x, -0 included; x + 0 is not).
            drop = ~keep
            for s in pseudo_grad:
                s.masked_fill_(drop, -0.0)

        # Local squared norms only: turning them into global norms needs a collective, which
        # outer_metrics() makes when the training loop asks, never the step itself. After the
        # replica average every replica holds the same s and w, which the replication factor
        # counts once.
        factors = [float(_replication_factor(p, self.pp)) for p in params]
        sq_pseudo = [n.square() / f for n, f in zip(torch._foreach_norm(pseudo_grad), factors)]

        if keep is None:
            torch._foreach_mul_(buf, mu)
        else:
            # mu, or 1 for a dropped step; in the buffer's dtype (bitwise the scalar product)
            # and filled on the device (no host-to-device copy)
            like = {"dtype": buf[0].dtype, "device": buf[0].device}
            torch._foreach_mul_(buf, torch.where(keep, torch.full((), mu, **like), torch.ones((), **like)))
        torch._foreach_add_(buf, pseudo_grad)  # b = mu * b + s
        if group["snoo_nesterov"]:
            # s + mu * b, in place: one temporary copy of the parameters, not two
            update = pseudo_grad
            torch._foreach_add_(update, buf, alpha=mu)
        else:
            update = buf
        if keep is not None:  # a dropped step moves nothing
            if update is buf:
                update = [b.masked_fill(drop, 0.0) for b in buf]
            else:
                for u in update:
                    u.masked_fill_(drop, 0.0)
        torch._foreach_add_(slow, update, alpha=-eta)  # w = w - eta * update
        if restart:
            torch._foreach_copy_(fast, slow)  # the fast weights restart from the slow weights
        sq_slow = [n.square() / f for n, f in zip(torch._foreach_norm(slow), factors)]
        return sq_pseudo, sq_slow

    def _start_pseudo_gradients(
        self,
        slow: list[torch.Tensor],
        fast: list[torch.Tensor],
        finite: torch.Tensor | None,
        async_op: bool = False,
        residuals: list[torch.Tensor] | None = None,
    ) -> OuterSync | PendingAverage:
        """Start the reduction of s = w - p over the replicas (outer_sync.start): ONE all-reduce
        of a flat buffer of this rank's shards with the `finite` flag as its last element, or with
        `outer_quant` ONE all_gather of the quantized shards (`residuals` updated by wait())."""
        return start_sync(
            slow, fast, finite, group=self.replicate_group, reduce_dtype=self.reduce_dtype,
            state_device=self.state_device, async_op=async_op, outer_quant=self.outer_quant, residuals=residuals,
        )  # fmt: skip

    def _pseudo_gradients(
        self,
        slow: list[torch.Tensor],
        fast: list[torch.Tensor],
        finite: torch.Tensor | None = None,
        residuals: list[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """s = w - p for local shards, on the state's device; with `replicate_group`, averaged
        over the replicas in ONE all-reduce of a flat buffer holding every shard (in
        `reduce_dtype`, on the parameters' device, which the backend needs: NCCL's is the GPU).
        Also returns whether every replica's `finite` flag is True (None without a flag): the
        flags travel as the buffer's last element, a count of non-finite replicas. With
        `outer_quant`, the quantized average of outer_quant.py instead (updating `residuals`)."""
        return self._start_pseudo_gradients(slow, fast, finite, residuals=residuals).wait()

    # -- streaming DiLoCo: fragments with their own outer steps, the sync overlapped ------------

    def _check_fragments(self, fragments: list[list[torch.Tensor]] | None) -> list[list[torch.Tensor]]:
        params = [p for group in self.param_groups for p in group["params"]]
        if fragments is None:
            return [params]
        where = {}
        for i, fragment in enumerate(fragments):
            for p in fragment:
                if id(p) in where:
                    raise ValueError(f"fragments: a parameter is in fragments {where[id(p)]} and {i}")
                where[id(p)] = i
        if set(where) != {id(p) for p in params} or any(not f for f in fragments):
            raise ValueError("fragments must split the inner optimizer's parameters, each in exactly one non-empty fragment")
        return [list(f) for f in fragments]

    def _fragment_starting(self, step: int, k: int) -> int | None:
        """The fragment whose sync starts after inner step `step`: fragment i at the steps where
        step % k == (i + 1) * k / F (mod k), so fragment F - 1 at the multiples of k (F = 1:
        plain SNOO's outer steps) and each sync moves about 1/F of the parameters."""
        per = k // len(self._fragments)
        if step < 1 or step % k % per:
            return None
        return (step % k // per - 1) % len(self._fragments)

    def _completed_at(self, fragment: int, step: int, k: int) -> bool:
        # This fragment's fast weights restarted after inner step `step` (the schedule's record).
        return self._fragment_starting(step - self.sync_delay, k) == fragment

    def _streaming_step(self, finite: torch.Tensor | None) -> None:
        group = self.param_groups[0]  # every group counts the same steps with the same k
        step, k = group["snoo_step"], group["snoo_k"]
        if group[INFLIGHT_START] and step >= group[INFLIGHT_START] + self.sync_delay:
            self._complete_sync()
        fragment = self._fragment_starting(step, k)
        if fragment is not None:
            if group[INFLIGHT_START]:  # only after a resume with another optim.k: one sync at a time
                self._complete_sync()
            self._begin_sync(fragment, step, finite)
            if self.sync_delay == 0:
                self._complete_sync()

    def _begin_sync(self, fragment: int, step: int, finite: torch.Tensor | None) -> None:
        """Compute this fragment's pseudo-gradient now and start its reduction over the replicas
        (asynchronous when sync_delay > 0); the flag rides in the same buffer."""
        for group in self.param_groups:
            group[INFLIGHT_START], group[INFLIGHT_FRAGMENT] = step, fragment
        params = [p for p in self._fragments[fragment] if SLOW in self.state.get(p, ())]
        self._inflight = None
        if params:
            residuals = [_local(self.state[p][RESIDUAL]) for p in params] if self.error_feedback else None
            handle = self._start_pseudo_gradients(
                [_local(self.state[p][SLOW]) for p in params], [_local(p) for p in params], finite,
                async_op=self.sync_delay > 0, residuals=residuals,
            )  # fmt: skip
            self._inflight = (fragment, params, handle)

    @torch.no_grad()
    def _settle(self) -> None:
        """Wait for the sync in flight and apply its update to the fragment's slow weights and
        momentum (they depend on nothing after the start step). Called at the fragment's restart
        step, and earlier by state_dict() and eval_parameters(), so that a checkpoint or an
        evaluation taken while a sync is in flight holds the updated slow weights."""
        if self._inflight is None:
            return
        fragment, params, handle = self._inflight
        self._inflight = None
        pseudo_grad, ok = handle.wait()
        self.outer_step_ok = ok
        in_group = {id(p): s for p, s in zip(params, pseudo_grad)}
        sq_pseudo: list[torch.Tensor] = []
        sq_slow: list[torch.Tensor] = []
        for group in self.param_groups:
            mine = [p for p in group["params"] if id(p) in in_group]
            if mine:
                a, b = self._nesterov_update(group, mine, [in_group[id(p)] for p in mine], ok, restart=False)
                sq_pseudo, sq_slow = sq_pseudo + a, sq_slow + b
        self._metrics_device = params[0].device
        sq = torch.stack([torch.stack(sq_pseudo).sum(), torch.stack(sq_slow).sum()]).double()
        if ok is not None:  # a dropped step keeps this fragment's last applied norms (NaN before)
            previous = self._fragment_sq.get(fragment, torch.full_like(sq, float("nan")))
            sq = torch.where(ok.to(sq.device), sq, previous.to(sq.device))
        self._fragment_sq[fragment] = sq
        # The global norms: each fragment's last applied step (fragments without one left out).
        self._last_outer_sq = torch.stack(list(self._fragment_sq.values())).sum(0)

    def _complete_sync(self) -> None:
        """The fragment's restart: its slow weights updated (_settle; dropped on every replica if
        any replica's flag was False), its fast weights restart from them (torchft's merge with
        fragment_update_alpha = 0: the inner steps taken while the sync was in flight are not kept)."""
        self._settle()
        fragment = self.param_groups[0][INFLIGHT_FRAGMENT]
        for group in self.param_groups:
            group[INFLIGHT_START], group[INFLIGHT_FRAGMENT] = 0, -1
        params = [p for p in self._fragments[fragment] if SLOW in self.state.get(p, ())]
        if params:
            torch._foreach_copy_([_local(p) for p in params], [_local(self.state[p][SLOW]) for p in params])
        self.outer_step_taken = True

    def _streaming_flush(self) -> None:
        group = self.param_groups[0]
        step, k = group["snoo_step"], group["snoo_k"]
        if step == group[FLUSHED_AT]:
            return  # flushed at this step already
        restarted = set()
        if group[INFLIGHT_START]:
            restarted.add(group[INFLIGHT_FRAGMENT])
            self._complete_sync()
        for fragment in range(len(self._fragments)):
            if fragment in restarted or self._completed_at(fragment, step, k):
                continue
            self._begin_sync(fragment, step, None)
            self._complete_sync()
        for group in self.param_groups:
            group[FLUSHED_AT] = step
        self.outer_step_taken = True

    # -- observing the outer loop ------------------------------------------------------------

    def outer_metrics(self) -> dict[str, float]:
        """Global norms of the last applied outer step's pseudo-gradient and slow weights (a
        step dropped by guard_outer_step leaves them as they were; NaN if none was applied yet).

        In a process group this sums every rank's share (one all-reduce): call it on all ranks
        together, at log steps. Empty before the first outer step.
        """
        if self._last_outer_sq is None:
            return {}
        sq = self._last_outer_sq.clone()
        if world_size() > 1:
            # The collective needs the communication device (NCCL: the GPU), also when the
            # outer state, and with it the norms, lives on CPU.
            sq = sq.to(self._metrics_device)
            dist.all_reduce(sq)
        pseudo_grad, slow_weight = sq.sqrt().tolist()
        return {"snoo/pseudo_grad_norm": pseudo_grad, "snoo/slow_weight_norm": slow_weight}

    # The evaluation interface every optimizer in snoo_train.optim shares: the name of the
    # sequence evaluation and export should see, and a context manager that swaps it in
    # (InnerWrapper._swap_in_eval_point, with the three hooks below).
    eval_sequence = "slow"
    _buffer_key = SLOW

    def _restarted(self, group: dict[str, Any]) -> bool:
        # The host counters: this group's last step was an outer step (every k-th), or a flush.
        return group["snoo_step"] % group["snoo_k"] == 0 or group["snoo_step"] == group[FLUSHED_AT]

    def _params_are_eval_point(self, group: dict[str, Any]) -> bool:
        if self.streaming:  # the fragments restart at different steps: always copy the slow weights in
            return False
        # Right after an outer step fast == slow, unless a SkipMask may have undone it: then the
        # swap copies the slow weights in (harmless where they are already there).
        return self._restarted(group) and id(group) not in self._restarts

    def _write_eval_point(self, group: dict[str, Any], params: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
        torch._foreach_copy_(params, buffers)

    def eval_parameters(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: the parameters hold the slow weights inside, the fast ones after.

        Evaluation and export should see the slow weights (the paper's reported model). Right
        after an outer step fast == slow, and no copy is made.

        Under FSDP2 the swap happens in the sharded parameters: reshard the FSDP modules
        (`module.reshard()`) before entering and after leaving, since a forward without backward
        can leave unsharded copies that a later forward would reuse.
        """
        self._settle()  # streaming: a sync in flight lands in the slow weights first
        return self._swap_in_eval_point()

    # SNOO's own name for it, in the README and in user code since the first release.
    slow_parameters = eval_parameters
