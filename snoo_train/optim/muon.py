"""Muon: momentum + Newton-Schulz orthogonalisation for matrix weights, AdamW for the rest.

    buf = mu * buf + g;  u = g + mu * buf (Nesterov) or buf;  O = NS(u) ~ polar factor of u
    p = p * (1 - lr * wd) - lr * sqrt(max(1, rows / cols)) * O

A 3-D expert tensor [E, rows, cols] is E matrices, orthogonalised one by one (batched). Which
parameters Muon takes is decided once, by `categorize_parameters`, and `muon_param_groups` turns
the categories into param groups with `use_muon=True/False`; the AdamW groups (embedding, head,
norms and biases, router gates by default) are updated by the AdamW rule inside this optimizer,
so one `Muon` object holds all state and works with schedulers, `state_dict()` and SNOO.

Sharded parameters (DTensors on any mesh). Newton-Schulz needs the whole matrix, while each
rank may hold a slice; `_layout` decides per parameter how NS sees it whole:
  * local: every matrix is whole on this rank (plain tensors, replicated parameters, expert
    stacks [E, rows, cols] split only on the expert dim, i.e. EP): NS runs locally, no
    communication; experts are orthogonalised one by one (batched).
  * owner: one mesh dim splits one matrix dim (FSDP on a 1-D mesh, HSDP, experts FSDP-sharded
    besides EP). Every step the matrices are dealt out to the ranks of that dim's group
    (largest first, to the least-loaded rank), each matrix is *gathered to its owner only*, the
    owner orthogonalises it, and *scatters* the slices back: each rank does about 1/N of the
    work and receives only the matrices it owns (the scheme of microsoft/dion and torchtitan's
    DistMuon, written here with plain gather/scatter so that it runs on gloo and NCCL alike).
  * gather: several mesh dims split the matrix (TP x FSDP: Shard/_StridedShard on two dims):
    the update is all-gathered over exactly those dims, NS runs on the whole matrix and each
    rank keeps its own slice (`_orthogonalise_gathered` says why and what it costs).
The result equals single-process Muon up to floating-point reassociation.

MuonBP (block-periodic, arXiv 2510.16981): with `period=P > 1`, on steps where step % P != 0
each rank orthogonalises its local slice as a block of its own (no communication), and every
P-th step the full matrix as above. `period=1` is plain Muon. Expert stacks sharded on the expert
dimension need no gather at all: each expert matrix is already whole on one rank. The RMS scale
uses the block's shape on block steps. On one process a block is the whole matrix, so MuonBP equals Muon.

State follows torch.optim conventions: hyper-parameters in `param_groups`, per-parameter tensors
in `state[p]` (`momentum_buffer` for Muon; `exp_avg`, `exp_avg_sq` for AdamW; `step`), created
on a parameter's first step only when missing, so a wrapper such as SNOO can keep its own keys
in the same dict. Depends on torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from snoo_train.optim._dtensor import local as _local

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - very old torch
    DTensor = None  # type: ignore[assignment,misc]

# Keller Jordan's quintic coefficients: 5 steps drive every singular value into roughly
# [0.7, 1.2] (not exactly 1; faster than a converging iteration, and as good for training).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
CATEGORIES = ("matrix", "expert", "embedding", "head", "vector", "router")


# -- which parameters Muon takes ------------------------------------------------------------


def categorize_parameters(model: nn.Module) -> dict[str, str]:
    """Name -> category for every trainable parameter (a tied weight once, under its first name).

    embedding: nn.Embedding weights (a tied output head is the same tensor); head: the output
    projection when untied; router: MoE router gates (a module whose class name ends in
    "Router", or a submodule named `gate`/`router` that is not an expert); vector: anything
    with fewer than 2 dims (norms, biases); expert: 3-D expert stacks; matrix: other 2-D weights.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(head.weight)} if head is not None else set()
    routers: set[int] = set()
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if type(module).__name__.endswith("Router") or last in ("gate", "router"):
            routers.update(id(p) for p in module.parameters(recurse=False))
    categories: dict[str, str] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embeddings:
            categories[name] = "embedding"
        elif id(p) in head_ids:
            categories[name] = "head"
        elif p.ndim < 2:
            categories[name] = "vector"
        elif id(p) in routers:
            categories[name] = "router"
        elif p.ndim == 3:
            categories[name] = "expert"
        else:
            categories[name] = "matrix"
    return categories


