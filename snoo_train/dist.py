"""Process group and device set-up from the torchrun environment.

`python -m snoo_train.train` (no RANK/WORLD_SIZE in the environment) is world size 1 and starts
no process group: the model stays a plain module and every collective helper below is a no-op.
Under `torchrun` each rank joins a NCCL group on its own GPU (LOCAL_RANK) or a gloo group on
CPU, and gets a 1-D DeviceMesh for fully_shard. The mesh exists only when world_size > 1,
because a world-size-1 mesh would need a process group for nothing.

With `replicas=R > 1` (config `parallel.replicas`) the world of R x S ranks is a 2-D mesh
(`replicate`, `shard`): rank r is shard r % S of replica r // S, and the ranks of one replica are
consecutive (on one node when S divides the GPUs per node, so FSDP's per-step traffic stays on
the fast links and only the replicate dimension crosses nodes). The trainer shards the model over
`shard_mesh` for DiLoCo (replicas drift apart between outer steps and SNOO averages them over
`replicate_group`) or over the whole 2-D mesh for HSDP (gradients averaged every step).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from snoo_train.config import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None  # 1-D ("shard",), or 2-D ("replicate", "shard") when replicas > 1
    replicas: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard_mesh(self) -> DeviceMesh | None:
        """The ranks of this rank's replica (the whole world when replicas == 1)."""
        if self.mesh is None or self.mesh.ndim == 1:
            return self.mesh
        return self.mesh["shard"]

    @property
    def replicate_group(self) -> ProcessGroup | None:
        """The ranks holding the same shard in every replica; None with one replica."""
        if self.mesh is None or self.mesh.ndim == 1:
            return None
        return self.mesh.get_group("replicate")

    @property
    def replica(self) -> int:
        """Which replica this rank belongs to (0 with one replica)."""
        return self.rank // (self.world_size // self.replicas)


def env_world_size() -> int:
    """World size torchrun announced, readable before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but no CUDA device is visible")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                "start at most that many processes per node (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto", replicas: int = 1) -> DistInfo:
    """Join the torchrun process group (if any) and pick this rank's device. `replicas > 1`
    builds the 2-D (replicate, shard) mesh; the world size must be a multiple of it."""
    rank, world_size = env_rank(), env_world_size()
    if replicas < 1 or world_size % replicas:
        raise ConfigError(
            f"parallel.replicas={replicas} must be >= 1 and divide the world size {world_size} "
            "(torchrun --nproc_per_node x nodes = replicas x shards per replica)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    mesh = None
    if world_size > 1:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            # device_id binds NCCL's communicator to this GPU eagerly (no guessing on first use).
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, **kwargs)
        if replicas > 1:
            mesh = init_device_mesh(
                dev.type, (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard")
            )
        else:
            mesh = init_device_mesh(dev.type, (world_size,), mesh_dim_names=("shard",))
    return DistInfo(
        rank=rank, world_size=world_size, local_rank=local_rank, device=dev, mesh=mesh, replicas=replicas
    )


def destroy_distributed(*, clean: bool = True) -> None:
    """Leave the process group. `clean=True` (every rank got here normally) first waits for all
    ranks: gloo can abort a rank whose peer tears down while its last send is in flight. After
    an error, no barrier: the other ranks may never arrive."""
    if dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(status: int | str | None = 0) -> None:
    """Exit with `status`. A process that was one rank of several skips the interpreter's
    teardown: gloo's C++ objects can abort it at exit ("terminate called without an active
    exception", SIGABRT) after its work is done and it has left the process group, and
    torchrun would then report a finished job as failed. Logs and stdio are flushed first;
    everything else must be on disk already (the trainer waits for its checkpoints)."""
    if env_world_size() <= 1:
        sys.exit(status)
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)


def in_process_group() -> bool:
    """A process group of more than one rank is running (the optimizers, torch-only, have their
    own: optim/_dtensor.py)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum python floats over all ranks (one collective for the whole list)."""
    if not in_process_group():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not in_process_group():
        return float(value)
    return all_reduce_sum([value], device)[0] / dist.get_world_size()


def all_reduce_max(value: float, device: torch.device) -> float:
    if not in_process_group():
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def agree(info: DistInfo, decide: Callable[[], Any], errors: tuple[type[Exception], ...]) -> Any:
    """Run `decide` on rank 0 and give every rank its result, or its error: all ranks go on with
    the same value or all raise the same exception (one of `errors`, with rank 0's message), so
    no rank is left waiting in a collective that another rank never reaches."""
    outcome: tuple[type[Exception] | None, Any] = (None, None)
    if info.is_main:
        try:
            outcome = (None, decide())
        except errors as e:
            outcome = (type(e), str(e))
    kind, value = broadcast_object(outcome)
    if kind is not None:
        raise kind(value)
    return value


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Every rank returns rank `src`'s `obj` (e.g. the run directory it resolved)."""
    if not in_process_group():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
