"""The averaging optimizers beside SNOO: Lookahead (a SNOO config), GPA, EMA-Nesterov and
Schedule-Free AdamW.

Each is checked against a reference written here from its published equations (or, for
schedule-free, against the `schedulefree` package's own explicit-x reference implementation),
never against the code under test; then under FSDP2 at world size 2 against a single-process run,
through a state_dict / DCP round trip, through config validation, and end to end through
`python -m snoo_train.train`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import schedulefree
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from snoo_train.config import ConfigError, validate_config
from snoo_train.optim import GPA, SNOO, EMANesterov, ScheduleFreeAdamW
from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]


# -- a tiny problem ----------------------------------------------------------------------------


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


INNERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False),
    "sgd": lambda params: torch.optim.SGD(
        params, lr=5e-2, momentum=0.9, weight_decay=0.01, foreach=False
    ),
}


def warmup(i: int) -> float:  # an LR schedule for the tests: warm-up, then decay
    return min(1.0, (i + 1) / 3) * (0.8 ** max(0, i - 3))


def run(model, opt, data, sched=None, on_step=None) -> list[float]:
    losses = []
    for t, batch in enumerate(data):
        loss = loss_fn(model, batch)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        if on_step is not None:
            on_step(t)
    return losses


def assert_close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# -- references from the papers' equations -----------------------------------------------------


def reference_gpa(model, data, make_inner, mu_x, mu_y, mu_y_from=None):
    """GPA (arXiv 2512.17131) with explicit x, z: y = mu_y x + (1 - mu_y) z holds the gradient,
    the inner optimizer steps z, x = mu_x x + (1 - mu_x) z. `mu_y_from=(t, v)`: from step t on
    the y formed after each step uses mu_y = v."""
    params = list(model.parameters())
    x = [p.detach().clone() for p in params]
    z = [nn.Parameter(p.detach().clone()) for p in params]  # what the inner optimizer moves
    inner = make_inner(z)
    losses = []
    for t, batch in enumerate(data):
        loss = loss_fn(model, batch)  # the model holds y
        losses.append(loss.item())
        for zi, g in zip(z, torch.autograd.grad(loss, params)):
            zi.grad = g
        inner.step()
        if mu_y_from is not None and t >= mu_y_from[0]:
            mu_y = mu_y_from[1]
        with torch.no_grad():
            for p, xi, zi in zip(params, x, z):
                xi.mul_(mu_x).add_(zi, alpha=1 - mu_x)
                p.copy_(mu_y * xi + (1 - mu_y) * zi)
    return losses, x, [zi.detach() for zi in z]


def reference_ema_nesterov(model, data, make_inner, gamma, beta, lr_lambda=None, beta_from=None):
    """EMA-Nesterov (arXiv 2605.25395) with explicit x and m: the gradient and the inner step are
    at the lookahead x_t + beta_t m_t, x_{t+1} is the inner step's result, and
    m_{t+1} = gamma m_t + (1 - gamma)(x_{t+1} - x_t). beta_{t+1} is set after step t: times
    lr_t / initial lr with `lr_lambda` (the schedule steps after the optimizer); `beta_from=(t, v)`
    switches beta to v after step t."""
    params = list(model.parameters())
    x = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    w = [nn.Parameter(p.detach().clone()) for p in params]  # what the inner optimizer moves
    inner = make_inner(w)
    sched = LambdaLR(inner, lr_lambda) if lr_lambda is not None else None
    beta_t, losses = 0.0, []
    for t, batch in enumerate(data):
        with torch.no_grad():
            for p, xi, mi in zip(params, x, m):
                p.copy_(xi + beta_t * mi)  # the lookahead
        loss = loss_fn(model, batch)
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for wi, p, g in zip(w, params, grads):
                wi.copy_(p)
                wi.grad = g
        inner.step()
        with torch.no_grad():
            for xi, mi, wi in zip(x, m, w):
                mi.mul_(gamma).add_(wi - xi, alpha=1 - gamma)
                xi.copy_(wi)
        if beta_from is not None and t >= beta_from[0]:
            beta = beta_from[1]
        group = inner.param_groups[0]
        beta_t = beta * (group["lr"] / group["initial_lr"] if sched is not None else 1.0)
        if sched is not None:
            sched.step()
    with torch.no_grad():
        for p, xi, mi in zip(params, x, m):
            p.copy_(xi + beta_t * mi)
    return losses, x, m


# -- GPA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["adamw", "sgd"])
@pytest.mark.parametrize("mu_x,mu_y", [(0.8, 0.6), (0.95, 0.0), (0.0, 0.7)])
def test_gpa_matches_reference(inner, mu_x, mu_y):
    data = batches(9)
    ref_model, model = make_model(), make_model()
    ref_losses, ref_x, ref_z = reference_gpa(ref_model, data, INNERS[inner], mu_x, mu_y)
    opt = GPA(INNERS[inner](model.parameters()), mu_x=mu_x, mu_y=mu_y)
    losses = run(model, opt, data)

    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    for p, rp, x in zip(model.parameters(), ref_model.parameters(), ref_x):
        assert_close(p.detach(), rp.detach())  # y
        assert_close(opt.state[p]["gpa_x"], x)
    # The inner optimizer's own state was made on its first step (AdamW: only while empty).
    assert all(len(opt.state[p]) > 1 for p in model.parameters())

    # eval_parameters swaps x in and restores y exactly.
    y = [p.detach().clone() for p in model.parameters()]
    with opt.eval_parameters():
        for p, x in zip(model.parameters(), ref_x):
            assert_close(p.detach(), x)
    for p, yi in zip(model.parameters(), y):
        assert torch.equal(p.detach(), yi)
    assert opt.eval_sequence == "x"


def test_gpa_mu_y_changed_through_param_groups_takes_effect_from_the_next_y():
    data = batches(8)
    ref_model, model = make_model(), make_model()
    ref_losses, ref_x, _ = reference_gpa(ref_model, data, INNERS["adamw"], 0.8, 0.6, (3, 0.3))
    opt = GPA(INNERS["adamw"](model.parameters()), mu_x=0.8, mu_y=0.6)

    def change(t):
        if t == 2:
            for group in opt.param_groups:
                group["gpa_mu_y"] = 0.3

    losses = run(model, opt, data, on_step=change)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    for p, x in zip(model.parameters(), ref_x):
        assert_close(opt.state[p]["gpa_x"], x)


def test_gpa_closure_gives_the_gradient_at_y():
    data = batches(5)
    a, b = make_model(), make_model()
    opt_a = GPA(INNERS["adamw"](a.parameters()), mu_x=0.8, mu_y=0.6)
    opt_b = GPA(INNERS["adamw"](b.parameters()), mu_x=0.8, mu_y=0.6)
    run(a, opt_a, data)
    for batch in data:

        def closure(batch=batch):
            opt_b.zero_grad()
            loss = loss_fn(b, batch)
            loss.backward()
            return loss

        opt_b.step(closure)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_gpa_period_mapping():
    assert GPA.mu_x_for_period(1) == pytest.approx(0.9)
    assert GPA.mu_x_for_period(32) == pytest.approx(0.9967, abs=1e-4)  # the paper's default
    assert GPA.period_for_mu_x(GPA.mu_x_for_period(16)) == pytest.approx(16)


# -- EMA-Nesterov --------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["adamw", "sgd"])
@pytest.mark.parametrize("gamma,beta", [(0.9, 0.5), (0.0, 1.0), (0.99, 0.0)])
def test_ema_nesterov_matches_reference(inner, gamma, beta):
    data = batches(9)
    ref_model, model = make_model(), make_model()
    ref_losses, ref_x, ref_m = reference_ema_nesterov(ref_model, data, INNERS[inner], gamma, beta)
    opt = EMANesterov(INNERS[inner](model.parameters()), gamma=gamma, beta=beta)
    losses = run(model, opt, data)

    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    for p, rp, m in zip(model.parameters(), ref_model.parameters(), ref_m):
        assert_close(p.detach(), rp.detach())  # the lookahead point
        assert_close(opt.state[p]["ema_m"], m)

    y = [p.detach().clone() for p in model.parameters()]
    with opt.eval_parameters():  # x, without the lookahead
        for p, x in zip(model.parameters(), ref_x):
            assert_close(p.detach(), x)
    for p, yi in zip(model.parameters(), y):
        assert torch.equal(p.detach(), yi)
    assert opt.eval_sequence == "x"


def test_ema_nesterov_beta_follows_the_lr_schedule():
    data = batches(9)
    ref_model, model = make_model(), make_model()
    ref_losses, ref_x, ref_m = reference_ema_nesterov(
        ref_model, data, INNERS["adamw"], 0.9, 0.7, lr_lambda=warmup
    )
    opt = EMANesterov(INNERS["adamw"](model.parameters()), gamma=0.9, beta=0.7)
    losses = run(model, opt, data, sched=LambdaLR(opt, warmup))
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    for p, rp, m in zip(model.parameters(), ref_model.parameters(), ref_m):
        assert_close(p.detach(), rp.detach())
        assert_close(opt.state[p]["ema_m"], m)
    # the last step's lr is warmup(8) x initial lr: the lookahead in the params carries that
    assert opt.param_groups[0]["ema_beta_applied"] == pytest.approx(0.7 * warmup(8))


def test_ema_nesterov_beta_changed_through_param_groups():
    data = batches(8)
    ref_model, model = make_model(), make_model()
    ref_losses, _, _ = reference_ema_nesterov(
        ref_model, data, INNERS["adamw"], 0.9, 0.5, beta_from=(3, 1.5)
    )
    opt = EMANesterov(INNERS["adamw"](model.parameters()), gamma=0.9, beta=0.5)

    def change(t):
        if t == 2:  # before step 3's lookahead is formed at the end of step 3
            opt.param_groups[0]["ema_beta"] = 1.5

    losses = run(model, opt, data, on_step=change)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)


def test_parameter_without_gradient_joins_when_it_first_gets_one():
    model = make_model()
    late = nn.Parameter(torch.ones(3))
    opt = EMANesterov(torch.optim.AdamW([*model.parameters(), late], lr=1e-2), gamma=0.9, beta=0.5)
    for t, batch in enumerate(batches(4)):
        loss = loss_fn(model, batch) + (late.sum() if t >= 2 else 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if t < 2:
            assert "ema_m" not in opt.state[late] and len(opt.state[late]) == 0
    assert "ema_m" in opt.state[late] and "exp_avg" in opt.state[late]


# -- Schedule-Free AdamW ---------------------------------------------------------------------


SF = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def test_schedule_free_is_in_train_mode_and_matches_the_package_reference():
    """Against schedulefree's explicit-x reference (AdamWScheduleFreeReference), with the warm-up
    done by our LR schedule on the adapter and by the package's warmup_steps on the reference."""
    data = batches(8)
    ref_model, model = make_model(), make_model()
    ref = schedulefree.AdamWScheduleFreeReference(ref_model.parameters(), warmup_steps=3, **SF)
    ref.train()
    ref_losses = run(ref_model, ref, data)

    opt = ScheduleFreeAdamW(model.parameters(), **SF)  # no .train() call: the adapter made it
    assert opt.train_mode and opt.eval_sequence == "x"
    losses = run(model, opt, data, sched=LambdaLR(opt, lambda i: min(1.0, (i + 1) / 3)))

    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    for p, rp in zip(model.parameters(), ref_model.parameters()):
        assert_close(p.detach(), rp.detach(), 1e-5)  # y
    y = [p.detach().clone() for p in model.parameters()]
    with opt.eval_parameters():
        for p, rp in zip(model.parameters(), ref_model.parameters()):
            assert_close(p.detach(), ref.state[rp]["x"], 1e-5)
    assert opt.train_mode
    for p, yi in zip(model.parameters(), y):
        assert_close(p.detach(), yi, 1e-6)  # back to y (two in-place lerps: fp32 rounding)


