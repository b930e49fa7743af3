"""optim.implementation (snoo_train/optim/kernels.py): the fused, foreach and per-parameter AdamW
kernels train alike, against torch.optim.AdamW written out in the test, on plain parameters and on
FSDP2 shards (DTensors) at world size 2; `fused` where torch cannot fuse is refused at build time;
a loaded checkpoint keeps the kernel the run asked for."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from snoo_train.config import ConfigError, OptimConfig, validate_config
from snoo_train.optim.build import build_optimizer
from snoo_train.optim.kernels import KernelUnavailable
from snoo_train.optim.muon import Muon
from tests.conftest import make_config
from tests.dist_utils import run_distributed

LR, WD, STEPS = 1e-2, 0.1, 4
KERNELS = ("fused", "foreach", "forloop", "auto")


class Net(nn.Module):
    """Two matrices (decayed) and a norm (not): the trainer's two weight-decay groups."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.norm, self.b = nn.Linear(8, 16, bias=False), nn.LayerNorm(16), nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


def gradients(step: int, model: nn.Module) -> list[torch.Tensor]:
    """Fixed gradients for `step`, one per parameter, the same for every copy of the model."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


def reference_adamw(model: nn.Module) -> torch.optim.AdamW:
    """torch's AdamW with the trainer's decay split written out: matrices decay, the norm does not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def train(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    for step in range(STEPS):
        for p, g in zip(model.parameters(), gradients(step, model)):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def adamw_config(implementation: str) -> OptimConfig:
    return OptimConfig(inner="adamw", lr=LR, weight_decay=WD, implementation=implementation)


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """How many times torch's fused AdamW kernel ran (one call per device and dtype group)."""
    calls: list[int] = []
    original = torch._fused_adamw_

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counting)
    return calls


@pytest.mark.parametrize("implementation", KERNELS)
def test_every_kernel_trains_like_torch_adamw(implementation, fused_calls):
    want = train(ref := Net(), reference_adamw(ref))
    model = Net()
    opt = build_optimizer(model, adamw_config(implementation))
    got = train(model, opt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    fused = implementation == "fused"
    # auto on CPU is torch's own default (the per-parameter loop): the golden losses stay put.
    assert {g["fused"] for g in opt.param_groups} == ({True} if fused else {False} if implementation != "auto" else {None})
    assert (len(fused_calls) > 0) == fused
    if fused:
        assert all(opt.state[p]["step"].dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("implementation", KERNELS)
def test_muon_adamw_part_follows_the_kernel(implementation, fused_calls):
    ref = Net()
    want = train(ref, reference_adamw(ref))
    model = Net()
    groups = [
        {"params": [model.a.weight, model.b.weight], "use_muon": False, "lr": LR, "weight_decay": WD},
        {"params": list(model.norm.parameters()), "use_muon": False, "lr": LR, "weight_decay": 0.0},
    ]
    got = train(model, Muon(groups, adamw_betas=(0.9, 0.95), adamw_implementation=implementation))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    assert (len(fused_calls) > 0) == (implementation == "fused")


def test_fused_where_torch_cannot_fuse_is_refused_at_build_time():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(KernelUnavailable, match="optim.implementation=fused: .* on meta"):
        build_optimizer(model, adamw_config("fused"))
    with pytest.raises(KernelUnavailable, match="optim.implementation=fused"):
        Muon([{"params": list(model.parameters()), "use_muon": False}], adamw_implementation="fused")
    # auto never refuses: it fuses only what torch can.
    assert build_optimizer(model, adamw_config("auto")).param_groups[0]["fused"] is None


def test_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="optim.implementation='fast'"):
        make_config(tmp_path, ["optim.implementation=fast"])
    with pytest.raises(ConfigError, match="optim.implementation=fused: optim.inner=schedule_free_adamw"):
        make_config(tmp_path, ["optim=schedule_free_adamw", "optim.implementation=fused"])
    cfg = make_config(tmp_path, ["optim=muon", "optim.implementation=forloop"])
    validate_config(cfg)
    assert cfg.optim.implementation == "forloop"


def test_a_checkpoint_of_another_kernel_keeps_this_runs_kernel(fused_calls):
    written = Net()
    opt = build_optimizer(written, adamw_config("foreach"))
    train(written, opt)
    resumed = Net()
    resumed.load_state_dict(written.state_dict())
    fused = build_optimizer(resumed, adamw_config("fused"))
    fused.load_state_dict(copy.deepcopy(opt.state_dict()))  # its groups: fused=False, foreach=True
    assert all(g["fused"] is True and g["foreach"] is False for g in fused.param_groups)
    # Both go on from the same state; the resumed one on the fused kernel.
    train(written, opt)
    train(resumed, fused)
    assert fused_calls
    for p, q in zip(resumed.parameters(), written.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


# -- FSDP2 shards (DTensor parameters), world size 2 --------------------------------------------


def _sharded(rank: int, world_size: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for implementation in ("fused", "foreach", "forloop"):
        model = Net()
        fully_shard(model, mesh=mesh)
        opt = build_optimizer(model, adamw_config(implementation))
        assert opt.param_groups[0]["fused"] is (implementation == "fused")
        for step in range(STEPS):
            for p, g in zip(model.parameters(), gradients(step, model)):
                # each rank's shard of the full gradient, as FSDP's reduce-scatter leaves it
                p.grad = torch.distributed.tensor.distribute_tensor(g, mesh, p.placements)
            opt.step()
            opt.zero_grad()
        results[implementation] = [p.full_tensor().detach().clone() for p in model.parameters()]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_every_kernel_on_fsdp2_shards_matches_one_process(tmp_path):
    run_distributed(_sharded, 2, str(tmp_path))
    want = train(ref := Net(), reference_adamw(ref))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for implementation, got in results.items():
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-6, msg=f"rank {rank} {implementation}")
