"""Every optimizer in snoo_train.optim on N-D device meshes (issue 14, part 4), at world size 4.

Parameters are DTensors with the placements tensor parallel, FSDP over it and expert parallel
give them on a (shard=2, tp=2) mesh: (Shard(0), Shard(1)) for a row-wise weight under FSDP,
(_StridedShard(0), Shard(0)) for a column-wise one, uneven slices, one mesh dim only, expert
stacks [E, out, in] split on the expert dim (EP) and also on a matrix dim (EP x FSDP). Every rank
feeds the same gradients, and after several steps (three SNOO outer steps) the full tensors must
equal a single-process run on plain tensors within 1e-5 (fp32):
  * SNOO(AdamW) and Lookahead against torch's AdamW plus the outer step written here;
  * GPA, EMA-Nesterov, Schedule-Free AdamW, Muon and SNOO(Muon) against the same class on plain
    tensors: their math is checked against the published equations in test_outer_family.py and
    test_muon.py; what is checked here is that sharding does not change it.
Also: every state tensor is a DTensor with its parameter's mesh and placements; the element-wise
optimizers issue no collective in step(); Muon under EP communicates nothing and under EP x FSDP
only within the FSDP dim; DiLoCo replicas (replicate=2 x shard=2, and replicate=2 x TP 2) equal
two replicas averaged by hand, with exactly one all-reduce per outer step over the replicate dim.
All cases share one spawn of four gloo processes.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from snoo_train.optim import GPA, SNOO, EMANesterov, Muon, ScheduleFreeAdamW
from tests.dist_utils import run_distributed

STEPS, K, OUTER_LR, OUTER_MU = 6, 2, 0.7, 0.5  # three outer steps
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
TOL = dict(atol=1e-5, rtol=0.0)

# name: (shape, placements on the (shard, tp) mesh)
LAYOUTS = {
    "rowwise_tp_x_fsdp": ((8, 6), (Shard(0), Shard(1))),
    "colwise_tp_x_fsdp": ((8, 6), (_StridedShard(0, split_factor=2), Shard(0))),
    "uneven_2d": ((7, 5), (Shard(0), Shard(1))),
    "uneven_colwise": ((7, 5), (_StridedShard(0, split_factor=2), Shard(0))),
    "tp_only": ((6, 10), (Replicate(), Shard(0))),
    "fsdp_only": ((10, 6), (Shard(0), Replicate())),
    "replicated": ((4, 4), (Replicate(), Replicate())),
    "experts_ep": ((4, 6, 5), (Replicate(), Shard(0))),
    "experts_ep_x_fsdp": ((4, 6, 5), (Shard(1), Shard(0))),
    "experts_ep_x_fsdp_on_experts": ((4, 6, 5), (_StridedShard(0, split_factor=2), Shard(0))),
    "experts_split_matrix": ((3, 6, 4), (Shard(1), Shard(2))),
    "norm": ((6,), (Shard(0), Replicate())),
}


# -- parameters, gradients, references ---------------------------------------------------------


def initial(shape: tuple[int, ...], index: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + index))


def gradient(shape: tuple[int, ...], index: int, step: int, replica: int = 0) -> torch.Tensor:
    seed = 10_000 * replica + 100 * step + index
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def make_params(mesh, layouts: dict) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The same values twice: DTensors with each layout's placements, and plain tensors."""
    sharded, plain = [], []
    for i, (shape, placements) in enumerate(layouts.values()):
        full = initial(shape, i)
        sharded.append(torch.nn.Parameter(distribute_tensor(full, mesh, placements, src_data_rank=None)))
        plain.append(torch.nn.Parameter(full.clone()))
    return sharded, plain


def set_grads(sharded: list, plain: list, step: int, replica: int = 0) -> None:
    for i, (p, q) in enumerate(zip(sharded, plain)):
        g = gradient(tuple(q.shape), i, step, replica)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        q.grad = g.clone()


class RefSNOO:
    """torch's AdamW on plain tensors, and every k steps the outer Nesterov step written out:
    s = w - p, b = mu b + s, w = w - eta (s + mu b), p = w (the replicas' s averaged)."""

    def __init__(self, replicas: list[list[torch.Tensor]], momentum: float):
        self.replicas, self.momentum, self.t = replicas, momentum, 0
        self.inner = [torch.optim.AdamW(params, **ADAMW) for params in replicas]
        self.slow = [p.detach().clone() for p in replicas[0]]
        self.buf = [torch.zeros_like(p) for p in replicas[0]]
        self.last_pseudo_grad: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self) -> None:
        for inner in self.inner:
            inner.step()
        self.t += 1
        if self.t % K:
            return
        self.last_pseudo_grad = []
        for i, (w, b) in enumerate(zip(self.slow, self.buf)):
            s = sum(w - params[i] for params in self.replicas) / len(self.replicas)
            self.last_pseudo_grad.append(s.clone())
            b.mul_(self.momentum).add_(s)
            w.sub_(OUTER_LR * (s + self.momentum * b))
            for params in self.replicas:
                params[i].copy_(w)


