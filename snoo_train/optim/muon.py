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
    besides EP). Same-shape matrices split on the same dim form a bucket; each step the bucket's
    matrices are dealt round-robin to the ranks of that dim's group, ONE all-to-all sends every
    rank's slices of them, stacked, to their owners, each owner orthogonalises all its whole
    matrices in one batched NS, and one all-to-all sends the slices back: 2 collectives per
    bucket (not per matrix), each rank does about 1/N of the work and receives only the matrices
    it owns (the scheme of microsoft/dion and torchtitan's DistMuon, written with
    `all_to_all_single`, which gloo and NCCL both implement; `_Exchange`).
  * gather: several mesh dims split the matrix (TP x FSDP: Shard/_StridedShard on two dims):
    the update is all-gathered over exactly those dims, NS runs on the whole matrix and each
    rank keeps its own slice (`_orthogonalise_gathered` says why and what it costs).
The result equals single-process Muon up to floating-point reassociation (batched NS is
bitwise equal to NS matrix by matrix on CPU). Layouts and buckets are planned once per param
group (`_GroupPlan`) and planned afresh when the groups change (add_param_group,
load_state_dict). Momentum and the update are applied with torch._foreach_ ops, NS is compiled
on CUDA, and the AdamW part is torch's functional AdamW (fused on accelerators, foreach
elsewhere: `adamw_implementation`).

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
from torch.optim.adamw import adamw as _functional_adamw

from snoo_train.optim._dtensor import local as _local
from snoo_train.optim.kernels import kernel_flags, place_step

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


