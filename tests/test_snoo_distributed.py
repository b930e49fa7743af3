"""SNOO under FSDP2 (`fully_shard`) on real gloo process groups, against a single-process run."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from snoo_train.optim import SNOO
from tests.dist_utils import run_distributed

K, STEPS, GLOBAL_BATCH, SEQ = 3, 7, 4, 16  # two outer steps, then stop in the middle of a cycle


class CollectiveCounter(TorchDispatchMode):
    """Records every c10d op (eager `dist.*` and DTensor's functional collectives alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "c10d" in func.namespace:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def make_optimizer(model: torch.nn.Module) -> SNOO:
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return SNOO(inner, k=K, lr=0.7, momentum=0.6, nesterov=True)


def global_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def train(model, opt, batches, on_step=None) -> list[float]:
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if on_step is None:
            opt.step()
        else:
            on_step(opt)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _fsdp_matches_single_process(rank: int, world_size: int) -> None:
    batches = global_batches()

    # The reference: one process, the whole batch, no sharding.
    ref_model = tiny_llama()
    ref_opt = make_optimizer(ref_model)
    train(ref_model, ref_opt, batches)

    model = tiny_llama()
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(model)

    per_rank = GLOBAL_BATCH // world_size
    local = [ids[rank * per_rank:(rank + 1) * per_rank] for ids in batches]
    outer_step_ops: list[list[str]] = []

    def counted_step(o: SNOO) -> None:
        with CollectiveCounter() as counter:
            o.step()
        if o.outer_step_taken:
            outer_step_ops.append(counter.ops)

    train(model, opt, local, on_step=counted_step)

    # The outer step is local arithmetic on shards: not one collective.
    assert len(outer_step_ops) == STEPS // K
    assert outer_step_ops == [[]] * (STEPS // K), outer_step_ops

    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor)
        ref = ref_params[name]
        torch.testing.assert_close(p.full_tensor(), ref.detach(), rtol=1e-5, atol=1e-5, msg=name)
        for key in ("snoo_slow", "snoo_momentum"):
            state = opt.state[p][key]
            assert isinstance(state, DTensor), (name, key)
            assert state.device_mesh == p.device_mesh and state.placements == p.placements, (name, key)
            assert state.to_local().shape == p.to_local().shape, (name, key)
            torch.testing.assert_close(
                state.full_tensor(), ref_opt.state[ref][key], rtol=1e-5, atol=1e-5, msg=f"{name} {key}"
            )

    # The outer metrics are global norms: they match the single-process run's.
    metrics, ref_metrics = opt.outer_metrics(), ref_opt.outer_metrics()
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key

    # Evaluation at the slow weights: the sharded params hold them inside the context only.
    with opt.slow_parameters():
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.full_tensor(), ref_opt.state[ref_params[name]]["snoo_slow"],
                                       rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), ref_params[name].detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp_snoo_matches_single_process(world_size):
    run_distributed(_fsdp_matches_single_process, world_size)


def _counter_sees_collectives(rank: int, world_size: int) -> None:
    """Positive control: the counter used above does see eager and DTensor collectives."""
    model = tiny_llama()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    p = next(model.parameters())
    with CollectiveCounter() as counter:
        dist.all_reduce(torch.ones(1))
        p.full_tensor()
    assert len(counter.ops) >= 2, counter.ops


@pytest.mark.slow
def test_collective_counter_positive_control():
    run_distributed(_counter_sees_collectives, 2)


def _replicated_params_match(rank: int, world_size: int) -> None:
    """Plain replicated tensors (DDP-style): every rank keeps identical fast and slow weights."""
    model = tiny_llama()
    opt = make_optimizer(model)
    for ids in global_batches():
        model(input_ids=ids, labels=ids).loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world_size
        opt.step()
        opt.zero_grad()
    for p in model.parameters():
        gathered = [torch.empty_like(p) for _ in range(world_size)]
        dist.all_gather(gathered, p.detach())
        assert all(torch.equal(gathered[0], g) for g in gathered)
    assert set(opt.outer_metrics()) == {"snoo/pseudo_grad_norm", "snoo/slow_weight_norm"}


@pytest.mark.slow
def test_replicated_params_stay_identical():
    run_distributed(_replicated_params_match, 2)
