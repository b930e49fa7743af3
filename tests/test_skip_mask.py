"""SkipMask (trainer.nonfinite=skip) around SNOO, one process, a small model with fixed gradients:
the outer state stays out of the snapshot (SNOO drops its own outer step on the flag), a good step
equals the unmasked step bitwise and a bad one restores everything bitwise (negative zeros
included), the flag moves once per device, and after a skipped outer step evaluation and flush()
use the slow weights, checked against the outer update written out here."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from snoo_train.optim import SNOO
from snoo_train.optim.snoo import MOMENTUM, SLOW
from snoo_train.trainer.nonfinite import SkipMask, _is_masked

K, ETA, MU, LR = 3, 0.7, 0.5, 1e-2


def make() -> tuple[nn.Module, SNOO]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, SNOO(torch.optim.AdamW(model.parameters(), lr=LR), k=K, lr=ETA, momentum=MU)


def set_grads(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def step(model, opt, mask, n: int, ok: bool = True) -> torch.Tensor:
    set_grads(model, n)
    flag = torch.tensor(ok)
    if mask is None:
        opt.step()
        applied = flag
    else:
        _, applied = mask.step(flag)
    opt.zero_grad()
    return applied


def everything(model, opt) -> list[torch.Tensor]:
    """Parameters and every state tensor but the host step counters (which a skip leaves
    advanced, by design), as raw bits (torch.equal takes -0.0 for 0.0)."""
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for v in opt.state[p].values() if torch.is_tensor(v) and v.ndim > 0]
    return [t.view(torch.int32) if t.dtype == torch.float32 else t for t in out]


def bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_snapshot_leaves_snoos_outer_state_out():
    model, opt = make()
    mask = SkipMask(opt)
    step(model, opt, mask, 1)
    tensors = {id(t) for t in mask._tensors()}
    outer = {id(opt.state[p][key]) for p in model.parameters() for key in (SLOW, MOMENTUM)}
    assert outer and not tensors & outer
    # params + AdamW's exp_avg and exp_avg_sq: 3 x the parameters, not 5 x
    params = sum(p.numel() for p in model.parameters())
    step(model, opt, mask, 2)
    assert sum(s.numel() for s in mask._saved) == 3 * params


def test_good_steps_equal_unmasked_steps_and_bad_ones_restore_bitwise():
    plain, plain_opt = make()
    model, opt = make()
    mask = SkipMask(opt)
    for n in range(1, 2 * K + 1):  # two outer steps
        step(plain, plain_opt, None, n)
        step(model, opt, mask, n)
        assert bitwise_equal(everything(model, opt), everything(plain, plain_opt)), n
    # A negative zero in the momentum must survive a dropped outer step (x + 0 turns -0 into +0).
    p0 = next(model.parameters())
    opt.state[p0][MOMENTUM].view(-1)[0] = -0.0
    for n in range(2 * K + 1, 3 * K + 1):  # ends on an outer step
        before = everything(model, opt)
        assert not bool(step(model, opt, mask, n, ok=False))
        assert bitwise_equal(everything(model, opt), before), n


class ToCopies(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


def test_the_flag_moves_once_per_device_not_once_per_tensor():
    # Five tensors on another device (meta stands in for a GPU next to CPU outer state).
    cpu = [torch.zeros(3) for _ in range(2)]
    other = [torch.zeros(3, device="meta") for _ in range(5)]
    mask = SkipMask(torch.optim.SGD([torch.zeros(1, requires_grad=True)]))
    mask._snapshot(cpu + other)
    with ToCopies() as copies:
        mask._restore_if_bad(cpu + other, torch.tensor(True))
    assert copies.n == 1


def _skipped_outer_step():
    """Steps 1 and 2 applied, step 3 (the outer step, K=3) skipped. Returns the model, SNOO, the
    initial weights (the slow weights: no outer step was applied) and the fast weights after 2."""
    model, opt = make()
    mask = SkipMask(opt)
    initial = [p.detach().clone() for p in model.parameters()]
    step(model, opt, mask, 1)
    step(model, opt, mask, 2)
    fast = [p.detach().clone() for p in model.parameters()]
    assert not bool(step(model, opt, mask, 3, ok=False))
    return model, opt, initial, fast


def test_after_a_skipped_outer_step_evaluation_sees_the_slow_weights():
    model, opt, initial, fast = _skipped_outer_step()
    for p, f in zip(model.parameters(), fast):
        assert torch.equal(p, f)  # the skip put the fast weights back: fast != slow here
    with opt.eval_parameters():
        for p, w in zip(model.parameters(), initial):
            assert torch.equal(p, w)
    for p, f in zip(model.parameters(), fast):
        assert torch.equal(p, f)


def test_after_a_skipped_outer_step_flush_takes_it_on_the_window():
    model, opt, initial, fast = _skipped_outer_step()
    opt.flush()
    # DESIGN.md section 2 on the window of steps 1-2: b = mu * 0 + s, w = w0 - eta * (s + mu * b).
    for p, w0, f in zip(model.parameters(), initial, fast):
        s = w0 - f
        want = w0 - ETA * (s + MU * s)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(opt.state[p][SLOW], want, rtol=0, atol=1e-6)
    with opt.eval_parameters():  # fast == slow now, and known to be
        pass
    assert all(opt._params_are_eval_point(g) for g in opt.param_groups)


@pytest.mark.parametrize("then", ["evaluate", "flush"])
def test_after_an_applied_outer_step_nothing_changes(then):
    model, opt = make()
    mask = SkipMask(opt)
    for n in range(1, K + 1):
        step(model, opt, mask, n)
    before = everything(model, opt)
    if then == "flush":
        opt.flush()  # the restart stood: a no-op, the slow weights and momentum untouched
    else:
        with opt.eval_parameters():
            for p in model.parameters():
                assert torch.equal(p, opt.state[p][SLOW])
    assert bitwise_equal(everything(model, opt), before)


def test_step_counters_are_left_to_advance_on_every_device():
    # Fused AdamW keeps its counters on the device (meta stands in for a GPU): like the host
    # counters they advance on a skipped step; any other device tensor is masked.
    assert not _is_masked(torch.zeros((), device="meta"), "step")
    assert not _is_masked(torch.zeros(()), "step")
    assert _is_masked(torch.zeros((), device="meta"), "exp_avg")
    assert _is_masked(torch.zeros(3, device="meta"), "step")


@pytest.mark.parametrize("skipped", [True, False])
def test_a_checkpoint_at_an_outer_step_knows_whether_it_stood(skipped):
    """The flag masked_step keeps is not in the state dict: loaded into a fresh SNOO, a state saved
    right after a skipped outer step still evaluates the slow weights (the initial ones here), and
    one saved after an applied outer step evaluates the parameters as they are."""
    if skipped:
        model, opt, initial, _ = _skipped_outer_step()
    else:
        model, opt = make()
        mask = SkipMask(opt)
        for n in range(1, K + 1):
            step(model, opt, mask, n)
        initial = [opt.state[p][SLOW].clone() for p in model.parameters()]
    saved_params = {k: v.clone() for k, v in model.state_dict().items()}
    saved_optim = opt.state_dict()
    resumed, fresh = make()
    resumed.load_state_dict(saved_params)  # the model first, as set_state_dict does
    fresh.load_state_dict(saved_optim)
    assert all(fresh._restarted(g) for g in fresh.param_groups)  # the host counters: at a restart
    with fresh.eval_parameters():
        for p, w in zip(resumed.parameters(), initial):
            assert torch.equal(p, w)
    for p, saved in zip(resumed.parameters(), saved_params.values()):
        assert torch.equal(p, saved)
