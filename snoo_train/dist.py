"""Process group and device set-up from the torchrun environment, and the N-D device mesh.

`python -m snoo_train.train` (no RANK/WORLD_SIZE in the environment) is world size 1 and starts
no process group: the model stays a plain module and every collective helper below is a no-op.
Under `torchrun` each rank joins a NCCL group on its own GPU (LOCAL_RANK) or a gloo group on
CPU, and gets one device mesh with named dimensions. The mesh exists only when world_size > 1,
because a world-size-1 mesh would need a process group for nothing.

The mesh (`parallel.replicas` R, `parallel.tp` T, `parallel.ep` E; the FSDP dimension S takes the
rest of the world, S = world / (R x T)):

    replicate x shard x tp        dimensions of size 1 are left out, except `shard`
                 `-- efsdp x ep   expert parallelism borrows its ranks from `shard` (as torchtitan)

`tp` is innermost so a tensor-parallel group is consecutive ranks (one node's NVLink); `replicate`
is outermost so only the outer step crosses the slowest links. Rank r is tp rank r % T of
data-parallel rank r // T: the ranks of one TP group see the same batch. Expert weights are
sharded over `ep` (each rank holds whole experts) and fully sharded over `efsdp` (the ranks of
`shard` holding the same experts); everything else is fully sharded over `shard`.

With R > 1 the trainer shards the model over `shard` for DiLoCo (replicas drift apart between
outer steps and SNOO averages them over `replicate_group`) or over (replicate, shard) for HSDP
(gradients averaged every step).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from snoo_train.config import ConfigError, mesh_dims


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None  # the root mesh: (replicate,) shard (, tp); None at world size 1
    replicas: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    # ep > 1: the `shard` dimension unflattened into (efsdp, ep). Kept here because a dimension
    # made by (un)flattening must be book-kept by its owner, not sliced again from the root.
    expert_mesh: DeviceMesh | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks (replicate x shard): how many different batches a step sees."""
        return self.world_size // (self.tp * self.pp)

    @property
    def dp_rank(self) -> int:
        """This rank's batch: the ranks of one tensor-parallel group, and of one pipeline, share it.
        Rank = ((replica x pp + pp_rank) x shard + shard_rank) x tp + tp_rank (the mesh's order)."""
        per_replica = self.world_size // self.replicas
        shard = per_replica // (self.pp * self.tp)
        return self.replica * shard + (self.rank % (shard * self.tp)) // self.tp

    @property
    def pp_rank(self) -> int:
        """This rank's place in its pipeline (0 without pipeline parallelism)."""
        per_replica = self.world_size // self.replicas
        return (self.rank % per_replica) // (per_replica // self.pp)

    @property
    def pp_mesh(self) -> DeviceMesh | None:
        return self._dim("pp")

    def group_over(self, *names: str) -> ProcessGroup | None:
        """The process group over the named mesh dimensions present in the mesh (flattened when
        several), None when none of them is: e.g. ("pp", "shard") is one DiLoCo replica."""
        present = tuple(n for n in names if self.mesh is not None and n in (self.mesh.mesh_dim_names or ()))
        if not present:
            return None
        if len(present) == 1:
            return self.mesh[present[0]].get_group()
        return self.mesh[present]._flatten("_".join(present)).get_group()

    def _dim(self, name: str) -> DeviceMesh | None:
        if self.mesh is None or name not in (self.mesh.mesh_dim_names or ()):
            return None
        return self.mesh[name]

    @property
    def shard_mesh(self) -> DeviceMesh | None:
        """The FSDP dimension: this replica's data-parallel ranks (all of them with one replica)."""
        return self._dim("shard")

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        """Every data-parallel dimension: (replicate, shard), or shard alone with one replica."""
        if self.mesh is None or self.replicas == 1:
            return self.shard_mesh
        return self.mesh["replicate", "shard"]

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        return self._dim("tp")

    @property
    def ep_mesh(self) -> DeviceMesh | None:
        return None if self.expert_mesh is None else self.expert_mesh["ep"]

    @property
    def efsdp_mesh(self) -> DeviceMesh | None:
        """The ranks of `shard` holding the same experts (`shard` itself without EP)."""
        return self.shard_mesh if self.expert_mesh is None else self.expert_mesh["efsdp"]

    @property
    def replicate_group(self) -> ProcessGroup | None:
        """The ranks holding the same shard in every replica; None with one replica."""
        mesh = self._dim("replicate")
        return None if mesh is None else mesh.get_group()

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


