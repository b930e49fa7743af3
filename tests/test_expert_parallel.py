"""Expert parallelism (snoo_train/models/expert_parallel.py) against one process, and the
auxiliary-loss-free routing bias (snoo_train/models/moe.py) against its formula.

The distributed reference is the single-process model built with the same seed: each rank
feeds its own slice of a global batch, as data parallelism does, so the reference loss is the
mean of the per-slice losses (the balancing loss is per slice in both)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard
from torch.nn.utils import clip_grads_with_norm_, get_total_norm
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from snoo_train.config import Config, ConfigError, validate_config
from snoo_train.models import (
    PRESETS,
    BiasedTopKRouter,
    RouterStats,
    apply_expert_parallel,
    biased_routers,
    build_model,
    clip_grads_with_norm,
    fully_shard_experts,
    grad_norm,
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
MAX_NORM = 1.0  # below the first steps' gradient norms: clipping runs
# A bias this size outweighs any probability difference: every token picks experts 0 and 1, so
# the ranks holding experts 2 and 3 receive no tokens at all.
FORCE_FIRST_TWO = torch.tensor([1.0, 1.0, 0.0, 0.0])
# One expert per ep rank but two efsdp ranks: FSDP splits each expert's rows instead.
TWO_EXPERTS = dataclasses.replace(MOE, num_experts=2, num_experts_per_tok=1)


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


def _check_grads(model, ref):
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
        router.expert_bias += BIASED.router_bias_update_rate * torch.sign(load.mean() - load)
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
    for experts in moe_experts(model):  # each rank holds only its share of its own experts
        weight = experts.gate_up_proj
        assert weight.device_mesh.mesh_dim_names == ("efsdp", "ep") and weight.placements[1] == Shard(0)
        assert weight.to_local().numel() == weight.numel() // world
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1)
    for step in range(STEPS):
        ids = _global_batch(step, world)
        out = _forward(model, ids[rank * ROWS : (rank + 1) * ROWS])
        out.loss.backward()
        ref_out = _reference_step(ref, ids, world)[rank]
        norm, ref_norm = grad_norm(model.parameters()), get_total_norm([q.grad for q in ref.parameters()])
        _assert_close(norm, ref_norm, "grad norm")
        assert step or ref_norm > MAX_NORM  # so the clipping below is exercised
        clip_grads_with_norm(model.parameters(), MAX_NORM, norm)
        clip_grads_with_norm_(ref.parameters(), MAX_NORM, ref_norm)
        _assert_close(out.loss, ref_out.loss, "loss")
        _assert_close(out.aux_loss, ref_out.aux_loss, "aux_loss")
        for i, (mine, theirs) in enumerate(zip(out.router_logits, ref_out.router_logits)):
            _assert_close(mine, theirs, f"router_logits {i}")  # what RouterStats counts
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


def _cases(rank, world, cases, then=None):
    """Several layouts in one spawned group: start-up costs more than a case."""
    for efsdp, cfg, bias in cases:
        _run_case(rank, world, efsdp, cfg, bias)
    if then is not None:
        then(rank, world)


def _refusals(rank, world):
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ep", "tp"))
    three = dataclasses.replace(MOE, num_experts=3)
    with pytest.raises(ValueError, match=r"parallel.ep=2 must divide model.num_experts=3"):
        apply_expert_parallel(build_model(three, VOCAB, seed=0, device="meta"), mesh["ep"])
    with pytest.raises(ValueError, match="needs an MoE model"):
        apply_expert_parallel(build_model(PRESETS["llama_tiny"], VOCAB, seed=0, device="meta"), mesh["ep"])
    no_tp = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    with pytest.raises(ValueError, match="'tp' dimension"):
        apply_expert_parallel(build_model(MOE, VOCAB, seed=0, device="meta"), no_tp)


def test_ep2_equals_one_process():
    run_distributed(_cases, 2, [(1, MOE, None), (1, BIASED, FORCE_FIRST_TWO)], _refusals)


def test_ep2_x_efsdp2_and_ep4_equal_one_process():
    cases = [(2, MOE, None), (1, MOE, None), (1, BIASED, FORCE_FIRST_TWO), (2, TWO_EXPERTS, None)]
    run_distributed(_cases, 4, cases)


# --- auxiliary-loss-free balancing (one process) ----------------------------------------------


def test_bias_update_follows_the_formula():
    model = build_model(BIASED, VOCAB, seed=0)
    routers = biased_routers(model)
    loads = torch.tensor([[4.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 5.0]])  # means 2 and 2
    start = torch.tensor([0.5, -0.5, 0.0, 0.25])
    for router, load in zip(routers, loads):
        router.expert_load.copy_(load)
        router.expert_bias.copy_(start)
    update_router_bias(model)
    rate = BIASED.router_bias_update_rate
    # bias += rate x sign(mean - load): down for the overloaded, up for the underloaded
    assert torch.equal(routers[0].expert_bias, start + rate * torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(routers[1].expert_bias, start + rate * torch.tensor([1.0, 1.0, 1.0, -1.0]))
    assert all(not r.expert_load.any() for r in routers)  # loads restart after every update


def test_bias_changes_the_choice_not_the_combine_weights():
    config = build_model(BIASED, VOCAB, seed=0, device="meta").config
    plain = MixtralTopKRouter(config)
    torch.nn.init.normal_(plain.weight, generator=torch.Generator().manual_seed(0))
    router = BiasedTopKRouter(config, update_rate=1e-3)
    router.weight.data.copy_(plain.weight.data)
    hidden = torch.randn(32, config.hidden_size, generator=torch.Generator().manual_seed(1))
    # zero bias: exactly Mixtral's router
    for a, b in zip(router(hidden), plain(hidden)):
        assert torch.equal(a, b)
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0])  # expert 3 wins every token's first slot
    router.expert_bias.copy_(bias)
    logits, weights, indices = router(hidden)
    probs = torch.softmax(hidden @ plain.weight.T, dim=-1)
    expected_indices = (probs + bias).topk(2, dim=-1).indices
    assert torch.equal(indices, expected_indices) and (indices[:, 0] == 3).all()
    assert not torch.equal(indices, probs.topk(2, dim=-1).indices)  # the choice changed
    chosen = probs.gather(-1, expected_indices)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))  # unbiased weights
    torch.testing.assert_close(logits, hidden @ plain.weight.T)  # the balancing loss's input


def test_bias_starts_at_zero_and_is_in_the_state_dict():
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = build_model(BIASED, VOCAB, seed=0, device="meta")
    materialize(model, device="cpu", seed=0)  # to_empty leaves garbage; the bias must start at 0
    keys = [f"model.layers.{i}.mlp.gate.expert_bias" for i in range(BIASED.num_layers)]
    state = get_model_state_dict(model)  # what the checkpoint saves
    assert all(k in state and not state[k].any() for k in keys)
    assert not any("expert_load" in k for k in state)  # a per-step counter, not state
    biased_routers(model)[1].expert_bias.fill_(0.125)
    other = build_model(BIASED, VOCAB, seed=1)
    other.load_state_dict(model.state_dict())
    assert torch.equal(biased_routers(other)[1].expert_bias, torch.full((4,), 0.125))
    assert not biased_routers(build_model(MOE, VOCAB, seed=0))  # off by default


def test_router_stats_count_the_biased_choice():
    model = build_model(BIASED, VOCAB, seed=0)
    for router in biased_routers(model):
        router.expert_bias.copy_(FORCE_FIRST_TWO)
    stats = RouterStats(4, 2, 0.01, routers=biased_routers(model))
    stats.loss(_forward(model, _global_batch(0, 1)))
    record = stats.metrics(lambda values: values)
    # every token took experts 0 and 1 (each half of the assignments) whatever the logits said
    assert record["moe/layer0/load"] == record["moe/layer1/load"] == [0.5, 0.5, 0.0, 0.0]
    assert torch.equal(biased_routers(model)[0].expert_load, torch.tensor([24.0, 24.0, 0.0, 0.0]))


def test_negative_bias_rate_is_refused():
    cfg = Config(model=dataclasses.replace(MOE, router_bias_update_rate=-0.1))
    with pytest.raises(ConfigError, match=r"model.router_bias_update_rate=-0.1 must be >= 0"):
        validate_config(cfg)
