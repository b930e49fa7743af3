"""SNOO on plain tensors, checked against references written here from DESIGN.md section 2."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from snoo_train.optim import SNOO


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)


def reference_snoo_run(model, data, k, eta, mu, nesterov):
    """The update of DESIGN.md section 2, written out one tensor at a time."""
    inner = adamw(model.parameters())
    params = list(model.parameters())
    slow = [p.detach().clone() for p in params]  # w <- p before the first inner step
    buf = [torch.zeros_like(p) for p in params]  # b <- 0
    losses = []
    for t, batch in enumerate(data, start=1):
        loss = loss_fn(model, batch)
        losses.append(loss.item())
        loss.backward()
        inner.step()
        inner.zero_grad()
        if t % k == 0:
            with torch.no_grad():
                for p, w, b in zip(params, slow, buf):
                    s = w - p
                    b.mul_(mu).add_(s)
                    w.sub_(eta * (s + mu * b) if nesterov else eta * b)
                    p.copy_(w)
    return losses, slow, buf


def snoo_run(model, data, opt):
    losses = []
    for batch in data:
        loss = loss_fn(model, batch)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_reference_over_several_outer_cycles(k, nesterov):
    data = batches(4 * k + 2)  # several outer cycles, ending mid-cycle
    ref_model, model = make_model(), make_model()
    ref_losses, ref_slow, ref_buf = reference_snoo_run(ref_model, data, k, 0.7, 0.6, nesterov)

    opt = SNOO(adamw(model.parameters()), k=k, lr=0.7, momentum=0.6, nesterov=nesterov)
    losses = snoo_run(model, data, opt)

    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    for p, rp, w, b in zip(model.parameters(), ref_model.parameters(), ref_slow, ref_buf):
        torch.testing.assert_close(p, rp, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["snoo_slow"], w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["snoo_momentum"], b, rtol=1e-6, atol=1e-7)


def sgd_reference(k: int, nesterov: bool, eta: float = 0.8, mu: float = 0.75):
    """SNOO(AdamW) on a model, and DESIGN.md's reference beside it: an AdamW-only copy that
    supplies fast weights the same way, slow weights, and `outer_step_by_hand()`, which is
    torch's SGD(lr=eta, momentum=mu, nesterov) on them with gradient w - p, then p <- w.
    Returns (model, opt, shadow_model, shadow_inner, slow, outer_step_by_hand)."""
    model = make_model()
    opt = SNOO(adamw(model.parameters()), k=k, lr=eta, momentum=mu, nesterov=nesterov)
    shadow_model = make_model()
    shadow_inner = adamw(shadow_model.parameters())
    slow = [p.detach().clone().requires_grad_(True) for p in shadow_model.parameters()]
    sgd = torch.optim.SGD(slow, lr=eta, momentum=mu, nesterov=nesterov)

    def outer_step_by_hand() -> None:
        with torch.no_grad():
            for w, p in zip(slow, shadow_model.parameters()):
                w.grad = w - p
        sgd.step()
        with torch.no_grad():
            for w, p in zip(slow, shadow_model.parameters()):
                p.copy_(w)

    return model, opt, shadow_model, shadow_inner, slow, outer_step_by_hand


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_update_equals_torch_sgd_on_the_slow_weights(nesterov):
    """DESIGN.md: the outer step is SGD(lr=eta, momentum=mu, nesterov) on w with gradient w - p."""
    k = 2
    model, opt, shadow_model, shadow_inner, slow, outer_step_by_hand = sgd_reference(k, nesterov)
    for t, batch in enumerate(batches(3 * k), start=1):
        for m, o in ((model, opt), (shadow_model, shadow_inner)):
            loss_fn(m, batch).backward()
            o.step()
            o.zero_grad()
        if t % k == 0:
            outer_step_by_hand()
    for p, w in zip(model.parameters(), slow):
        torch.testing.assert_close(p, w.detach(), rtol=1e-6, atol=1e-7)


def test_first_outer_update_happens_after_k_steps_not_one():
    model = make_model()
    opt = SNOO(adamw(model.parameters()), k=4, lr=0.7, momentum=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    taken = []
    for batch in batches(4):
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
        taken.append(opt.outer_step_taken)
        if not opt.outer_step_taken:  # the slow weights stay at their start until the outer step
            for p, w0 in zip(model.parameters(), start):
                assert torch.equal(opt.state[p]["snoo_slow"], w0)
    assert taken == [False, False, False, True]
    # right after an outer step the fast weights equal the slow ones
    for p in model.parameters():
        assert torch.equal(p, opt.state[p]["snoo_slow"])


def test_inner_state_persists_across_outer_steps():
    model = make_model()
    opt = SNOO(adamw(model.parameters()), k=2)
    for batch in batches(5):
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    p = next(model.parameters())
    assert float(opt.state[p]["step"]) == 5.0  # Adam's bias correction was never reset
    assert opt.state[p]["exp_avg"].abs().sum() > 0


@pytest.mark.parametrize("stop_at", [2, 3, 4])
def test_state_dict_round_trip_mid_cycle_continues_identically(stop_at):
    k, data = 3, batches(9)
    model = make_model()
    opt = SNOO(adamw(model.parameters()), k=k, lr=0.7, momentum=0.6)
    uninterrupted = snoo_run(model, data, opt)

    model_a = make_model()
    opt_a = SNOO(adamw(model_a.parameters()), k=k, lr=0.7, momentum=0.6)
    first = snoo_run(model_a, data[:stop_at], opt_a)
    saved_model = copy.deepcopy(model_a.state_dict())
    saved_opt = copy.deepcopy(opt_a.state_dict())

    model_b = make_model(seed=123)  # different weights: everything must come from the checkpoint
    model_b.load_state_dict(saved_model)
    opt_b = SNOO(adamw(model_b.parameters()), k=k, lr=0.7, momentum=0.6)
    opt_b.load_state_dict(saved_opt)
    second = snoo_run(model_b, data[stop_at:], opt_b)

    assert first + second == uninterrupted
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        for key in ("snoo_slow", "snoo_momentum", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt_b.state[q][key])


def test_state_dict_records_outer_settings_and_phase():
    model = make_model()
    opt = SNOO(adamw(model.parameters()), k=5, lr=0.9, momentum=0.3, nesterov=False)
    for batch in batches(2):
        loss_fn(model, batch).backward()
        opt.step()
    group = opt.state_dict()["param_groups"][0]
    assert (group["snoo_k"], group["snoo_lr"], group["snoo_momentum"], group["snoo_nesterov"]) == (5, 0.9, 0.3, False)
    assert group["snoo_step"] == 2


def test_wrapper_follows_inner_groups_after_reload():
    """load_state_dict replaces the inner optimizer's group dicts; SNOO must not keep stale ones."""
    model = make_model()
    opt = SNOO(adamw(model.parameters()), k=2)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.inner.param_groups
    opt.param_groups[0]["lr"] = 0.123
    assert opt.inner.param_groups[0]["lr"] == 0.123


