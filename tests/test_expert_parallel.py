"""Expert parallelism (snoo_train/models/expert_parallel.py) against one process, and the
auxiliary-loss-free routing bias (snoo_train/models/moe.py) against its formula.

The distributed reference is the single-process model built with the same seed: each rank
feeds its own slice of a global batch, as data parallelism does, so the reference loss is the
mean of the per-slice losses (the balancing loss is per slice in both)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from snoo_train.config import ConfigError, validate_config
from snoo_train.models import (
    PRESETS,
    BiasedTopKRouter,
    RouterStats,
    apply_expert_parallel,
    biased_routers,
    build_model,
    fully_shard_experts,
    materialize,
    moe_experts,
    update_router_bias,
)
from tests.dist_utils import run_distributed

VOCAB = 257
MOE = PRESETS["moe_tiny"]  # 4 experts, top-2, 2 layers
BIASED = dataclasses.replace(MOE, router_bias_update_rate=1e-3)
ROWS, SEQ, STEPS = 2, 12, 3  # per rank
# Adam divides by sqrt(v): where a gradient is ~0, float noise of 1e-9 moves a weight by up to
# ~lr, so a small lr keeps "equal within 1e-5" about the parallelism, not that amplification.
LR = 1e-3
# A bias this size outweighs any probability difference: every token picks experts 0 and 1, so
# the ranks holding experts 2 and 3 receive no tokens at all.
FORCE_FIRST_TWO = torch.tensor([1.0, 1.0, 0.0, 0.0])


def _ep_model(cfg, mesh):
    """`cfg`'s model on the meta device, EP over mesh["ep"], experts FSDP over mesh["efsdp"],
    the rest over efsdp x ep, then materialized: the layout the integrator builds."""
    shard = mesh["efsdp", "ep"]._flatten("shard")
    model = build_model(cfg, VOCAB, seed=0, device="meta")
    apply_expert_parallel(model, mesh["ep"])
    for layer in model.model.layers:
        fully_shard_experts(layer, mesh["efsdp"])
        fully_shard(layer, mesh=shard)
    fully_shard(model, mesh=shard)
    return materialize(model, device="cpu", seed=0)


def _global_batch(step: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (world * ROWS, SEQ), generator=g)


def _forward(model, ids):
    return model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)


def _assert_close(actual, expected, what):
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0), (what, (actual - expected).abs().max())


def _check_grads(model, ref, atol=1e-5):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        _assert_close(p.grad.full_tensor(), q.grad, f"grad {name}")


def _reference_step(ref, ids, world):
    """The single-process loss of every rank's slice; backward of their mean."""
    outs = [_forward(ref, ids[r * ROWS : (r + 1) * ROWS]) for r in range(world)]
    torch.stack([o.loss for o in outs]).mean().backward()
    return outs


def _expected_bias(ref):
    """The rule applied to the reference's global load, by hand; then the reference adopts it."""
    expected = []
    for router in biased_routers(ref):
        load = router.expert_load
        router.expert_bias += 1e-3 * torch.sign(load.mean() - load)
        router.expert_load.zero_()
        expected.append(router.expert_bias.clone())
    return expected


def _run_case(rank, world, efsdp, cfg, bias):
    mesh = init_device_mesh("cpu", (efsdp, world // efsdp, 1), mesh_dim_names=("efsdp", "ep", "tp"))
    ref, model = build_model(cfg, VOCAB, seed=0), _ep_model(cfg, mesh)
    for a, b in zip(biased_routers(ref), biased_routers(model)):
        a.expert_bias.copy_(bias)
        b.expert_bias.copy_(bias)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.full_tensor(), q), f"init {name}"
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1)
    for step in range(STEPS):
        ids = _global_batch(step, world)
        out = _forward(model, ids[rank * ROWS : (rank + 1) * ROWS])
        out.loss.backward()
        ref_out = _reference_step(ref, ids, world)[rank]
        _assert_close(out.loss, ref_out.loss, "loss")
        _assert_close(out.aux_loss, ref_out.aux_loss, "aux_loss")
        _check_grads(model, ref)
        if bias is FORCE_FIRST_TWO:  # the routing really was uneven: experts 2, 3 saw no token
            assert all(not e.down_proj.grad[2:].any() for e in moe_experts(ref))
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        if cfg.router_bias_update_rate:
            update_router_bias(model)
            for router, expected in zip(biased_routers(model), _expected_bias(ref)):
                assert torch.equal(router.expert_bias, expected)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        _assert_close(p.full_tensor(), q, f"param {name} after {STEPS} AdamW steps")


def _cases(rank, world, cases):
    for efsdp, cfg, bias in cases:
        _run_case(rank, world, efsdp, cfg, bias)


def test_ep2_equals_one_process():
    run_distributed(_cases, 2, [(1, MOE, None), (1, BIASED, FORCE_FIRST_TWO)])


def test_ep2_x_efsdp2_and_ep4_equal_one_process():
    run_distributed(_cases, 4, [(2, MOE, None), (1, MOE, None), (1, BIASED, FORCE_FIRST_TWO)])
