"""What the optimizers need to know about DTensors and process groups, in one place (torch only,
like the rest of optim/): the local shard of a tensor, the size of the running group, and how many
ranks hold a copy of a rank's piece (for global norms summed over ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # DTensor is public from torch 2.5; keep the optimizers importable without it.
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = None  # type: ignore[assignment,misc]


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def world_size() -> int:
    """Ranks in the default process group; 1 when none is running."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def replication_factor(t: torch.Tensor, pp: int = 1) -> int:
    """How many ranks hold an identical copy of this rank's piece, so that summing every rank's
    squared norm counts each element once. Plain tensors in a process group are replicas, and so
    are DTensors on a sub-mesh (DiLoCo's replicas hold equal slow weights after an outer step),
    except the ranks of the other pipeline stages (`pp`: the pipeline-parallel size), which hold
    other tensors. (Passed in, not read from the mesh's root: torch reuses a sliced sub-mesh
    across roots of the same shape.)"""
    if DTensor is not None and isinstance(t, DTensor):
        factor = 1
        for dim, placement in enumerate(t.placements):
            if isinstance(placement, Replicate):
                factor *= t.device_mesh.size(dim)
        return factor * (world_size() // (t.device_mesh.size() * pp))
    return world_size() // pp