def muon_param_groups(
    model: nn.Module,
    *,
    muon_categories: Iterable[str] = ("matrix", "expert"),
    lr: float = 0.02,
    adamw_lr: float = 3e-3,
    weight_decay: float = 0.0,
    adamw_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Param groups for `Muon`: the `muon_categories` with `use_muon=True`, the rest AdamW.

    AdamW decays no embedding, head, vector or router (the usual transformer choice); its
    `adamw_weight_decay` (default: `weight_decay`) applies only to matrices it is given.
    """
    muon_categories = set(muon_categories)
    unknown = muon_categories - set(CATEGORIES)
    if unknown or "vector" in muon_categories:
        raise ValueError(
            f"muon_categories {sorted(muon_categories)}: choose from {CATEGORIES[:-2]} + router"
        )
    named = dict(model.named_parameters())
    adamw_wd = weight_decay if adamw_weight_decay is None else adamw_weight_decay
    muon, adamw_decay, adamw_no_decay = [], [], []
    for name, category in categorize_parameters(model).items():
        p = named[name]
        if category in muon_categories:
            muon.append(p)
        elif category in ("matrix", "expert"):
            adamw_decay.append(p)
        else:
            adamw_no_decay.append(p)
    groups = [
        {"params": muon, "use_muon": True, "lr": lr, "weight_decay": weight_decay},
        {"params": adamw_decay, "use_muon": False, "lr": adamw_lr, "weight_decay": adamw_wd},
        {"params": adamw_no_decay, "use_muon": False, "lr": adamw_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# -- Newton-Schulz ------------------------------------------------------------------------------


def newton_schulz(
    g: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximate polar factor U V^T of each matrix in `g` [..., rows, cols] (batched).

    Each matrix is normalised by its Frobenius norm (all singular values <= 1), then iterated
    X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation so A is the small Gram
    matrix. `dtype` is the compute dtype (bf16 is the usual GPU choice; default fp32).
    """
    a, b, c = coefficients
    x = g.to(dtype or torch.float32)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def rms_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """sqrt(max(1, rows / cols)): keeps the update's RMS similar across matrix shapes."""
    rows, cols = shape[-2], shape[-1]
    return max(1.0, rows / cols) ** 0.5


# -- sharded orthogonalisation -------------------------------------------------------------------


class _Layout(NamedTuple):
    """How a parameter's matrices lie over the ranks (see the module docstring)."""

    kind: str  # "local" | "owner" | "gather"
    mesh_dim: int = -1  # owner: the mesh dim whose group holds the slices of each matrix
    dim: int = -1  # owner: the tensor dim that mesh dim splits
    whole: tuple = ()  # gather: the placements with every matrix dim whole


def _split_dim(placement: Any, ndim: int) -> int | None:
    """The tensor dim a placement splits (Shard or _StridedShard), None if it splits none."""
    if isinstance(placement, (Shard, _StridedShard)):
        return placement.dim % ndim
    if placement.is_partial():
        raise NotImplementedError(f"Muon: a parameter with a Partial placement ({placement})")
    return None


def _layout(p: torch.Tensor) -> _Layout:
    """local, owner or gather for this parameter. The last two dims are the matrix; leading dims
    (experts) split over ranks leave every matrix whole, so EP needs no communication."""
    if DTensor is None or not isinstance(p, DTensor):
        return _Layout("local")
    matrix_dims = (p.ndim - 2, p.ndim - 1)
    splitting = [
        (mesh_dim, placement)
        for mesh_dim, placement in enumerate(p.placements)
        if _split_dim(placement, p.ndim) in matrix_dims and p.device_mesh.size(mesh_dim) > 1
    ]
    if not splitting:
        return _Layout("local")
    if len(splitting) == 1 and type(splitting[0][1]) is Shard:
        mesh_dim, placement = splitting[0]
        return _Layout("owner", mesh_dim=mesh_dim, dim=placement.dim % p.ndim)
    split_mesh_dims = {mesh_dim for mesh_dim, _ in splitting}
    whole = tuple(
        Replicate() if mesh_dim in split_mesh_dims else placement
        for mesh_dim, placement in enumerate(p.placements)
    )
    return _Layout("gather", whole=whole)


def _orthogonalise_gathered(
    p: torch.Tensor, update: torch.Tensor, whole: tuple, ns: Callable
) -> tuple[torch.Tensor, int]:
    """NS of the whole matrices of a parameter split over several mesh dims; returns this rank's
    slice of the result and the bytes this rank sent.

    Why gather here: Newton-Schulz needs each whole matrix, and under TP x FSDP no single process
    group holds one matrix in contiguous pieces (two mesh dims split it, FSDP's _StridedShard
    interleaves its rows with TP's), so the owner scheme's gather along one dim cannot rebuild
    it. DTensor's redistribute all-gathers the update over exactly the mesh dims that split a
    matrix dim, undoing _StridedShard (a dim that splits only experts stays split: EP adds no
    communication). Every rank of those groups then has the same whole update and computes the
    same NS once; each keeps its own slice (Replicate -> Shard is a local narrow, no
    communication back). Cost per step, with g ranks sharing the matrix: each rank sends its
    slice to the g - 1 others, (g - 1) x its slice's bytes (the owner scheme: about 2 x, averaged
    over matrices), receives the matrix's other (g - 1) / g, and NS runs on all g ranks instead of
    one. TP x FSDP groups are small (g = tp x fsdp ranks within a node), and TP-sharded
    matrices are a fraction of the model; the owner scheme stays for everything split on one dim.
    """
    mesh, placements = p.device_mesh, p.placements
    gathered = DTensor.from_local(
        update, mesh, placements, run_check=False, shape=p.shape, stride=p.stride()
    ).redistribute(mesh, whole)
    ortho = DTensor.from_local(
        ns(gathered.to_local()), mesh, whole, run_check=False, shape=p.shape, stride=p.stride()
    ).redistribute(mesh, placements)
    ranks = 1
    for mesh_dim, (before, after) in enumerate(zip(placements, whole)):
        if before != after:
            ranks *= mesh.size(mesh_dim)
    return ortho.to_local(), (ranks - 1) * update.numel() * update.element_size()


class _Job:
    """One matrix (or expert stack) to orthogonalise in full on its owner rank."""

    def __init__(
        self, param: torch.Tensor, update: torch.Tensor, mesh_dim: int, dim: int, ns: Callable
    ):
        self.param, self.update, self.dim, self.ns = param, update, dim, ns
        mesh = param.device_mesh
        self.group = mesh.get_group(mesh_dim)
        self.size = mesh.size(mesh_dim)
        self.rank = dist.get_rank(self.group)
        self.length = param.shape[dim]
        self.chunk = -(-self.length // self.size)  # torch.chunk's (and DTensor's) slice size
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
    """Full-matrix NS for every job with 1/N of the work per rank; returns bytes this rank sent.

    Owners are dealt out largest matrix first to the least-loaded rank of the job's group
    (NS costs ~ rows * cols * min(rows, cols)); every rank computes the same assignment from
    the global shapes, so it costs no communication.
    """
    load: dict[Any, list[float]] = {}
    for job in sorted(jobs, key=lambda j: -j.param.numel()):
        ranks = load.setdefault(id(job.group), [0.0] * job.size)
        job.owner = min(range(job.size), key=ranks.__getitem__)
        shape = job.param.shape
        ranks[job.owner] += job.param.numel() * min(shape[-2], shape[-1])
    return _gather_and_orthogonalise(jobs) + _scatter_results(jobs)


def _gather_and_orthogonalise(jobs: list[_Job]) -> int:
    """Each owner gathers its matrices' shards and runs NS on the full matrix; returns bytes sent."""
    sent = 0
    pending = []
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
            full = torch.cat(gathered, dim=job.dim).narrow(job.dim, 0, job.length)
            job.result = job.ns(full)
    return sent


def _scatter_results(jobs: list[_Job]) -> int:
    """Each owner scatters its orthogonalised matrices back as shards; returns bytes sent."""
    sent = 0
    pending = []
    for job in jobs:
        local_len = job.update.shape[job.dim]
        shape = list(job.update.shape)
        shape[job.dim] = job.chunk
        out = job.update.new_empty(shape)
        src = dist.get_global_rank(job.group, job.owner)
        chunks = None
        if job.rank == job.owner:
            pad = job.chunk * job.size - job.length
            full = job.result
            if pad:
                pad_shape = list(full.shape)
                pad_shape[job.dim] = pad
                full = torch.cat([full, full.new_zeros(pad_shape)], dim=job.dim)
            chunks = [c.contiguous() for c in full.split(job.chunk, dim=job.dim)]
            sent += sum(c.numel() * c.element_size() for i, c in enumerate(chunks) if i != job.rank)
        pending.append(
            (
                job,
                out,
                local_len,
                dist.scatter(out, chunks, src=src, group=job.group, async_op=True),
            )
        )
    for job, out, local_len, work in pending:
        work.wait()
        job.result = out.narrow(job.dim, 0, local_len)
    return sent


# -- the optimizer -----------------------------------------------------------------------------


class Muon(Optimizer):
    """Muon for groups with `use_muon=True` (default), AdamW for groups with `use_muon=False`.

    Args:
        params: parameters or param groups, usually `muon_param_groups(model, ...)`.
        lr: Muon learning rate (AdamW groups bring their own `lr`, or use `adamw_lr`).
        momentum, nesterov: Muon's momentum on the gradient.
        ns_steps: Newton-Schulz iterations.
        weight_decay: decoupled, p *= 1 - lr * weight_decay (both rules).
        period: MuonBP period; 1 is plain Muon.
        adamw_lr, adamw_betas, adamw_eps: the AdamW rule's defaults.
        ns_dtype: NS compute dtype; None: bf16 on CUDA, fp32 elsewhere.

    Example::

        opt = Muon(muon_param_groups(model, lr=0.02, adamw_lr=3e-3), weight_decay=0.1)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        period: int = 1,
        adamw_lr: float = 3e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        if not lr > 0.0 or not adamw_lr > 0.0:
            raise ValueError(f"lr and adamw_lr must be > 0, got {lr!r} and {adamw_lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an integer >= 1, got {period!r}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps!r}")
        self._adamw_lr = adamw_lr
        self.ns_dtype = ns_dtype
        self.last_comm_bytes = 0  # bytes this rank sent in the last step (the benchmark reads it)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            period=period,
            betas=tuple(adamw_betas),
            eps=adamw_eps,
            use_muon=True,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # An AdamW group without its own lr takes adamw_lr, not Muon's much larger default.
        if param_group.get("use_muon", True) is False and "lr" not in param_group:
            param_group["lr"] = self._adamw_lr
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["use_muon"]:
            flat = [p for p in group["params"] if p.ndim < 2]
            if flat:
                raise ValueError(
                    f"Muon: {len(flat)} parameter(s) with < 2 dims in a use_muon group; give them "
                    "use_muon=False (muon_param_groups does this)"
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        jobs: list[_Job] = []
        self.last_comm_bytes = 0  # the gather layout adds its bytes as it goes
        for group in self.param_groups:
            if group["use_muon"]:
                jobs += self._muon_updates(group)
            else:
                self._adamw(group)
        self.last_comm_bytes += _orthogonalise_sharded(jobs) if jobs else 0
        for job in jobs:
            self._apply(job.param, job.result, job.lr, job.wd, rms_scale(job.param.shape))
        return loss

    def _ns(self, group: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        def ns(x: torch.Tensor) -> torch.Tensor:
            dtype = self.ns_dtype or (torch.bfloat16 if x.is_cuda else torch.float32)
            return newton_schulz(x, steps=group["ns_steps"], dtype=dtype)

        return ns

    def _muon_updates(self, group: dict[str, Any]) -> list[_Job]:
        """Momentum on local shards; local (or MuonBP block) and gathered NS applied at once;
        full-matrix NS of owner-layout parameters returned as jobs for `_orthogonalise_sharded`."""
        lr, wd = group["lr"], group["weight_decay"]
        ns = self._ns(group)
        jobs = []
        for p in group["params"]:
            if p.grad is None:
                continue
            update = self._momentum_update(p, group)
            layout = _layout(p)
            full_step = int(self.state[p]["step"].item()) % group["period"] == 0
            if layout.kind == "owner" and full_step:
                job = _Job(p, update, layout.mesh_dim, layout.dim, ns)
                job.lr, job.wd = lr, wd
                jobs.append(job)
            elif layout.kind == "gather" and full_step:
                ortho, sent = _orthogonalise_gathered(p, update, layout.whole, ns)
                self.last_comm_bytes += sent
                self._apply(p, ortho, lr, wd, rms_scale(p.shape))
            elif update.numel():
                # Local layout: every matrix is whole here. MuonBP block step: this rank's
                # slice, orthogonalised on its own, scaled by its own shape.
                self._apply(p, ns(update), lr, wd, rms_scale(update.shape))
        return jobs

    def _momentum_update(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Advance the momentum of `p` on its local shard; the update NS will orthogonalise."""
        state = self.state[p]
        if "momentum_buffer" not in state:  # by key: a wrapper may already own keys here
            state["momentum_buffer"] = torch.zeros_like(p)
            state["step"] = torch.tensor(0.0)
        state["step"] += 1
        mu = group["momentum"]
        grad, buf = _local(p.grad), _local(state["momentum_buffer"])
        buf.mul_(mu).add_(grad)
        return grad.add(buf, alpha=mu) if group["nesterov"] else buf

    @staticmethod
    def _apply(p: torch.Tensor, ortho: torch.Tensor, lr: float, wd: float, scale: float) -> None:
        local = _local(p)
        if wd:
            local.mul_(1.0 - lr * wd)
        local.add_(ortho.to(local.dtype), alpha=-lr * scale)

    def _adamw(self, group: dict[str, Any]) -> None:
        """Decoupled-weight-decay Adam on local shards (element-wise: no communication)."""
        (beta1, beta2), eps, lr, wd = (
            group["betas"],
            group["eps"],
            group["lr"],
            group["weight_decay"],
        )
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
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
