"""Init that never holds a full tensor: every rank's shard, on every layout, is bitwise the slice
of the full-tensor init that build.init_weights ran before (copied below as the reference: each
tensor drawn whole on CPU, each DTensor keeping its slice through distribute_tensor)."""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from snoo_train.dist import init_distributed
from snoo_train.models import PRESETS, build_model, materialize, parallelize
from snoo_train.models.shard_init import fill_normal_shard
from tests.dist_utils import run_distributed

VOCAB = 257
SEED = 13
# Uneven shards everywhere: 171 rows or columns split over 2 or 4 ranks (FSDP2 pads the last).
DENSE = dataclasses.replace(PRESETS["llama_tiny"], intermediate_size=171, num_layers=3)
MOE = PRESETS["moe_tiny"]
# One expert per ep rank, two efsdp ranks: FSDP shards each expert's rows (Shard(1)) instead.
TWO_EXPERTS = dataclasses.replace(MOE, num_experts=2, num_experts_per_tok=1)


def _canonical(name: str) -> str:
    for prefix in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def reference_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The full-tensor init as it was: canonical parameter name -> the full fp32 tensor."""
    cfg = model.config
    scaled = cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers)
    weights = {}
    for name, param in model.named_parameters():
        name = _canonical(name)
        generator = torch.Generator().manual_seed(
            (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        )
        full = torch.empty(param.shape, dtype=torch.float32)
        if name.endswith("bias"):
            full.zero_()
        elif param.ndim == 1:
            full.fill_(1.0)
        else:
            residual = name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj"))
            full.normal_(0.0, scaled if residual else cfg.initializer_range, generator=generator)
        weights[name] = full
    return weights


# -- the chunked draw against the full draw ---------------------------------------------------------


def _draw(shape, index, chunk_elements, local=None):
    if local is None:
        local = torch.full([len(i) for i in index], float("nan"))
    fill_normal_shard(
        local, torch.Size(shape), index, 0.02, torch.Generator().manual_seed(7),
        chunk_elements=chunk_elements,
    )  # fmt: skip
    return local


def _full_slice(shape, index):
    full = torch.empty(shape).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(7))
    return full[torch.meshgrid(*index, indexing="ij")]


def _chunk(size, parts, which):
    # torch.chunk's pieces, as Shard places them; ranks past the last piece hold nothing.
    pieces = torch.arange(size).chunk(parts)
    return pieces[which] if which < len(pieces) else torch.arange(0)


SHAPES = [
    (64, 172),  # 172 columns: a row is not a multiple of 16 elements
    (171, 64),  # uneven rows
    (33, 3),  # the last chunk would be under 16 elements: it joins the one before
    (5, 3),  # under one 16-element block: torch draws element by element
    (7, 5),  # 35 elements: 35 % 16 != 0, the redrawn tail spans rows
    (4, 24, 10),  # 3-D, like the MoE experts [E, out, in]
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_elements", [1, 100, 1 << 22])
def test_row_and_column_shards_equal_the_full_draw(shape, chunk_elements):
    for parts in (1, 2, 3, 4):
        for which in range(parts):
            rows = [_chunk(shape[0], parts, which)] + [torch.arange(n) for n in shape[1:]]
            cols = [torch.arange(n) for n in shape[:-1]] + [_chunk(shape[-1], parts, which)]
            for index in (rows, cols):
                got = _draw(shape, index, chunk_elements)
                assert torch.equal(got, _full_slice(shape, index)), (shape, parts, which)


@pytest.mark.parametrize("chunk_elements", [50, 1 << 22])
def test_strided_two_dim_and_empty_shards_equal_the_full_draw(chunk_elements):
    shape = (40, 36)
    strided = torch.cat([torch.arange(5, 10), torch.arange(25, 30)])  # FSDP over TP on dim 0
    cases = [
        [strided, torch.arange(36)],
        [torch.arange(10, 20), torch.arange(18, 36)],  # rows and columns at once (FSDP x TP)
        [torch.arange(0), torch.arange(36)],  # torch.chunk leaves the last ranks empty
    ]
    for index in cases:
        assert torch.equal(_draw(shape, index, chunk_elements), _full_slice(shape, index))


def test_a_non_contiguous_or_bf16_local_gets_the_cast_values():
    shape, index = (64, 172), [torch.arange(16, 40), torch.arange(172)]
    want = _full_slice(shape, index)
    transposed = torch.empty(172, 24).t()  # (24, 172), not contiguous: drawn through a staging copy
    assert torch.equal(_draw(shape, index, 100, local=transposed), want)
    bf16 = _draw(shape, index, 100, local=torch.empty(24, 172, dtype=torch.bfloat16))
    assert torch.equal(bf16, want.to(torch.bfloat16))


# -- whole models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_single_process_build_equals_the_full_tensor_init(cfg):
    model = build_model(cfg, VOCAB, seed=SEED)
    want = reference_weights(model, SEED)
    for name, p in model.named_parameters():
        assert torch.equal(p, want[name]), name


def _check_layout(label: str, cfg, overrides: dict, must_see) -> None:
    info = init_distributed("cpu", **overrides)
    model = build_model(cfg, VOCAB, seed=SEED, device="meta")
    parallelize(
        model, mesh=info.dp_mesh, tp_mesh=info.tp_mesh, ep_mesh=info.ep_mesh,
        efsdp_mesh=info.efsdp_mesh,
    )  # fmt: skip
    materialize(model, device="cpu", seed=SEED)
    want = reference_weights(model, SEED)
    placements = set()
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), (label, name)
        placements.update(p.placements)
        mine = distribute_tensor(want[name], p.device_mesh, p.placements, src_data_rank=None)
        assert torch.equal(p.to_local(), mine.to_local()), (label, name, p.placements)
        assert torch.equal(p.full_tensor(), want[name]), (label, name)
    assert any(must_see(pl) for pl in placements), (label, placements)


def _layouts_at_2(rank: int, world_size: int) -> None:
    _check_layout("fsdp2", DENSE, {}, lambda pl: isinstance(pl, Shard))
    _check_layout("tp2", DENSE, {"tp": 2}, lambda pl: pl == Shard(1))


def _layouts_at_4(rank: int, world_size: int) -> None:
    _check_layout("fsdp4", DENSE, {}, lambda pl: isinstance(pl, Shard))
    _check_layout("hsdp2x2", DENSE, {"replicas": 2}, lambda pl: pl.is_replicate())
    _check_layout("fsdp2xtp2", DENSE, {"tp": 2}, lambda pl: isinstance(pl, _StridedShard))
    _check_layout("ep2xefsdp2", MOE, {"ep": 2}, lambda pl: pl == Shard(0))
    _check_layout("ep2_expert_rows", TWO_EXPERTS, {"ep": 2}, lambda pl: pl == Shard(1))


@pytest.mark.slow
def test_every_shard_equals_the_full_tensor_init_at_world_size_2():
    run_distributed(_layouts_at_2, 2)


@pytest.mark.slow
def test_every_shard_equals_the_full_tensor_init_at_world_size_4():
    run_distributed(_layouts_at_4, 4)