# -- state_dict round trips -------------------------------------------------------------------


def build(kind: str, model: nn.Module):
    if kind == "gpa":
        opt = GPA(INNERS["adamw"](model.parameters()), mu_x=0.8, mu_y=0.6)
    elif kind == "ema_nesterov":
        opt = EMANesterov(INNERS["adamw"](model.parameters()), gamma=0.9, beta=0.7)
    else:
        opt = ScheduleFreeAdamW(model.parameters(), **SF)
    return opt, LambdaLR(opt, warmup)


@pytest.mark.parametrize("kind", ["gpa", "ema_nesterov", "schedule_free"])
def test_state_dict_round_trip_mid_run_continues_identically(kind):
    data = batches(8)
    model = make_model()
    opt, sched = build(kind, model)
    run(model, opt, data, sched)

    model2 = make_model()
    opt2, sched2 = build(kind, model2)
    run(model2, opt2, data[:3], sched2)
    saved = copy.deepcopy(
        (model2.state_dict(), opt2.state_dict(), sched2.state_dict())
    )  # what a checkpoint holds

    model3 = make_model(seed=5)  # different weights: everything must come from the checkpoint
    opt3, sched3 = build(kind, model3)
    model3.load_state_dict(saved[0])
    opt3.load_state_dict(saved[1])
    sched3.load_state_dict(saved[2])
    run(model3, opt3, data[3:], sched3)

    for p, p3 in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, p3)
    with opt.eval_parameters():
        evaluated = [p.detach().clone() for p in model.parameters()]
    with opt3.eval_parameters():
        for e, p3 in zip(evaluated, model3.parameters()):
            assert torch.equal(e, p3)
    groups = opt.state_dict()["param_groups"]
    key = {"gpa": "gpa_params_mu_y", "ema_nesterov": "ema_beta_applied"}.get(kind, "train_mode")
    assert all(key in g for g in groups)  # the wrapper's bookkeeping is part of the checkpoint


