"""Muon and MuonBP (snoo_train.optim.muon) against an independent reference written here:
Newton-Schulz vs the SVD polar factor, per-expert orthogonalisation, the parameter split,
single-process and FSDP2-sharded Muon (world sizes 2 and 4) vs the reference, MuonBP, and the
collectives one sharded step issues: two all-to-alls per group of same-shape matrices."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.debug import CommDebugMode

from snoo_train.config import ModelConfig
from snoo_train.models import PRESETS, build_model, materialize, parallelize
from snoo_train.optim import SNOO, Muon, categorize_parameters, muon_param_groups, newton_schulz
from tests.dist_utils import run_distributed

VOCAB = 257
# The published quintic coefficients, restated here so the reference owes nothing to the code.
A, B, C = 3.4445, -4.7750, 2.0315
HP = dict(lr=0.05, adamw_lr=1e-2, weight_decay=0.1, momentum=0.9, betas=(0.9, 0.95), eps=1e-8)
# Odd sizes on purpose: 3 experts (2 + 1 per rank at 2 ranks; fewer than 4 ranks: sharded on
# dim 1 at 4), and k/v projections of 14 rows (uneven slices 4/4/4/2 at 4 ranks). Top-2, not
# top-1: a top-1 router's renormalised weight is always 1, so its gradient would be pure
# rounding noise, which Adam blows up to full-size steps.
SHARD_CFG = ModelConfig(
    name="muon_test",
    family="moe",
    hidden_size=56,
    intermediate_size=96,
    num_layers=1,
    num_heads=4,
    num_kv_heads=1,
    num_experts=3,
    num_experts_per_tok=2,
    moe_intermediate_size=36,
)


# -- an independent reference -------------------------------------------------------------------


def ref_ns(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Quintic Newton-Schulz on ONE matrix, fp32."""
    x = m.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.t()
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        s = x @ x.t()
        x = A * x + (B * s + C * (s @ s)) @ x
    return x.t() if tall else x


def ref_orthogonalise(u: torch.Tensor, blocks: int = 1, dim: int = 0) -> torch.Tensor:
    """Per-matrix (per-expert for 3-D) NS, times sqrt(max(1, rows/cols)); with blocks > 1 each
    torch.chunk slice along `dim` is treated as a matrix of its own (MuonBP's block step)."""
    if u.ndim == 3:
        return torch.stack([ref_orthogonalise(e, blocks, dim - 1 if dim else 0) for e in u])
    pieces = []
    for piece in torch.chunk(u, blocks, dim=dim):
        scale = max(1.0, piece.shape[0] / piece.shape[1]) ** 0.5
        pieces.append(ref_ns(piece) * scale)
    return torch.cat(pieces, dim=dim)


def ref_categories(name: str, p: torch.Tensor) -> str:
    if "embed_tokens" in name:
        return "embedding"
    if p.ndim == 1:
        return "vector"
    if name.endswith("mlp.gate.weight"):
        return "router"
    return "expert" if p.ndim == 3 else "matrix"


class RefMuon:
    """Muon (Nesterov momentum, NS, decoupled decay) on matrices/experts; torch AdamW on the rest.
    `blocks(name, p, step)` gives (number of row blocks, dim) for MuonBP; (1, 0) is plain Muon."""

    def __init__(self, model, blocks=lambda name, p, step: (1, 0)):
        self.params = {n: p for n, p in model.named_parameters()}
        self.muon = {
            n for n, p in self.params.items() if ref_categories(n, p) in ("matrix", "expert")
        }
        # Embedding, norms and router: torch's AdamW, no weight decay.
        rest = [p for n, p in self.params.items() if n not in self.muon]
        self.adamw = torch.optim.AdamW(
            rest, lr=HP["adamw_lr"], betas=HP["betas"], eps=HP["eps"], weight_decay=0.0
        )
        self.buf = {n: torch.zeros_like(self.params[n]) for n in self.muon}
        self.blocks, self.t = blocks, 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        for n in sorted(self.muon):
            p = self.params[n]
            self.buf[n] = HP["momentum"] * self.buf[n] + p.grad
            u = p.grad + HP["momentum"] * self.buf[n]
            p.mul_(1 - HP["lr"] * HP["weight_decay"])
            p.sub_(HP["lr"] * ref_orthogonalise(u, *self.blocks(n, p, self.t)))
        self.adamw.step()

    def zero_grad(self):
        for p in self.params.values():
            p.grad = None