class _OwnerBucket:
    """Same-shape owner-layout matrices of one param group that share a process group and split
    dim: exchanged with ONE all-to-all each way per step. Fixed between steps (cached)."""

    def __init__(self, p: torch.Tensor, layout: _Layout):
        mesh = p.device_mesh
        self.group = mesh.get_group(layout.mesh_dim)
        self.size = mesh.size(layout.mesh_dim)
        self.rank = dist.get_rank(self.group)
        self.dim = layout.dim
        self.shape = tuple(p.shape)
        self.length = p.shape[layout.dim]
        self.chunk = -(-self.length // self.size)  # torch.chunk's (and DTensor's) slice size
        # The local shape, not the global one: another mesh dim (EP) may split a leading dim.
        self.slice_shape = list(_local(p).shape)
        self.slice_shape[self.dim] = self.chunk


class _Exchange:
    """One step of one bucket: this rank's slices of its M matrices go, stacked, to their owners
    (matrix i to rank (offset + i) % N) in one all-to-all; each owner runs one batched NS on the
    whole matrices it received; a second all-to-all brings every rank its slices back.

    Why all-to-all: it moves exactly what the gather + scatter pair per matrix moved, in 2
    collectives per bucket instead of 2 per matrix, on gloo and NCCL alike (both implement
    `all_to_all_single` with uneven splits along dim 0, which lets owners hold different counts).
    """

    def __init__(self, bucket: _OwnerBucket, params: list, updates: list, offset: int):
        self.bucket, self.params, self.updates = bucket, params, updates
        n, dim = bucket.size, bucket.dim
        owners = [(offset + i) % n for i in range(len(params))]
        # Send order: grouped by owner, so owner r's matrices are one contiguous run of dim 0.
        self.order = sorted(range(len(params)), key=owners.__getitem__)
        self.counts = [owners.count(r) for r in range(n)]
        self.mine = self.counts[bucket.rank]
        send = updates[0].new_empty([len(params), *bucket.slice_shape])
        for row, i in enumerate(self.order):
            u = updates[i]
            send[row].narrow(dim, 0, u.shape[dim]).copy_(u)
            if u.shape[dim] < bucket.chunk:  # the last ranks' slices of an uneven split
                send[row].narrow(dim, u.shape[dim], bucket.chunk - u.shape[dim]).zero_()
        self.recv = send.new_empty([n * self.mine, *bucket.slice_shape])
        self.work = dist.all_to_all_single(
            self.recv, send, [self.mine] * n, self.counts, group=bucket.group, async_op=True
        )
        slice_bytes = send[0].numel() * send.element_size() if len(params) else 0
        self.sent = (len(params) - self.mine) * slice_bytes + (n - 1) * self.mine * slice_bytes

    def orthogonalise_and_return(self, ns: Callable) -> None:
        """Wait for the slices, NS this rank's whole matrices at once, send the slices back."""
        b, d = self.bucket, self.bucket.dim + 1  # + 1: the stacking dim in front
        self.work.wait()
        back = self.recv
        if self.mine:
            # [N (from rank), mine, *slice] -> [mine, ..., N * chunk, ...]: the whole matrices.
            whole = (
                self.recv.view(b.size, self.mine, *b.slice_shape).movedim(0, d).flatten(d, d + 1)
            )
            ortho = ns(whole.narrow(d, 0, b.length))
            if b.length < b.size * b.chunk:
                padded = ortho.new_zeros(whole.shape)
                padded.narrow(d, 0, b.length).copy_(ortho)
                ortho = padded
            back = ortho.unflatten(d, (b.size, b.chunk)).movedim(d, 0).reshape(self.recv.shape)
        self.result = back.new_empty([len(self.params), *b.slice_shape])
        self.work = dist.all_to_all_single(
            self.result, back.contiguous(), self.counts, [self.mine] * b.size, group=b.group,
            async_op=True,
        )  # fmt: skip

    def results(self) -> list[torch.Tensor]:
        """This rank's slice of each orthogonalised matrix, in the order of `params`."""
        self.work.wait()
        out: list[torch.Tensor] = [None] * len(self.params)  # type: ignore[list-item]
        for row, i in enumerate(self.order):
            out[i] = self.result[row].narrow(
                self.bucket.dim, 0, self.updates[i].shape[self.bucket.dim]
            )
        return out


class _GroupPlan:
    """What stays fixed between steps for one Muon param group: each parameter's layout and its
    owner bucket. Rebuilt only when the param groups change (add_param_group, load_state_dict)."""

    def __init__(self, group: dict[str, Any]):
        self.group = group  # held, so the identity check in `Muon._plan` cannot see a reused id
        self.layouts = [_layout(p) for p in group["params"]]
        buckets: dict[tuple, _OwnerBucket] = {}
        self.buckets: list[_OwnerBucket | None] = []
        for p, layout in zip(group["params"], self.layouts):
            bucket = None
            if layout.kind == "owner":
                key = (
                    id(p.device_mesh.get_group(layout.mesh_dim)),
                    layout.dim,
                    tuple(p.shape),
                    tuple(_local(p).shape[: layout.dim]),
                    p.dtype,
                )
                bucket = buckets.get(key) or buckets.setdefault(key, _OwnerBucket(p, layout))
            self.buckets.append(bucket)


def _compiled_newton_schulz() -> Callable:
    """newton_schulz compiled once per process (CUDA only: on CPU compiling costs more than it saves)."""
    global _COMPILED_NS
    if _COMPILED_NS is None:
        _COMPILED_NS = torch.compile(newton_schulz, fullgraph=True)
    return _COMPILED_NS


_COMPILED_NS: Callable | None = None


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
        adamw_implementation: the AdamW rule's kernel, auto | fused | foreach | forloop
            (snoo_train/optim/kernels.py; auto: fused on accelerators, foreach elsewhere).
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
        adamw_implementation: str = "auto",
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
        self.adamw_implementation = adamw_implementation
        self.ns_dtype = ns_dtype
        self.last_comm_bytes = 0  # bytes this rank sent in the last step (the benchmark reads it)
        self._plans: dict[int, _GroupPlan] = {}
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
        self._plans = {}
        group = self.param_groups[-1]
        if not group["use_muon"]:
            kernel_flags(group["params"], self.adamw_implementation)  # refuses fused where torch cannot
        if group["use_muon"]:
            flat = [p for p in group["params"] if p.ndim < 2]
            if flat:
                raise ValueError(
                    f"Muon: {len(flat)} parameter(s) with < 2 dims in a use_muon group; give them "
                    "use_muon=False (muon_param_groups does this)"
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict (and unpickling) replaces param_groups with new dicts: plans go stale.
        super().__setstate__(state)
        self._plans = {}

    def _plan(self, group: dict[str, Any]) -> _GroupPlan:
        plan = self._plans.get(id(group))
        if plan is None or plan.group is not group:
            plan = self._plans[id(group)] = _GroupPlan(group)
        return plan

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_comm_bytes = 0
        exchanges: list[tuple[_Exchange, dict[str, Any]]] = []
        offsets: dict[int, int] = {}  # per process group: where the round-robin deal goes on
        for group in self.param_groups:
            if group["use_muon"]:
                exchanges += [(x, group) for x in self._muon_group(group, offsets)]
            else:
                self._adamw(group)
        # All exchanges are in flight before the first wait: NS of one bucket overlaps the
        # communication of the others.
        for exchange, group in exchanges:
            exchange.orthogonalise_and_return(self._ns(group))
        for exchange, group in exchanges:
            scale = rms_scale(exchange.bucket.shape)
            self._apply(exchange.params, exchange.results(), group, scale)
            self.last_comm_bytes += exchange.sent
        return loss

    def _ns(self, group: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        def ns(x: torch.Tensor) -> torch.Tensor:
            dtype = self.ns_dtype or (torch.bfloat16 if x.is_cuda else torch.float32)
            fn = _compiled_newton_schulz() if x.is_cuda else newton_schulz
            return fn(x, steps=group["ns_steps"], dtype=dtype)

        return ns

    def _muon_group(self, group: dict[str, Any], offsets: dict[int, int]) -> list[_Exchange]:
        """Momentum on local shards (foreach); local (or MuonBP block) and gathered NS applied at
        once, same-shape matrices batched; owner-layout buckets returned as started exchanges."""
        plan = self._plan(group)
        present = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        if not present:
            return []
        params = [group["params"][i] for i in present]
        updates, steps = self._momentum_updates(params, group)
        period, ns = group["period"], self._ns(group)
        local: dict[tuple, list[int]] = {}  # (shape, dtype, device) -> positions in `params`
        owned: dict[int, tuple[_OwnerBucket, list[int]]] = {}
        for j, i in enumerate(present):
            layout, p, update = plan.layouts[i], params[j], updates[j]
            full_step = period == 1 or int(steps[j].item()) % period == 0  # CPU tensor: no sync
            if layout.kind == "owner" and full_step:
                bucket = plan.buckets[i]
                owned.setdefault(id(bucket), (bucket, []))[1].append(j)
            elif layout.kind == "gather" and full_step:
                ortho, sent = _orthogonalise_gathered(p, update, layout.whole, ns)
                self.last_comm_bytes += sent
                self._apply([p], [ortho], group, rms_scale(p.shape))
            elif update.numel():
                # Local layout: every matrix is whole here. MuonBP block step: this rank's
                # slice, orthogonalised on its own, scaled by its own shape.
                local.setdefault((tuple(update.shape), update.dtype, update.device), []).append(j)
        for (shape, _, _), members in local.items():
            ortho = ns(torch.stack([updates[j] for j in members]))
            self._apply(
                [params[j] for j in members], list(ortho.unbind(0)), group, rms_scale(shape)
            )
        exchanges = []
        for bucket, members in owned.values():
            offset = offsets.get(id(bucket.group), 0)
            offsets[id(bucket.group)] = offset + len(members)
            exchanges.append(
                _Exchange(
                    bucket, [params[j] for j in members], [updates[j] for j in members], offset
                )
            )
        return exchanges

    def _momentum_updates(
        self, params: list[torch.Tensor], group: dict[str, Any]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Advance the momentum of `params` on their local shards (foreach); returns the updates
        NS will orthogonalise and the step counters."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "momentum_buffer" not in state:  # by key: a wrapper may already own keys here
                state["momentum_buffer"] = torch.zeros_like(p)
                state["step"] = torch.tensor(0.0)
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1.0)
        mu = group["momentum"]
        grads = [_local(p.grad) for p in params]
        bufs = [_local(state["momentum_buffer"]) for state in states]
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        updates = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
        return updates, steps

    @staticmethod
    def _apply(
        params: list[torch.Tensor], orthos: list[torch.Tensor], group: dict[str, Any], scale: float
    ) -> None:
        """p = p * (1 - lr * wd) - lr * scale * O, for same-shape parameters at once."""
        lr, wd = group["lr"], group["weight_decay"]
        locals_ = [_local(p) for p in params]
        if wd:
            torch._foreach_mul_(locals_, 1.0 - lr * wd)
        orthos = [o.to(t.dtype) for o, t in zip(orthos, locals_)]
        torch._foreach_add_(locals_, orthos, alpha=-lr * scale)

    def _adamw(self, group: dict[str, Any]) -> None:
        """torch's functional AdamW on local shards (element-wise, no communication), with the
        kernel `adamw_implementation` picks; fused keeps the step counters on the device."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        flags = kernel_flags(params, self.adamw_implementation, default_foreach=True)
        fused = bool(flags["fused"])
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
                # where the kernel reads it, as torch's AdamW: on CPU (no host sync) unless fused
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            else:  # a checkpoint written with another kernel (metadata only, unless it must move)
                state["step"] = place_step(state["step"], p, fused)
        beta1, beta2 = group["betas"]
        _functional_adamw(
            [_local(p) for p in params],
            [_local(p.grad) for p in params],
            [_local(state["exp_avg"]) for state in states],
            [_local(state["exp_avg_sq"]) for state in states],
            [],
            [state["step"] for state in states],
            foreach=flags["foreach"],
            fused=flags["fused"],
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
