"""What the optimizers need to know about DTensors and process groups, in one place (torch only,
like the rest of optim/): the local shard of a tensor, and the size of the running group."""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # DTensor is public from torch 2.5; keep the optimizers importable without it.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def world_size() -> int:
    """Ranks in the default process group; 1 when none is running."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