def make_muon(model, period: int = 1) -> Muon:
    groups = muon_param_groups(
        model, lr=HP["lr"], adamw_lr=HP["adamw_lr"], weight_decay=HP["weight_decay"]
    )
    return Muon(
        groups, momentum=HP["momentum"], period=period, adamw_betas=HP["betas"], adamw_eps=HP["eps"]
    )


def batch(seed: int = 1, n: int = 4, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, VOCAB, (n, seq + 1), generator=g)
    return w[:, :-1], w[:, 1:]


def backward(model, step: int) -> None:
    x, y = batch(seed=step)
    F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten()).backward()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


# -- Newton-Schulz ---------------------------------------------------------------------------


def random_matrix(rows: int, cols: int, low: float, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U, V and singular values uniform in [low, 1]."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    s = low + (1 - low) * torch.rand(k, generator=gen)
    return u @ torch.diag(s) @ v.t()


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (20, 80)])
def test_newton_schulz_is_close_to_the_polar_factor(shape):
    g = random_matrix(*shape, low=0.05)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    out = newton_schulz(g)
    sv = torch.linalg.svdvals(out)
    # The quintic's known band: 5 steps put every singular value that is not tiny next to the
    # largest (here >= 5% of it) in about [0.7, 1.2], not at exactly 1.
    assert sv.min() > 0.6 and sv.max() < 1.25, sv.aminmax()
    # Same singular vectors as the polar factor: out = U diag(s') V^T, so U^T out V is diagonal.
    inner = u.t() @ out @ vh.t()
    assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-4)
    # A converging (cubic) iteration reaches the polar factor itself.
    exact = newton_schulz(g, steps=60, coefficients=(1.5, -0.5, 0.0))
    assert torch.allclose(exact, polar, atol=1e-4)
    # On a plain Gaussian matrix (some singular values near 0) the band's top still holds.
    assert torch.linalg.svdvals(newton_schulz(torch.randn(*shape))).max() < 1.25


def test_expert_stack_is_orthogonalised_per_expert():
    gen = torch.Generator().manual_seed(0)
    # Experts with wildly different scales: one Frobenius norm over the stack would crush the
    # small ones, so only a per-expert normalisation gives each singular values near 1.
    stack = torch.randn(3, 24, 16, generator=gen) * torch.tensor([1e-3, 1.0, 1e3]).view(3, 1, 1)
    out = newton_schulz(stack)
    for e in range(3):
        assert torch.allclose(out[e], ref_ns(stack[e]), atol=1e-5)
        sv = torch.linalg.svdvals(out[e])
        assert sv.min() > 0.6 and sv.max() < 1.25


# -- the split --------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["llama_tiny", "moe_tiny"])
def test_categories_and_groups(preset):
    model = build_model(PRESETS[preset], VOCAB, seed=0)
    cats = categorize_parameters(model)
    named = dict(model.named_parameters())
    assert cats == {n: ref_categories(n, named[n]) for n in cats}
    assert len(cats) == len(named)  # tied head: one parameter, the embedding
    groups = muon_param_groups(model)
    muon = {id(p) for g in groups if g["use_muon"] for p in g["params"]}
    assert muon == {id(named[n]) for n, c in cats.items() if c in ("matrix", "expert")}
    with pytest.raises(ValueError, match="vector"):
        muon_param_groups(model, muon_categories=["matrix", "vector"])
    with pytest.raises(ValueError, match="< 2 dims"):
        Muon(model.parameters())


# -- single process --------------------------------------------------------------------------


@pytest.mark.parametrize("period", [1, 3])
def test_single_process_muon_matches_the_reference(period):
    # On one process a MuonBP block is the whole matrix: every period equals plain Muon.
    model = build_model(PRESETS["moe_tiny"], VOCAB, seed=0)
    ref_model = build_model(PRESETS["moe_tiny"], VOCAB, seed=0)
    opt, ref = make_muon(model, period=period), RefMuon(ref_model)
    for step in range(1, 4):
        for m, o in ((model, opt), (ref_model, ref)):
            backward(m, step)
            o.step()
            o.zero_grad()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, atol=2e-5, rtol=1e-4), n  # Adam magnifies fp reassociation
    assert opt.last_comm_bytes == 0
    keys = {frozenset(s) for s in opt.state_dict()["state"].values()}
    assert keys == {
        frozenset({"momentum_buffer", "step"}),
        frozenset({"exp_avg", "exp_avg_sq", "step"}),
    }