def muon_groups(params: list) -> list[dict]:
    return [
        {"params": [p for p in params if p.ndim >= 2], "use_muon": True},
        {"params": [p for p in params if p.ndim < 2], "use_muon": False},
    ]


def make_muon(params: list) -> Muon:
    return Muon(muon_groups(params), lr=0.05, momentum=0.9, weight_decay=0.1, adamw_lr=1e-2)


def adamw(params: list) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, **ADAMW)


def snoo(inner: torch.optim.Optimizer, momentum: float = OUTER_MU, **kwargs) -> SNOO:
    return SNOO(inner, k=K, lr=OUTER_LR, momentum=momentum, **kwargs)


# name: (build on the sharded parameters, build the plain reference, no collective in step)
OPTIMIZERS = {
    "snoo_adamw": (lambda ps: snoo(adamw(ps)), lambda qs: RefSNOO([qs], OUTER_MU), True),
    "lookahead": (lambda ps: snoo(adamw(ps), momentum=0.0), lambda qs: RefSNOO([qs], 0.0), True),
    "gpa": (lambda ps: GPA(adamw(ps), mu_x=0.9, mu_y=0.7), lambda qs: GPA(adamw(qs), mu_x=0.9, mu_y=0.7), True),
    "ema_nesterov": (
        lambda ps: EMANesterov(adamw(ps), gamma=0.9, beta=0.5),
        lambda qs: EMANesterov(adamw(qs), gamma=0.9, beta=0.5),
        True,
    ),
    "schedule_free": (
        lambda ps: ScheduleFreeAdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda qs: ScheduleFreeAdamW(qs, lr=1e-2, weight_decay=0.1),
        True,
    ),
    "muon": (make_muon, make_muon, False),
    "snoo_muon": (lambda ps: snoo(make_muon(ps)), lambda qs: snoo(make_muon(qs)), False),
}


# -- checks --------------------------------------------------------------------------------


def assert_state_follows_params(opt: torch.optim.Optimizer, params: list, case: str) -> None:
    """Every state tensor is a DTensor with its parameter's mesh and placements; the only
    exception is torch's 0-dim `step` counter (a plain scalar in torch's own optimizers too)."""
    for p in params:
        state = opt.state[p]
        assert state, (case, p.placements)
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or (key == "step" and value.ndim == 0):
                continue
            assert isinstance(value, DTensor), (case, key, type(value))
            assert value.device_mesh == p.device_mesh, (case, key)
            assert value.placements == p.placements, (case, key, value.placements, p.placements)


def assert_equal_full(sharded: list, plain: list, names, case: str) -> None:
    for name, p, q in zip(names, sharded, plain):
        torch.testing.assert_close(p.full_tensor(), q.detach(), **TOL, msg=lambda m, name=name: f"{case} {name}: {m}")


def assert_outer_metrics(opt: SNOO, ref: RefSNOO, case: str) -> None:
    """The global norms SNOO reports count every element once, replicated placements included."""
    metrics = opt.outer_metrics()
    for key, tensors in (("pseudo_grad", ref.last_pseudo_grad), ("slow_weight", ref.slow)):
        expected = torch.cat([t.flatten() for t in tensors]).norm().item()
        got = metrics[f"snoo/{key}_norm"]
        assert abs(got - expected) <= 1e-5 * expected, (case, key, got, expected)


def run_case(mesh, case: str) -> None:
    build, build_ref, no_comm = OPTIMIZERS[case]
    sharded, plain = make_params(mesh, LAYOUTS)
    opt, ref = build(sharded), build_ref(plain)
    collectives = 0
    for step in range(STEPS):
        set_grads(sharded, plain, step)
        with CommDebugMode() as comm:
            opt.step()
        collectives += comm.get_total_counts()
        ref.step()
    assert_equal_full(sharded, plain, LAYOUTS, case)
    assert_state_follows_params(opt, sharded, case)
    if no_comm:
        assert collectives == 0, (case, collectives)
    if isinstance(ref, RefSNOO):
        assert_outer_metrics(opt, ref, case)


def muon_collectives(mesh, names: list[str]) -> tuple[dict[str, int], list[list[int]]]:
    """(collective op -> count, ranks of each group exchanged over) in one Muon step on the given
    layouts only."""
    sharded, _ = make_params(mesh, {n: LAYOUTS[n] for n in names})
    opt = make_muon(sharded)
    for i, p in enumerate(sharded):
        g = gradient(tuple(p.shape), i, 0)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
    groups, originals = [], {name: getattr(dist, name) for name in ("all_to_all_single",)}

    def recording(fn):
        def call(*args, group=None, **kwargs):
            groups.append(dist.get_process_group_ranks(group))
            return fn(*args, group=group, **kwargs)

        return call

    try:
        for name, fn in originals.items():
            setattr(dist, name, recording(fn))
        with CommDebugMode() as comm:
            opt.step()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return {str(op): n for op, n in comm.get_comm_counts().items() if n}, groups


