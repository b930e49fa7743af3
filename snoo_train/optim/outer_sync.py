"""The one place where SNOO's pseudo-gradient crosses replicas (multi-replica DiLoCo).

Two calls: `start(...)` computes s = w - p on this rank's local shards, packs it (with the
non-finite flag as one more element) into a flat buffer and issues ONE all-reduce over the
replicate group, synchronous or with `async_op=True`; the returned `OuterSync` handle's `wait()`
gives the replica-averaged local pseudo-gradients and the agreed flag. SNOO calls `start` at a
(fragment's) outer step and `wait` either at once (sync_delay=0) or sync_delay inner steps later,
so the collective runs while the inner steps go on. The quantized reduction
(outer_quant.start_average) is the other implementation of the same two calls, chosen here.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from snoo_train.optim.outer_quant import PendingAverage, start_average


class OuterSync:
    """A started pseudo-gradient reduction: `wait()` returns (the averaged local pseudo-gradients,
    in the slow weights' dtype and device; whether every replica's flag was True, a device bool,
    None without a flag). `wait()` may be called more than once (the same tensors each time)."""

    def __init__(self, pseudo_grad, views, flat, work, replicas: int, has_flag: bool, finite) -> None:
        self._pseudo_grad, self._views, self._flat, self._work = pseudo_grad, views, flat, work
        self._replicas, self._has_flag, self._finite = replicas, has_flag, finite
        self._result: tuple[list[torch.Tensor], torch.Tensor | None] | None = None

    def wait(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if self._result is not None:
            return self._result
        if self._replicas == 1:  # one replica: s was computed at start, nothing travelled
            self._result = (self._pseudo_grad, self._finite)
            return self._result
        if self._work is not None:
            # NCCL: the current stream waits for the collective (no host sync); gloo: the host waits.
            self._work.wait()
        pseudo_grad = self._pseudo_grad
        if pseudo_grad is not self._views:
            torch._foreach_copy_(pseudo_grad, self._views)
        # SUM then divide: gloo has no AVG. Dividing after the copy back keeps full precision.
        torch._foreach_div_(pseudo_grad, float(self._replicas))
        ok = self._flat[-1] == 0 if self._has_flag else None
        self._result = (pseudo_grad, ok)
        self._work = None
        return self._result


def start(
    slow: list[torch.Tensor],
    fast: list[torch.Tensor],
    finite: torch.Tensor | None,
    *,
    group: dist.ProcessGroup | None,
    reduce_dtype: torch.dtype | None,
    state_device: torch.device | None,
    async_op: bool = False,
    outer_quant: str | None = None,
    residuals: list[torch.Tensor] | None = None,
) -> OuterSync | PendingAverage:
    """s = w - p for local shards, on the state's device; with a replicate group of more than
    one rank, summed over the replicas in ONE all-reduce of a flat buffer holding every shard (in
    `reduce_dtype`, on the parameters' device, which the backend needs: NCCL's is the GPU). The
    flags travel as the buffer's last element, a count of non-finite replicas. `async_op`: the
    collective is only issued here; the handle's wait() completes it. With `outer_quant`, ONE
    all_gather of the quantized shards instead (outer_quant.start_average), `residuals` (error
    feedback) updated by the handle's wait(); both handles' wait() give the same pair."""
    fast_on_state = [f.to(state_device) for f in fast] if state_device is not None else fast  # device-to-host
    replicas = 1 if group is None else dist.get_world_size(group)
    if replicas == 1:  # one replica: plain SNOO, no collective
        return OuterSync(torch._foreach_sub(slow, fast_on_state), None, None, None, 1, False, finite)
    if outer_quant is not None:
        return start_average(
            torch._foreach_sub(slow, fast_on_state), outer_quant, group,
            finite=finite, residuals=residuals, device=fast[0].device, async_op=async_op,
        )  # fmt: skip

    dtype = reduce_dtype or functools.reduce(torch.promote_types, (w.dtype for w in slow))
    numels = [w.numel() for w in slow]
    flag = 1 if finite is not None else 0
    flat = torch.empty(sum(numels) + flag, dtype=dtype, device=fast[0].device)
    views = [v.view(w.shape) for v, w in zip(flat.split(numels + [flag]), slow)]
    if finite is not None:  # exact in any float dtype up to 256 replicas (bf16)
        flat[-1:].copy_((~finite).to(dtype).reshape(1))
    if all(w.dtype == dtype and w.device == flat.device for w in slow):
        # s computed straight into the communication buffer: no second copy of it
        torch._foreach_copy_(views, slow)
        torch._foreach_sub_(views, fast)
        pseudo_grad = views
    else:  # s in full precision on the state's device first, then rounded / moved
        pseudo_grad = torch._foreach_sub(slow, fast_on_state)
        torch._foreach_copy_(views, pseudo_grad)
    work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
    return OuterSync(pseudo_grad, views, flat, work, replicas, finite is not None, finite)