def init_distributed(device: str = "auto", replicas: int = 1, tp: int = 1, ep: int = 1, pp: int = 1) -> DistInfo:
    """Join the torchrun process group (if any), pick this rank's device and build the mesh
    (see the module docstring); sizes that do not divide the world raise ConfigError."""
    rank, world_size = env_rank(), env_world_size()
    dims = mesh_dims(world_size, replicas, tp, ep, pp)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    mesh = expert_mesh = None
    if world_size > 1:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            # device_id binds NCCL's communicator to this GPU eagerly (no guessing on first use).
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, **kwargs)
        mesh = init_device_mesh(dev.type, tuple(dims.values()), mesh_dim_names=tuple(dims))
        if ep > 1:
            expert_mesh = mesh["shard"]._unflatten(0, (dims["shard"] // ep, ep), ("efsdp", "ep"))
        control_group()  # every rank creates it here, in the same order
        _make_error_group()
    return DistInfo(
        rank=rank, world_size=world_size, local_rank=local_rank, device=dev, mesh=mesh,
        replicas=replicas, tp=tp, ep=ep, pp=pp, expert_mesh=expert_mesh,
    )  # fmt: skip


def destroy_distributed(*, clean: bool = True) -> None:
    """Leave the process group. `clean=True` (every rank got here normally) first waits for all
    ranks: gloo can abort a rank whose peer tears down while its last send is in flight. After
    an error, no barrier: the other ranks may never arrive."""
    global _control_group, _error_group
    if dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier(group=control_group())
        dist.destroy_process_group()
    _control_group = _error_group = None


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


def all_reduce_max(value: float) -> float:
    """The largest of one host value over all ranks, on the control group (a flag or a signal
    number: a control message)."""
    if not in_process_group():
        return float(value)
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
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
        raise on_every_rank(kind(value))
    return value


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (a picklable host object), in rank order, on every rank: one object
    gather on the control group (a control message, never on the training group); [value]
    outside a process group."""
    if not in_process_group():
        return [value]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value, group=control_group())
    return everyone


class RankFailed(RuntimeError):
    """A step every rank takes together raised on some rank (named in the message): the other
    ranks raise this instead of going on alone."""


def together(run: Callable[[], Any], keep: tuple[type[Exception], ...] = ()) -> Any:
    """Run `run` on every rank, then exchange outcomes (one object gather on the control group):
    if it raised on any rank, every rank raises, marked on_every_rank, the lowest failing rank's
    error: rebuilt as its own type when that is one of `keep` (so ConfigError stays one line),
    else as RankFailed naming the rank and the error. Each rank returns its own result otherwise.
    Errors that stop one rank before a collective the others are in cannot be caught here: the
    steps inside `run` must take their collectives in the same order on every rank."""
    mine: Exception | None = None
    try:
        value = run()
    except Exception as e:  # noqa: BLE001 - exchanged below, raised again on every rank
        mine, value = e, None
    everyone = gather_objects(None if mine is None else (type(mine), str(mine)))
    failed = [(rank, o) for rank, o in enumerate(everyone) if o is not None]
    if not failed:
        return value
    if len(everyone) == 1:
        raise mine  # one process: its own error, traceback and all
    rank, (kind, message) = failed[0]
    if issubclass(kind, keep):
        error: Exception = kind(message)
    else:
        error = RankFailed(f"{kind.__name__} on rank {rank}: {message}")
    raise on_every_rank(error) from mine


def agree_on_failure(error: BaseException | None) -> None:
    """After work each rank does alone (reading its own files): if any rank failed, every rank
    raises the same ConfigError (the lowest failing rank's message, naming the failing ranks),
    so none is left waiting in a later collective for a rank that stopped. One gather on the
    control group, on the happy path too; outside a process group, the local error as is."""
    if not in_process_group():
        if error is not None:
            raise error
        return
    everyone = gather_objects(None if error is None else str(error))
    failed = [rank for rank, message in enumerate(everyone) if message is not None]
    if failed:
        ranks = "rank " + str(failed[0]) if len(failed) == 1 else "ranks " + ", ".join(map(str, failed))
        raise on_every_rank(ConfigError(f"{everyone[failed[0]]} (on {ranks})")) from error


def check_same_on_every_rank(value: Any, what: str, advice: str) -> None:
    """Every rank holds the same `value` (a choice each rank made from what it sees, such as
    files on its own node), else every rank raises the same ConfigError naming the first rank
    that differs from rank 0. One gather on the control group; nothing outside a process group."""
    everyone = gather_objects(value)
    other = next((r for r, v in enumerate(everyone) if v != everyone[0]), None)
    if other is not None:
        raise on_every_rank(
            ConfigError(f"{what} differs between ranks: rank 0 {everyone[0]!r}, rank {other} {everyone[other]!r}; {advice}")
        )


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's list of host floats (all the same length), in rank order, on every rank:
    one gather on the control group."""
    if not in_process_group():
        return [[float(v) for v in values]]
    mine = torch.tensor(values, dtype=torch.float64)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine, group=control_group())
    return [row.tolist() for row in rows]


def on_every_rank(error: BaseException) -> BaseException:
    """Mark `error` as raised the same way on every rank (a shared decision, or a check of the
    config every rank holds): the entry point prints it once, from rank 0. Returns it."""
    error.on_every_rank = True  # type: ignore[attr-defined]
    return error


def raised_on_every_rank(error: BaseException) -> bool:
    return getattr(error, "on_every_rank", False)


@contextmanager
def raised_alike(*errors: type[BaseException]) -> Iterator[None]:
    """Errors of these types raised inside are raised alike on every rank (a check of what every
    rank holds, such as the config): marked on_every_rank."""
    try:
        yield
    except errors as e:
        on_every_rank(e)
        raise


# How long a rank with an error of its own waits to learn whether every rank has the same one.
ERROR_WAIT_S = 10.0
_error_group: ProcessGroup | None = None


def _make_error_group() -> None:
    """A gloo group with a short timeout, for compare_errors only: a rank whose peers are busy
    training (or stuck in a collective) must not wait for them for long."""
    global _error_group
    if _error_group is None:
        _error_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=ERROR_WAIT_S))