def check_muon_communication(mesh) -> None:
    # EP (FSDP also on the expert dim or not): whole experts on each rank, orthogonalised locally.
    assert muon_collectives(mesh, ["experts_ep", "experts_ep_x_fsdp_on_experts"]) == ({}, [])
    # EP x FSDP: one all-to-all to the owner and one back, within the FSDP ("shard") dim only.
    ops, groups = muon_collectives(mesh, ["experts_ep_x_fsdp"])
    shard_group = dist.get_process_group_ranks(mesh.get_group("shard"))
    assert sum(ops.values()) == len(groups) == 2, (ops, groups)
    assert all(g == shard_group for g in groups), groups
    # TP x FSDP: all-gathers only; each rank's slice of the result is cut locally.
    for name in ("colwise_tp_x_fsdp", "rowwise_tp_x_fsdp"):
        ops, groups = muon_collectives(mesh, [name])
        assert ops and groups == [] and all("all_gather" in op for op in ops), (name, ops)


# -- a module parallelised by torch: TP, then FSDP over it --------------------------------------


def run_module_case(mesh, case: str) -> None:
    """The placements come from parallelize_module + fully_shard, the gradients from a real
    backward (TP's partial sums, FSDP's reduce-scatter); every rank sees the same batch."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))
    model = copy.deepcopy(plain)
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["shard"])
    build, build_ref, _ = OPTIMIZERS[case]
    opt, ref = build(list(model.parameters())), build_ref(list(plain.parameters()))
    for step in range(STEPS):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (plain, ref)):
            m(x).square().mean().backward()
            o.step()
            for p in m.parameters():
                p.grad = None
    names = [n for n, _ in model.named_parameters()]
    assert any(isinstance(p.placements[0], _StridedShard) for p in model.parameters())
    assert_equal_full(list(model.parameters()), list(plain.parameters()), names, f"module {case}")


# -- DiLoCo: replicas of a TP/FSDP-sharded model ------------------------------------------------


def run_diloco(mesh, layouts: dict) -> None:
    """SNOO(AdamW) with replicate_group; replica r feeds its own gradients. Against two plain
    replicas averaged by hand; one all-reduce per outer step, over the replicate dim."""
    inner_mesh = mesh[tuple(n for n in mesh.mesh_dim_names if n != "replicate")]
    replica = mesh.get_local_rank("replicate")
    replicate_group = mesh.get_group("replicate")
    sharded, mine = make_params(inner_mesh, layouts)
    other = [torch.nn.Parameter(q.detach().clone()) for q in mine]
    opt = snoo(adamw(sharded), replicate_group=replicate_group)
    ref = RefSNOO([mine, other] if replica == 0 else [other, mine], OUTER_MU)
    reduced_over, original = [], dist.all_reduce

    def recording(tensor, *args, group=None, **kwargs):
        reduced_over.append(dist.get_process_group_ranks(group))
        return original(tensor, *args, group=group, **kwargs)

    for step in range(STEPS):
        set_grads(sharded, mine, step, replica)
        for i, q in enumerate(other):
            q.grad = gradient(tuple(q.shape), i, step, 1 - replica)
        dist.all_reduce = recording
        try:
            with CommDebugMode() as comm:
                opt.step()
        finally:
            dist.all_reduce = original
        ref.step()
        expected = 1 if (step + 1) % K == 0 else 0
        assert comm.get_total_counts() == expected, (step, comm.get_comm_counts())
    assert reduced_over == [dist.get_process_group_ranks(replicate_group)] * (STEPS // K)
    assert_equal_full(sharded, mine, layouts, f"diloco {mesh.mesh_dim_names}")
    assert_state_follows_params(opt, sharded, "diloco")
    assert_outer_metrics(opt, ref, "diloco")


def _worker(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("shard", "tp"))
    for case in OPTIMIZERS:
        run_case(mesh, case)
    check_muon_communication(mesh)
    for case in ("snoo_adamw", "snoo_muon"):
        run_module_case(mesh, case)
    fsdp_layouts = {
        "rows": ((8, 6), (Shard(0),)),
        "cols_uneven": ((5, 7), (Shard(1),)),
        "norm": ((6,), (Shard(0),)),
    }
    run_diloco(init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")), fsdp_layouts)
    tp_mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("replicate", "shard", "tp"))
    run_diloco(tp_mesh, {n: LAYOUTS[n] for n in ("rowwise_tp_x_fsdp", "colwise_tp_x_fsdp", "tp_only", "norm")})


def test_every_optimizer_on_tp_ep_and_diloco_meshes():
    run_distributed(_worker, 4)