@pytest.mark.parametrize("kind", ["gpa", "ema_nesterov", "schedule_free"])
def test_fresh_optimizer_has_no_state_entries(kind):
    """torch.distributed.checkpoint's get_state_dict creates a fresh optimizer's state by a dummy
    step only while `optimizer.state` is empty: an empty per-parameter entry (the state is a
    defaultdict) would make a resumed run load no optimizer state (schedulefree's .train() did)."""
    opt, _ = build(kind, make_model())
    with opt.eval_parameters():
        pass
    assert len(opt.state) == 0


# -- Lookahead is a SNOO config ---------------------------------------------------------------


def test_lookahead_config_is_lookahead():
    """snoo_train/configs/groups/optim/lookahead_adamw.yaml against Lookahead (Zhang et al. 2019): every k steps
    slow += alpha (fast - slow), fast = slow."""
    from snoo_train.optim.build import build_optimizer, weight_decay_groups
    from tests.conftest import typed

    cfg = typed(["optim=lookahead_adamw"]).optim
    k, alpha = cfg.k, cfg.outer_lr
    assert (k, alpha) == (5, 0.5)  # the paper's defaults
    data = batches(3 * k + 2)

    model = make_model()
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, SNOO) and opt.eval_sequence == "slow"
    losses = run(model, opt, data)

    ref_model = make_model()
    inner = torch.optim.AdamW(
        weight_decay_groups(ref_model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )
    slow = [p.detach().clone() for p in ref_model.parameters()]

    def lookahead(t):
        if (t + 1) % k == 0:
            with torch.no_grad():
                for w, p in zip(slow, ref_model.parameters()):
                    w.add_(p - w, alpha=alpha)
                    p.copy_(w)

    ref_losses = run(ref_model, inner, data, on_step=lookahead)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    for p, rp, w in zip(model.parameters(), ref_model.parameters(), slow):
        assert_close(p.detach(), rp.detach())
        assert_close(opt.state[p]["snoo_slow"], w)


# -- configuration ----------------------------------------------------------------------------


def test_configs_build_the_optimizers():
    from snoo_train.optim.build import build_optimizer
    from tests.conftest import typed

    expected = {
        "gpa_adamw": (GPA, "x"),
        "ema_nesterov_adamw": (EMANesterov, "x"),
        "schedule_free_adamw": (ScheduleFreeAdamW, "x"),
        "lookahead_adamw": (SNOO, "slow"),
    }
    for name, (cls, sequence) in expected.items():
        cfg = typed([f"optim={name}"])
        validate_config(cfg)
        opt = build_optimizer(make_model(), cfg.optim)
        assert type(opt) is cls and opt.eval_sequence == sequence, name
        assert cfg.optim.name == name
    cfg = typed(["optim=schedule_free_adamw", "trainer=quick"])  # the optim file wins the schedule
    assert cfg.trainer.lr_schedule == "constant" and cfg.trainer.warmup_steps == 5
    gpa = build_optimizer(make_model(), typed(["optim=gpa_adamw", "optim.gpa_mu_x=0.9"]).optim)
    assert gpa.param_groups[0]["gpa_mu_x"] == 0.9 and gpa.param_groups[0]["gpa_mu_y"] == 0.7


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["optim=gpa_adamw", "optim.gpa_mu_x=1.0"], "optim.gpa_mu_x"),
        (["optim=gpa_adamw", "optim.gpa_mu_y=-0.1"], "optim.gpa_mu_y"),
        (["optim=gpa_adamw", "optim.gpa_mu_y=1.0"], "optim.gpa_mu_y"),
        (["optim=ema_nesterov_adamw", "optim.ema_gamma=1.0"], "optim.ema_gamma"),
        (["optim=ema_nesterov_adamw", "optim.ema_beta=-0.5"], "optim.ema_beta"),
        (["optim.inner=schedulefree"], "optim.inner"),
        (["optim.outer=diloco_gpa"], "optim.outer"),
        (["optim=schedule_free_adamw", "trainer.lr_schedule=cosine"], "trainer.lr_schedule"),
        (["optim=schedule_free_adamw", "optim.outer=gpa"], "optim.outer"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    from tests.conftest import typed

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(typed(overrides))


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda inner: GPA(inner, mu_x=1.0), "mu_x"),
        (lambda inner: GPA(inner, mu_y=1.0), "mu_y"),
        (lambda inner: EMANesterov(inner, gamma=1.0), "gamma"),
        (lambda inner: EMANesterov(inner, beta=-0.1), "beta"),
    ],
)
def test_invalid_arguments_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make(torch.optim.SGD(make_model().parameters(), lr=0.1))