def compare_errors(error: BaseException) -> None:
    """After an error that was not a shared decision: if every rank raised the same one (bad
    input every rank reads alike), mark it on_every_rank, so it is printed once, by rank 0.
    Ranks that do not arrive within ERROR_WAIT_S (healthy ones, still training) leave it this
    rank's own: the entry point prints it here, naming the rank, since rank 0 may never see it."""
    if _error_group is None or raised_on_every_rank(error) or not in_process_group():
        return
    mine = f"{type(error).__name__}: {error}"
    everyone: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(everyone, mine, group=_error_group)
    except Exception:  # noqa: BLE001 - a rank that did not come: the error is this rank's own
        return
    if all(e == mine for e in everyone):
        on_every_rank(error)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Every rank returns rank `src`'s `obj` (e.g. the run directory it resolved)."""
    if not in_process_group():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=control_group())
    return box[0]


_control_group: ProcessGroup | None = None


def control_group() -> ProcessGroup | None:
    """A gloo group over every rank, for control messages (agreements, outcomes, preemption
    flags, checkpoint manifests): small host values that must not wait behind the training
    group's queued kernels, nor count against NCCL's watchdog while a rank does host work.
    On a gloo run it is the default group; on NCCL a second group, made once by
    init_distributed on every rank in the same order (or on first use by a caller that made its
    own process group, where every rank reaches the same first call)."""
    global _control_group
    if not in_process_group():
        return None
    if _control_group is None:
        _control_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _control_group


def print_error(message: str, *, shared: bool) -> None:
    """One `error:` line per error, printed once in the job: an error every rank raised the same
    way (`shared`: a shared decision, a bad config, the same bad input; see
    dist.raised_on_every_rank and dist.compare_errors) by rank 0; any other by the rank that
    raised it, naming that rank, since rank 0 may be healthy and never see it."""
    rank, world_size = env_rank(), env_world_size()
    if world_size <= 1 or shared:
        if rank == 0:
            print(f"error: {message}", file=sys.stderr)
        return
    print(f"error: {message} (rank {rank} of {world_size})", file=sys.stderr)
