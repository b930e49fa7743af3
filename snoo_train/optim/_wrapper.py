"""What every averaging optimizer that wraps an inner optimizer shares (SNOO, GPA, EMA-Nesterov).

The layout is SNOO's (snoo_train/optim/snoo.py), so that schedulers, `state_dict()` and
distributed checkpointing work without special code:
  * hyper-parameters live in the inner optimizer's param groups under namespaced keys;
  * per-parameter tensors live in the inner optimizer's `state[p]` under namespaced keys, created
    after the inner optimizer's first step on that parameter (AdamW initialises a parameter's
    state only while `state[p]` is empty);
  * `param_groups`, `state` and `defaults` are properties that always read the inner optimizer,
    so a wrapper cannot go stale when `load_state_dict` replaces the inner optimizer's groups.

On any device mesh (FSDP2, TP, EP and their N-D mixes) the per-parameter tensors are clones of
the (sharded) parameters, hence DTensors with the parameter's mesh and placements, and all
arithmetic runs on each rank's local shard (`_local`): a step issues no collective
(tests/test_optim_meshes.py checks both on a (shard, tp) mesh).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.optim import Optimizer

from snoo_train.optim._dtensor import local as _local

__all__ = ["InnerWrapper", "_local"]


def _forward_to_inner(name: str) -> property:
    """A property that reads and writes the inner optimizer's attribute `name`.

    `Optimizer.__init__` assigns `defaults`, `state` and `param_groups` before the inner
    optimizer is attached; those assignments land in a scratch slot that is dropped afterwards.
    """
    scratch = f"_scratch_{name}"

    def get(self: Optimizer) -> Any:
        inner = self.__dict__.get("_inner")
        return getattr(inner, name) if inner is not None else self.__dict__[scratch]

    def set(self: Optimizer, value: Any) -> None:
        inner = self.__dict__.get("_inner")
        if inner is not None:
            setattr(inner, name, value)
        else:
            self.__dict__[scratch] = value

    return property(get, set, doc=f"The inner optimizer's `{name}`.")


class InnerWrapper(Optimizer):
    """Base class: an optimizer that wraps `inner` and keeps all of its state inside `inner`.

    Subclasses pass their hyper-parameters as `outer_defaults` (namespaced keys, e.g.
    `gpa_mu_x`), may add per-group bookkeeping in `_init_group`, and implement `step`.
    """

    param_groups = _forward_to_inner("param_groups")
    state = _forward_to_inner("state")
    defaults = _forward_to_inner("defaults")

    def __init__(self, inner: Optimizer, outer_defaults: dict[str, Any]) -> None:
        if not isinstance(inner, Optimizer):
            raise TypeError(f"inner must be a torch.optim.Optimizer, got {type(inner).__name__}")
        if not any(group["params"] for group in inner.param_groups):
            raise ValueError("inner: the inner optimizer has no parameters")
        # Let torch set up its hook registries and step profiling for this class; its param
        # group is a placeholder that is dropped below (as in SNOO).
        super().__init__([torch.zeros(1)], {})
        for name in ("param_groups", "state", "defaults"):
            del self.__dict__[f"_scratch_{name}"]
        self._inner = inner
        self._outer_defaults = dict(outer_defaults)
        self.defaults.update(self._outer_defaults)
        for group in self.param_groups:
            self._init_group(group)

    @property
    def inner(self) -> Optimizer:
        return self._inner

    def _init_group(self, group: dict[str, Any]) -> None:
        for key, value in self._outer_defaults.items():
            group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "_inner" not in self.__dict__:  # the placeholder group of Optimizer.__init__
            super().add_param_group(param_group)
            return
        self._inner.add_param_group(param_group)
        self._init_group(self.param_groups[-1])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self._inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._inner.load_state_dict(state_dict)
        # A bare inner optimizer's state dict carries no outer settings: use the constructor's.
        for group in self.param_groups:
            self._init_group(group)

    _repr_prefix = ""  # a namespace the group keys carry that __repr__ leaves out

    def __repr__(self) -> str:
        outer = ", ".join(f"{k.removeprefix(self._repr_prefix)}={v}" for k, v in self._outer_defaults.items())
        return f"{type(self).__name__}({outer},\ninner={self._inner!r})"

    # -- helpers for subclasses ------------------------------------------------------------

    def _newcomers(self, key: str) -> dict[torch.Tensor, torch.Tensor]:
        """Parameters with a gradient and no `key` in their state yet, each with a copy of its
        value now (before the inner step). The copy becomes the subclass's buffer, so a
        parameter's first step costs no memory beyond that buffer."""
        return {
            p: p.detach().clone()
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and key not in self.state.get(p, ())
        }

    def _tracked(self, group: dict[str, Any], key: str) -> list[torch.Tensor]:
        # `.get`, not `state[p]`: the state is a defaultdict, and an empty entry for a parameter
        # that has no state yet makes `optimizer.state` non-empty, which tells
        # torch.distributed.checkpoint's get_state_dict that the state is initialised: it then
        # skips its initialising step and a resumed run would load no optimizer state at all.
        return [p for p in group["params"] if key in self.state.get(p, ())]

    def flush(self) -> None:
        """Make the evaluation point hold every step taken (the trainer calls it after its last
        step, on every rank). Nothing to do here: GPA's and EMA-Nesterov's x move at every step,
        so no step is left out of them. SNOO overrides it with an outer step on a partial window."""

    # The evaluation point: a subclass names the state key of its buffer, says per group whether
    # the parameters already hold the evaluation point, and writes it into the local shards.
    _buffer_key: str = ""

    def _params_are_eval_point(self, group: dict[str, Any]) -> bool:
        return False

    def _write_eval_point(
        self, group: dict[str, Any], params: list[torch.Tensor], buffers: list[torch.Tensor]
    ) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def _swap_in_eval_point(self) -> Iterator[None]:
        """Inside: each tracked parameter's local shard holds the evaluation point. After: the
        exact previous values, restored from a copy (one transient copy of the parameters of
        this rank, made only while evaluating)."""
        backup: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        with torch.no_grad():
            for group in self.param_groups:
                params = self._tracked(group, self._buffer_key)
                if not params or self._params_are_eval_point(group):
                    continue
                local = [_local(p) for p in params]
                backup.append((local, [t.clone() for t in local]))
                buffers = [_local(self.state[p][self._buffer_key]) for p in params]
                self._write_eval_point(group, local, buffers)
        try:
            yield
        finally:
            with torch.no_grad():
                for local, saved in backup:
                    torch._foreach_copy_(local, saved)