# -- FSDP2 at world size 2 --------------------------------------------------------------------

STEPS, SAVE_AT, GLOBAL_BATCH, SEQ = 5, 3, 4, 16


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def make_llama_optimizer(kind: str, model):
    if kind == "schedule_free":
        opt = ScheduleFreeAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return opt, LambdaLR(opt, lambda i: min(1.0, (i + 1) / 3)), ("z", "exp_avg_sq")
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if kind == "gpa":
        return GPA(inner, mu_x=0.8, mu_y=0.6), None, ("gpa_x",)
    opt = EMANesterov(inner, gamma=0.9, beta=0.7)
    return opt, LambdaLR(opt, warmup), ("ema_m",)


def _fsdp_family(rank: int, world_size: int, ckpt_root: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class CollectiveCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "c10d" in func.namespace:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]
    per_rank = GLOBAL_BATCH // world_size
    local = [ids[rank * per_rank : (rank + 1) * per_rank] for ids in data]
    mesh = init_device_mesh("cpu", (world_size,))

    def sharded():
        model = tiny_llama()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def train(model, opt, sched, batches, on_step=None):
        losses = []
        for t, ids in enumerate(batches):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            with CollectiveCounter() as counter:
                opt.step()
            assert counter.ops == [], counter.ops  # element-wise on the shards: no collective
            opt.zero_grad()
            if sched is not None:
                sched.step()
            value = loss.detach().clone()
            if isinstance(model.model.layers[0].mlp.up_proj.weight, DTensor):
                dist.all_reduce(value)
                value /= world_size
            losses.append(value.item())
            if on_step is not None:
                on_step(t)
        return losses

    for kind in ("gpa", "ema_nesterov", "schedule_free"):
        ref_model = tiny_llama()
        ref_opt, ref_sched, keys = make_llama_optimizer(kind, ref_model)
        ref_losses = train(ref_model, ref_opt, ref_sched, data)

        model = sharded()
        opt, sched, _ = make_llama_optimizer(kind, model)
        ckpt = os.path.join(ckpt_root, kind)
        saved_sched = {}

        def save(t, model=model, opt=opt, sched=sched, ckpt=ckpt, saved_sched=saved_sched):
            if t + 1 == SAVE_AT:
                model_sd, optim_sd = get_state_dict(model, opt)
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
                saved_sched.update(sched.state_dict() if sched is not None else {})

        losses = train(model, opt, sched, local, on_step=save)
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5), kind

        ref_params = dict(ref_model.named_parameters())
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                p.full_tensor(), ref_params[name].detach(), rtol=1e-5, atol=1e-5
            )
            for key in keys:
                state = opt.state[p][key]
                assert isinstance(state, DTensor), (kind, name, key)
                assert state.device_mesh == p.device_mesh and state.placements == p.placements
                torch.testing.assert_close(
                    state.full_tensor(), ref_opt.state[ref_params[name]][key], rtol=1e-5, atol=1e-5
                )
        with ref_opt.eval_parameters():
            ref_eval = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        with opt.eval_parameters():
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.full_tensor(), ref_eval[name], rtol=1e-5, atol=1e-5)

        # DCP: a fresh model and optimizer load the step-SAVE_AT checkpoint and finish the run.
        resumed = sharded()
        opt2, sched2, _ = make_llama_optimizer(kind, resumed)
        model_sd, optim_sd = get_state_dict(resumed, opt2)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(
            resumed, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        if sched2 is not None:
            sched2.load_state_dict(saved_sched)
        train(resumed, opt2, sched2, local[SAVE_AT:])
        final = dict(model.named_parameters())
        for name, p in resumed.named_parameters():
            torch.testing.assert_close(
                p.full_tensor(),
                final[name].full_tensor(),
                rtol=1e-6,
                atol=1e-6,
                msg=f"{kind} {name}",
            )


@pytest.mark.slow
def test_fsdp_world_size_2_matches_single_process_and_resumes_from_dcp(tmp_path):
    run_distributed(_fsdp_family, 2, str(tmp_path))


# -- end to end --------------------------------------------------------------------------------

E2E = {  # optim config -> the eval sequence its val_loss is measured at
    "lookahead_adamw": "slow",
    "gpa_adamw": "x",
    "ema_nesterov_adamw": "x",
    "schedule_free_adamw": "x",
}


@pytest.mark.slow
def test_entry_point_trains_each_config_and_records_the_eval_sequence(tmp_path):
    """One Hydra multirun (one process start) over the four configs."""
    sweep = tmp_path / "sweep"
    args = [
        "-m", "model=llama_tiny", "trainer=quick", "trainer.max_steps=4", "trainer.log_interval=2",
        "trainer.eval_interval=2", "trainer.eval_batches=1", "trainer.warmup_steps=1",
        "data.seq_len=64", "data.max_documents=50", f"optim={','.join(E2E)}",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "snoo_train.train", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    seen = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        name = OmegaConf.load(job / "config.yaml").optim.name
        records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if "val_loss" in r]
        assert [r["step"] for r in evals] == [2, 4], name
        assert all(math.isfinite(r["val_loss"]) for r in evals), name
        assert {r["val_weights"] for r in evals} == {E2E[name]}, name
        if name == "schedule_free_adamw":
            assert [r["lr"] for r in records] == pytest.approx([3e-3] * len(records))  # constant
        seen[name] = evals[-1]["val_loss"]
    assert set(seen) == set(E2E)


@pytest.mark.parametrize(
    "make",
    [
        lambda params: GPA(INNERS["adamw"](params), mu_x=0.9, mu_y=0.7),
        lambda params: EMANesterov(INNERS["adamw"](params), gamma=0.9, beta=0.5),
        lambda params: ScheduleFreeAdamW(params, lr=1e-2),
    ],
    ids=["gpa", "ema_nesterov", "schedule_free"],
)
def test_flush_leaves_the_averaging_optimizers_as_they_are(make):
    """The end-of-training rule for the optimizers whose evaluation point moves at every step:
    nothing is pending, so the trainer's final flush() changes no parameter and no state."""
    model = make_model()
    opt = make(model.parameters())
    run(model, opt, batches(5))
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.flush()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(after["state"][key][name]), torch.as_tensor(tensor)), (key, name)
