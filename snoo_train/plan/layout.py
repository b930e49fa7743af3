"""Where each parameter's elements live on one rank: shard arithmetic over the real layout,
without a process group.

The model is built on the meta device (no memory), so the shapes are the real ones (padded
vocabulary, tied weights once, 3-D expert stacks). Each parameter is then cut as the trainer
cuts it, in the trainer's order (models/parallelize.py):

* tensor parallelism (models/tensor_parallel.py): column-parallel q/k/v/gate/up, the embedding
  and the head on dim 0, row-parallel o/down on dim 1, norms and the MoE block replicated;
* expert parallelism (models/expert_parallel.py): expert stacks on dim 0 over `ep`;
* FSDP2 `Shard(0)` over the `shard` dimension (HSDP and DiLoCo replicas hold copies; experts
  under EP over `efsdp` = shard / ep), `Shard(1)` for an expert stack with fewer experts than
  ranks (`expert_shard_placement`). FSDP2 chunks like `torch.chunk`: ceil(d / n) rows per rank,
  the last ranks get fewer or none, and the storage of the sharded parameter (and of its
  reduce-scattered gradient) is padded to the full chunk on every rank. Optimizer state is made
  with `zeros_like` / `clone` of the unpadded local shard.

Rank r is tp rank r % T of data-parallel rank r // T, whose shard index is (r // T) % S
(snoo_train/dist.py); under EP that index is efsdp * E + ep. Rank 0 holds the first chunk of
every parameter, which is never smaller than another rank's: its figures are the maximum.
Under pipeline parallelism (`pp` > 1) S = world / (replicas x pp x T), the ranks of one stage, and
each rank holds its stage's parameters only (plan/pipeline.py: `RankShare.holds`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from snoo_train.config import mesh_dims

EXPERT_WEIGHTS = ("experts.gate_up_proj", "experts.down_proj")
_COLWISE = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
_ROWWISE = ("o_proj.weight", "down_proj.weight")


@dataclass(frozen=True)
class LocalParam:
    """One parameter on one rank: its full shape, the numel of its local shard, and the numel of
    the storage FSDP2 allocates for it (the shard padded to a full chunk)."""

    name: str
    full_shape: tuple[int, ...]
    local_numel: int
    padded_numel: int
    layer: int | None  # decoder layer index; None for the root group (embedding, norm, head)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _tp_shape(name: str, shape: list[int], tp: int, moe: bool, ep: int = 1) -> list[int]:
    """The shape a parameter has on one rank after tensor and expert parallelism (before FSDP)."""
    if name.endswith(EXPERT_WEIGHTS) and ep > 1:
        return [shape[0] // ep, *shape[1:]]
    if tp == 1:
        return shape
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return [shape[0] // tp, *shape[1:]]
    if ".mlp." in name and moe:
        return shape  # the MoE block runs on the whole sequence, unsplit (tensor_parallel.py)
    if name.endswith(_COLWISE):
        return [shape[0] // tp, *shape[1:]]
    if name.endswith(_ROWWISE):
        return [shape[0], shape[1] // tp, *shape[2:]]
    return shape  # norms: sequence parallel, replicated over tp


def _chunk(shape: list[int], dim: int, n: int, index: int) -> tuple[int, int]:
    """(local numel, padded numel) of chunk `index` of `n` along `dim`, as FSDP2 cuts it."""
    if n == 1:
        return _numel(shape), _numel(shape)
    size = shape[dim]
    chunk = -(-size // n)
    rest = _numel(shape) // size if size else 0
    local = max(0, min(chunk, size - index * chunk))
    return local * rest, chunk * rest


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None


def rank_coordinates(rank: int, world_size: int, replicas: int, tp: int, ep: int, pp: int = 1) -> tuple[int, int]:
    """(FSDP shard index, efsdp index) of `rank` on the trainer's mesh."""
    shard = mesh_dims(world_size, replicas, tp, ep, pp)["shard"]
    s = (rank // tp) % shard
    return s, s // ep


def local_params(
    model: nn.Module, *, world_size: int, rank: int, replicas: int, tp: int, ep: int, pp: int = 1
) -> list[LocalParam]:
    """Every trainable parameter of `model` (built on the meta device, not parallelized; a tied
    weight once) as rank `rank` holds it under the trainer's layout for this world size (under
    pipeline parallelism: as the ranks of one stage would shard it, whichever stage holds it)."""
    shard = mesh_dims(world_size, replicas, tp, ep, pp)["shard"]
    s, efsdp_index = rank_coordinates(rank, world_size, replicas, tp, ep, pp)
    moe = model.config.model_type == "mixtral"
    out = []
    for name, p in model.named_parameters():  # named_parameters yields a tied weight once
        if not p.requires_grad:
            continue
        shape = _tp_shape(name, list(p.shape), tp, moe, ep)
        n, index = shard, s
        if name.endswith(EXPERT_WEIGHTS) and ep > 1:
            n, index = shard // ep, efsdp_index
        # FSDP exists only with a process group (world size > 1; snoo_train/dist.py).
        n = n if world_size > 1 else 1
        dim = 1 if len(shape) == 3 and shape[0] < n else 0
        local, padded = _chunk(shape, dim, n, index)
        out.append(LocalParam(name, tuple(p.shape), local, padded, _layer_index(name)))
    return out


def unsharded_numel(params: list[LocalParam], layer: int | None, *, tp: int, ep: int, moe: bool) -> int:
    """Numel of one FSDP group's parameters all-gathered (tp- and ep-local): what FSDP2
    materializes in the compute dtype while the group runs (layer None: the root group)."""
    return sum(_numel(_tp_shape(p.name, list(p.full_shape), tp, moe, ep)) for p in params if p.layer == layer)
