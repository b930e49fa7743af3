"""A seeded normal draw of one rank's shard, bitwise equal to slicing the full draw, without it.

Why this works (torch's CPU `normal_fill`, aten/src/ATen/native/cpu/DistributionTemplates.h): on
a contiguous float32 tensor of n >= 16 elements `normal_` takes n uniforms from the generator's
mt19937 stream (one 32-bit draw each), turns them into normals by Box-Muller in aligned blocks of
16, and if n % 16 != 0 takes 16 more uniforms and redraws the last 16 elements from them. So a
run of rows that starts on a 16-element boundary, once the generator has been advanced past the
elements before it, is redrawn exactly by `normal_` on a buffer of those rows; a last run that
ends the tensor redraws its tail exactly as the full tensor does. mt19937 has no jump in torch's
API, so advancing walks the stream (int64 `random_`, two draws per element): a rank still pays
for the draws before its shard, but never holds them. tests/test_shard_init.py checks all this
against the full draw, so a torch that changed `normal_fill` would fail there, not silently.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

# 16 MiB of float32: the most one draw holds, whatever the parameter's size.
CHUNK_ELEMENTS = 1 << 22
_BLOCK = 16  # normal_fill's Box-Muller block


def local_indices(param: torch.Tensor) -> list[torch.Tensor] | None:
    """Per tensor dimension, the global indices this rank's local tensor holds, in local order.

    A plain tensor holds everything. For a DTensor, each Shard / _StridedShard placement splits
    its dimension's index vector, mesh dimension by mesh dimension, with the placement's own
    split: what `distribute_tensor` does to the data, so uneven (torch.chunk) shards and FSDP2's
    strided shards over TP come out as FSDP2 and DTensor lay them out. None off the mesh.
    """
    index = [torch.arange(size) for size in param.shape]
    if not isinstance(param, DTensor):
        return index
    coordinate = param.device_mesh.get_coordinate()
    if coordinate is None:
        return None
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard | _StridedShard):
            raise ValueError(f"cannot initialize a parameter placed {placement}: not a shard")
        dim = placement.dim % param.ndim
        column = index[dim].view([-1 if d == dim else 1 for d in range(param.ndim)])
        pieces, _ = placement._split_tensor(
            column, param.device_mesh.size(mesh_dim), with_padding=False, contiguous=False
        )
        index[dim] = pieces[coordinate[mesh_dim]].reshape(-1)
    return index


def _row_index(shape: torch.Size, index: list[torch.Tensor]) -> torch.Tensor:
    # The tensor seen as (rows, last dim): global row ids of the local rows, in local order.
    rows = torch.zeros(1, dtype=torch.long)
    for size, dim_index in zip(shape[:-1], index[:-1], strict=True):
        rows = (rows[:, None] * size + dim_index[None, :]).reshape(-1)
    return rows


def _chunks(rows: int, cols: int, chunk_elements: int) -> list[tuple[int, int]]:
    # Row ranges of at most ~chunk_elements, each starting on a 16-element boundary. A last
    # range under 16 elements would be drawn element by element: it joins the one before.
    align = _BLOCK // math.gcd(cols, _BLOCK)
    step = max(align, chunk_elements // max(cols, 1) // align * align)
    starts = list(range(0, rows, step))
    if len(starts) > 1 and (rows - starts[-1]) * cols < _BLOCK:
        starts.pop()
    return list(zip(starts, starts[1:] + [rows], strict=True))


def _advance(generator: torch.Generator, count: int, scratch: torch.Tensor) -> None:
    # Skip `count` (a multiple of 16) of the 32-bit draws normal_'s fill takes one per float.
    # int64 random_ takes exactly two per element (random64, no rejection): the cheapest walk
    # through mt19937 that torch offers, faster than drawing the normals and throwing them away.
    flat = scratch.view(-1)
    flat = flat[: flat.numel() // 2 * 2].view(torch.int64)
    count //= 2
    while count > 0:
        n = min(count, flat.numel())
        flat[:n].random_(generator=generator)
        count -= n


def _keep(
    target: torch.Tensor,
    chunk: torch.Tensor,
    a: int,
    rows: torch.Tensor,
    cols: torch.Tensor,
    row_slice: bool,
) -> None:
    # Copy this shard's elements of global rows [a, a + len(chunk)) into `target`.
    b = a + chunk.shape[0]
    if row_slice:
        first = int(rows[0])
        lo, hi = max(a, first), min(b, first + rows.numel())
        target[lo - first : hi - first].copy_(chunk[lo - a : hi - a])
        return
    hit = ((rows >= a) & (rows < b)).nonzero().squeeze(1)
    values = chunk.index_select(0, rows[hit] - a)
    if cols.numel() != chunk.shape[1]:  # a column shard (TP Shard(1)): keep this rank's columns
        values = values.index_select(1, cols)
    target.index_copy_(0, hit.to(target.device), values.to(target.device, target.dtype))


@torch.no_grad()
def fill_normal_shard(
    local: torch.Tensor,
    shape: torch.Size,
    index: list[torch.Tensor],
    std: float,
    generator: torch.Generator,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> None:
    """Write into `local` the elements at `index` (per-dimension global indices, local order,
    as `local_indices` gives) of `torch.empty(shape).normal_(0, std, generator=generator)`.

    Bitwise the same values, drawn in row chunks: the draws before this shard's first row are
    skipped, nothing after its last row is drawn, and at most one chunk exists at a time besides
    `local` (a chunk wholly inside a row shard of a CPU float32 `local` is drawn in place).
    `local` may live on any device and dtype (values are cast as `full.to(dtype)` casts them);
    `generator` is consumed.
    """
    rows, cols = _row_index(shape, index), index[-1]
    if rows.numel() == 0 or cols.numel() == 0:
        return
    width = shape[-1]
    # Written through a (rows, columns) view of `local` when it has one, else staged on CPU.
    direct = local.is_contiguous()
    target = (
        local.view(rows.numel(), cols.numel())
        if direct
        else torch.empty(rows.numel(), cols.numel(), dtype=local.dtype)
    )
    first, last = int(rows.min()), int(rows.max())
    needed = [
        (a, b)
        for a, b in _chunks(math.prod(shape[:-1]), width, chunk_elements)
        if b > first and a <= last
    ]
    # A row shard (FSDP2, EP): this rank's rows are one slice of the global rows, all columns.
    row_slice = cols.numel() == width and bool((rows.diff() == 1).all())
    in_place = row_slice and target.device.type == "cpu" and target.dtype == torch.float32
    buffer = torch.empty(max(b - a for a, b in needed) * width)
    _advance(generator, needed[0][0] * width, buffer)
    for a, b in needed:
        if in_place and first <= a and b <= last + 1:
            target[a - first : b - first].normal_(0.0, std, generator=generator)
            continue
        chunk = buffer[: (b - a) * width].view(b - a, width)
        _keep(target, chunk.normal_(0.0, std, generator=generator), a, rows, cols, row_slice)
    if not direct:
        local.copy_(target.view(local.shape))