def test_lr_scheduler_drives_the_inner_learning_rate():
    model = make_model()
    opt = SNOO(adamw(model.parameters()), k=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    for batch in batches(3):
        loss_fn(model, batch).backward()
        opt.step()
        sched.step()
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    assert opt.param_groups[0]["snoo_lr"] == 0.7  # the outer lr is its own setting


def test_scheduler_can_change_outer_settings_through_param_groups():
    model, ref_model = make_model(), make_model()
    data = batches(4)
    opt = SNOO(adamw(model.parameters()), k=2, lr=0.7, momentum=0.5)
    for g in opt.param_groups:
        g["snoo_lr"], g["snoo_momentum"] = 0.4, 0.2
    snoo_run(model, data, opt)
    reference_snoo_run(ref_model, data, 2, 0.4, 0.2, True)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_parameter_without_gradient_joins_when_it_first_gets_one():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    opt = SNOO(adamw(list(a.parameters()) + list(b.parameters())), k=3)
    x = torch.randn(4, 3)
    a(x).sum().backward()  # b gets no gradient: AdamW skips it, so must SNOO's bookkeeping
    opt.step()
    opt.zero_grad()
    assert "snoo_slow" not in opt.state[b.weight] and len(opt.state[b.weight]) == 0
    b_start = b.weight.detach().clone()
    (a(x).sum() + b(x).sum()).backward()
    opt.step()  # must not break AdamW's lazy state init for b
    assert "exp_avg" in opt.state[b.weight]
    torch.testing.assert_close(opt.state[b.weight]["snoo_slow"], b_start, rtol=0, atol=0)


def test_slow_parameters_swaps_in_slow_weights_and_restores_fast():
    model = make_model()
    opt = SNOO(adamw(model.parameters()), k=4)
    for batch in batches(2):
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    fast = [p.detach().clone() for p in model.parameters()]
    with opt.slow_parameters():
        for p in model.parameters():
            assert torch.equal(p, opt.state[p]["snoo_slow"])
    for p, f in zip(model.parameters(), fast):
        assert torch.equal(p, f)


def test_closure_is_passed_to_the_inner_optimizer():
    model = make_model()
    opt = SNOO(adamw(model.parameters()), k=2)
    batch = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    start = [p.detach().clone() for p in model.parameters()]
    assert isinstance(opt.step(closure), torch.Tensor)
    # the gradients only appeared inside the inner step, yet every parameter joined at its start
    for p, w0 in zip(model.parameters(), start):
        assert torch.equal(opt.state[p]["snoo_slow"], w0)


def test_step_hooks_registered_on_snoo_fire():
    model = make_model()
    opt = SNOO(adamw(model.parameters()), k=2)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o))
    loss_fn(model, batches(1)[0]).backward()
    opt.step()
    assert calls == [opt]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"k": 0}, "k"),
        ({"k": 2.5}, "k"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        SNOO(adamw(make_model().parameters()), **kwargs)


def test_inner_optimizer_without_params_is_rejected():
    inner = adamw(make_model().parameters())
    inner.param_groups[0]["params"] = []
    with pytest.raises(ValueError, match="^inner"):
        SNOO(inner)
    with pytest.raises(TypeError, match="inner"):
        SNOO(object())  # type: ignore[arg-type]


def test_outer_metrics_are_the_global_norms_of_the_last_outer_step():
    model = make_model()
    opt = SNOO(adamw(model.parameters()), k=2, lr=0.7, momentum=0.5)
    assert opt.outer_metrics() == {}
    start = [p.detach().clone() for p in model.parameters()]
    data = batches(2)
    for batch in data:
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    # the outer step after two inner steps saw s = w0 - p2; recompute p2 with a plain AdamW run
    ref = make_model()
    ref_opt = adamw(ref.parameters())
    for batch in data:
        loss_fn(ref, batch).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    s = torch.cat([(w - p).flatten() for w, p in zip(start, ref.parameters())])
    metrics = opt.outer_metrics()
    assert metrics["snoo/pseudo_grad_norm"] == pytest.approx(s.norm().item(), rel=1e-5)
    w_new = torch.cat([opt.state[p]["snoo_slow"].flatten() for p in model.parameters()])
    assert metrics["snoo/slow_weight_norm"] == pytest.approx(w_new.norm().item(), rel=1e-5)


@pytest.mark.parametrize("nesterov", [True, False])
def test_flush_takes_the_outer_step_on_a_partial_window_and_keeps_the_phase(nesterov):
    """The end-of-training rule (docs/optimizers.md, SNOO section): flush() after 6 inner steps with k=4 is
    SGD(lr=eta, momentum=mu, nesterov) on w with gradient w - p over the 2-step window; a second
    flush changes nothing; the next outer step is still at step 8, from the flushed weights."""
    k = 4
    model, opt, shadow_model, shadow_inner, slow, outer_step_by_hand = sgd_reference(k, nesterov)

    data = batches(2 * k)
    for t, batch in enumerate(data, start=1):
        for m, o in ((model, opt), (shadow_model, shadow_inner)):
            loss_fn(m, batch).backward()
            o.step()
            o.zero_grad()
        if t % k == 0 or t == 6:
            outer_step_by_hand()
        if t == 6:
            fast = [p.detach().clone() for p in model.parameters()]
            opt.flush()
            assert opt.outer_step_taken
            for p, w, f in zip(model.parameters(), slow, fast):
                torch.testing.assert_close(opt.state[p]["snoo_slow"], w.detach(), rtol=1e-6, atol=1e-7)
                assert torch.equal(p, opt.state[p]["snoo_slow"])  # fast == slow after it
                assert not torch.allclose(p, f)  # the outer step moved them: steps 5-6 are in
            flushed = copy.deepcopy(opt.state_dict())
            opt.flush()  # nothing left in the window: a no-op, also for evaluation
            with opt.slow_parameters():
                assert all(torch.equal(p, opt.state[p]["snoo_slow"]) for p in model.parameters())
            for key, value in opt.state_dict()["state"].items():
                for name, tensor in value.items():
                    assert torch.equal(tensor, flushed["state"][key][name]), (key, name)
        else:
            assert opt.outer_step_taken == (t % k == 0)
    assert opt.param_groups[0]["snoo_step"] == 2 * k and opt.param_groups[0]["snoo_flushed_at"] == 6
    for p, w in zip(model.parameters(), slow):
        torch.testing.assert_close(p, w.detach(), rtol=1e-6, atol=1e-7)