def test_a_reloaded_muon_continues_exactly():
    # The per-group plans (layouts, buckets) are cached across steps; load_state_dict replaces
    # the param groups, so a reloaded optimizer must plan afresh and step exactly as before.
    models = [build_model(PRESETS["moe_tiny"], VOCAB, seed=0) for _ in range(2)]
    opts = [make_muon(m) for m in models]
    for step in (1, 2):
        for m, o in zip(models, opts):
            backward(m, step)
            o.step()
            o.zero_grad()
    plans_before = dict(opts[1]._plans)
    opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))  # torch would share tensors
    assert not opts[1]._plans
    for m, o in zip(models, opts):
        backward(m, 3)
        o.step()
    assert all(opts[1]._plans[id(g)].group is g for g in opts[1].param_groups if g["use_muon"])
    assert not set(map(id, plans_before.values())) & set(map(id, opts[1]._plans.values()))
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


def test_snoo_wraps_muon_without_special_cases():
    model = build_model(PRESETS["moe_tiny"], VOCAB, seed=0)
    opt = SNOO(make_muon(model), k=2, lr=0.7, momentum=0.5)
    for step in range(1, 5):
        backward(model, step)
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        state = opt.state[p]
        assert "snoo_slow" in state and "step" in state
        # Muon's and SNOO's keys side by side in one state dict.
        assert ("momentum_buffer" in state) == (ref_categories(name, p) in ("matrix", "expert"))
        assert torch.equal(state["snoo_slow"], p)  # step 4 was an outer step: fast == slow


# -- FSDP2 -----------------------------------------------------------------------------------


def _shard_dim(name: str, p: torch.Tensor, world_size: int) -> int:
    # The layout parallelize() promises: experts on the expert dim unless ranks outnumber them.
    return 1 if p.ndim == 3 and p.shape[0] < world_size else 0


def _sharded_muon_worker(rank: int, world_size: int) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    for period in (1, 2):
        ref_model = build_model(SHARD_CFG, VOCAB, seed=0)
        model = parallelize(build_model(SHARD_CFG, VOCAB, seed=0, device="meta"), mesh=mesh)
        materialize(model, device="cpu", seed=0)
        for name, p in model.named_parameters():
            assert p.placements == (Shard(_shard_dim(name, p, world_size)),), (name, p.placements)

        def blocks(name, p, step, period=period):
            if step % period == 0:
                return (1, 0)
            if p.ndim == 3 and p.shape[0] >= world_size:
                return (1, 0)  # whole experts on each rank: the block step is the full step
            return (world_size, _shard_dim(name, p, world_size))

        opt, ref = make_muon(model, period=period), RefMuon(ref_model, blocks)
        sent, collectives = [], []
        for step in range(1, 4):
            for m, o in ((model, opt), (ref_model, ref)):
                backward(m, step)  # the same batch on every rank: the averaged gradient is its own
                with CommDebugMode() as comm:
                    o.step()
                o.zero_grad()
                if o is opt:
                    collectives.append({str(op): n for op, n in comm.get_comm_counts().items() if n})
            sent.append(opt.last_comm_bytes)
        # One all-to-all to the owners and one back per group of same-shape matrices split on the
        # same dim (not one gather + one scatter per matrix); block steps communicate nothing.
        owner_split = [
            (tuple(p.shape), p.placements[0].dim)
            for n, p in model.named_parameters()
            if ref_categories(n, p) in ("matrix", "expert") and p.placements[0].dim >= p.ndim - 2
        ]
        groups = len(set(owner_split))
        assert groups < len(owner_split)  # some groups hold several matrices: batching is tested
        for step, counts in enumerate(collectives, start=1):
            want = {"c10d.alltoall_base_": 2 * groups} if step % period == 0 else {}
            assert counts == want, (period, step, counts, want)
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            got = full(p)
            assert torch.allclose(got, q, atol=2e-5, rtol=1e-4), (period, n, (got - q).abs().max())
        # MuonBP's block steps (1 and 3 at period 2) communicate nothing; a full step does.
        assert sent[1] > 0
        assert (sent[0] == 0) == (period == 2) and (sent[2] == 0) == (period == 2), sent


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_muon_and_muonbp_match_the_reference(world_size):
    run_distributed(_sharded_muon_worker, world_size)
