"""Muon's step as it was before same-shape batching (commit 04d7285): one gather and one scatter
per owner-layout matrix, Newton-Schulz matrix by matrix, momentum and AdamW in Python loops.

Kept only so that bench/muon_comm.py can measure the batched step against it in one run
(`PerMatrixMuon`); the package never imports it. Same arithmetic as then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from snoo_train.optim._dtensor import local as _local
from snoo_train.optim.muon import Muon, _layout, _orthogonalise_gathered, rms_scale


class _Job:
    """One matrix (or expert stack) to orthogonalise in full on its owner rank."""

    def __init__(self, param, update, mesh_dim: int, dim: int, ns: Callable, lr: float, wd: float):
        self.param, self.update, self.dim, self.ns, self.lr, self.wd = (
            param,
            update,
            dim,
            ns,
            lr,
            wd,
        )
        mesh = param.device_mesh
        self.group = mesh.get_group(mesh_dim)
        self.size = mesh.size(mesh_dim)
        self.rank = dist.get_rank(self.group)
        self.length = param.shape[dim]
        self.chunk = -(-self.length // self.size)
        self.owner = 0
        self.result: torch.Tensor | None = None

    def padded_local(self) -> torch.Tensor:
        local = self.update
        missing = self.chunk - local.shape[self.dim]
        if missing:
            pad_shape = list(local.shape)
            pad_shape[self.dim] = missing
            local = torch.cat([local, local.new_zeros(pad_shape)], dim=self.dim)
        return local.contiguous()


def _orthogonalise_sharded(jobs: list[_Job]) -> int:
    """Owners dealt largest first to the least-loaded rank; one gather + one scatter per job."""
    load: dict[Any, list[float]] = {}
    for job in sorted(jobs, key=lambda j: -j.param.numel()):
        ranks = load.setdefault(id(job.group), [0.0] * job.size)
        job.owner = min(range(job.size), key=ranks.__getitem__)
        shape = job.param.shape
        ranks[job.owner] += job.param.numel() * min(shape[-2], shape[-1])
    sent, pending = 0, []
    for job in jobs:
        local = job.padded_local()
        dst = dist.get_global_rank(job.group, job.owner)
        mine = job.rank == job.owner
        gathered = [torch.empty_like(local) for _ in range(job.size)] if mine else None
        pending.append(
            (job, gathered, dist.gather(local, gathered, dst=dst, group=job.group, async_op=True))
        )
        if not mine:
            sent += local.numel() * local.element_size()
    for job, gathered, work in pending:
        work.wait()
        if gathered is not None:
            job.result = job.ns(torch.cat(gathered, dim=job.dim).narrow(job.dim, 0, job.length))
    pending = []
    for job in jobs:
        shape = list(job.update.shape)
        shape[job.dim] = job.chunk
        out = job.update.new_empty(shape)
        chunks = None
        if job.rank == job.owner:
            full, pad = job.result, job.chunk * job.size - job.length
            if pad:
                pad_shape = list(full.shape)
                pad_shape[job.dim] = pad
                full = torch.cat([full, full.new_zeros(pad_shape)], dim=job.dim)
            chunks = [c.contiguous() for c in full.split(job.chunk, dim=job.dim)]
            sent += sum(c.numel() * c.element_size() for i, c in enumerate(chunks) if i != job.rank)
        src = dist.get_global_rank(job.group, job.owner)
        pending.append(
            (job, out, dist.scatter(out, chunks, src=src, group=job.group, async_op=True))
        )
    for job, out, work in pending:
        work.wait()
        job.result = out.narrow(job.dim, 0, job.update.shape[job.dim])
    return sent


def per_matrix_step(opt: Any) -> None:
    """The old `Muon.step` body (without the closure), on `opt`'s groups and state."""

    jobs: list[_Job] = []
    opt.last_comm_bytes = 0
    for group in opt.param_groups:
        if not group["use_muon"]:
            _adamw_loop(opt, group)
            continue
        lr, wd, ns = group["lr"], group["weight_decay"], opt._ns(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = opt.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] = torch.tensor(0.0)
            state["step"] += 1
            mu = group["momentum"]
            grad, buf = _local(p.grad), _local(state["momentum_buffer"])
            buf.mul_(mu).add_(grad)
            update = grad.add(buf, alpha=mu) if group["nesterov"] else buf
            layout = _layout(p)
            full_step = int(state["step"].item()) % group["period"] == 0
            if layout.kind == "owner" and full_step:
                jobs.append(_Job(p, update, layout.mesh_dim, layout.dim, ns, lr, wd))
            elif layout.kind == "gather" and full_step:
                ortho, sent = _orthogonalise_gathered(p, update, layout.whole, ns)
                opt.last_comm_bytes += sent
                _apply(p, ortho, lr, wd, rms_scale(p.shape))
            elif update.numel():
                _apply(p, ns(update), lr, wd, rms_scale(update.shape))
    opt.last_comm_bytes += _orthogonalise_sharded(jobs) if jobs else 0
    for job in jobs:
        _apply(job.param, job.result, job.lr, job.wd, rms_scale(job.param.shape))


def _apply(p: torch.Tensor, ortho: torch.Tensor, lr: float, wd: float, scale: float) -> None:
    local = _local(p)
    if wd:
        local.mul_(1.0 - lr * wd)
    local.add_(ortho.to(local.dtype), alpha=-lr * scale)


def _adamw_loop(opt: Any, group: dict[str, Any]) -> None:
    (beta1, beta2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
    for p in group["params"]:
        if p.grad is None:
            continue
        state = opt.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] = torch.tensor(0.0)
        state["step"] += 1
        step = state["step"].item()
        local, grad = _local(p), _local(p.grad)
        m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        if wd:
            local.mul_(1.0 - lr * wd)
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (v / (1.0 - beta2**step)).sqrt_().add_(eps)
        local.addcdiv_(m, denom, value=-lr / (1.0 - beta1**step))


class PerMatrixMuon(Muon):
    """Muon whose step is the per-matrix one above (state and hyper-parameters unchanged)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        per_matrix_step(self)
        return loss


def use_per_matrix_step(opt: Muon) -> None:
    """Turn a built Muon into PerMatrixMuon in place, step hooks included."""
    opt.__class__ = PerMatrixMuon
    opt._patch_step_function()  # torch wraps step() per class: the hooks must wrap this one too
    # An LR scheduler wraps the instance's bound step (Muon's) to track calls: drop that wrapper,
    # so that the class's step is the one called.
    opt.__dict__.pop("step", None)
    opt._opt_called = True  # what the wrapper would have recorded (no scheduler-order warning)
