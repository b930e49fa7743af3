"""Distributed checkpoints: all the state a run needs to continue exactly, sharded, saved atomically.

Layout of `checkpoint.dir` (default `<run_dir>/checkpoints`):

    step_00000200/               a complete checkpoint
        __0_0.distcp ...         tensors, written by torch.distributed.checkpoint (DCP): each rank
                                 writes its own shards of the model, the inner optimizer's state
                                 and SNOO's slow weights and momentum (DTensors in optimizer.state)
        .metadata                DCP's index of those tensors (which rank holds which shard)
        state.json               everything that is not a tensor: step, tokens, data-loader
                                 position, LR scheduler, optimizer hyper-parameters, config
        manifest.json            size and CRC32 of every file above; written last
    step_00000300.incomplete/    a save in progress, or one killed mid-way: never loaded
    latest                       the name of the newest complete checkpoint

A save writes into `<name>.incomplete/`; once every rank's files and DCP's metadata are on disk,
rank 0 writes the manifest, renames the directory to `<name>/`, then points `latest` at it and
only then prunes old checkpoints. A process killed at any moment leaves the previous checkpoint
complete and `latest` pointing at it.

Loading never runs unrestricted pickle: tensor bytes go through DCP's `torch.load(weights_only=True)`
path; DCP's `.metadata` (a pickle) is read by an unpickler that admits only DCP's own metadata
classes, `torch.Size` and dtypes; everything else comes from JSON. Non-tensor values are
therefore kept out of DCP on save (DCP would pickle them).

The module knows nothing about models: the trainer hands over one nested state tree (dicts and
lists of tensors and plain values, e.g. `{"model": ..., "optim": ..., "trainer": ...}`) to
save, and a tree of the same shape to load into.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import pickle
import re
import resource
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from snoo_train.dist import in_process_group
from snoo_train.optim._dtensor import local as local_shard

log = logging.getLogger(__name__)

STEP_PREFIX = "step_"
INCOMPLETE_SUFFIX = ".incomplete"
LATEST = "latest"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit this run."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint is damaged (truncated, altered, unreadable): `trainer.resume=auto` falls back
    to an older one. A checkpoint that is intact but does not fit the run is a plain
    CheckpointError, and is refused outright: falling back would hide the user's mistake."""


class NonFiniteState(CheckpointError):
    """The state to save holds NaN or inf: it is never published as a checkpoint."""


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(Path(path).name.removeprefix(STEP_PREFIX))


_CHECKPOINT_NAME = re.compile(rf"{STEP_PREFIX}\d+")


# -- state trees: tensors to DCP, everything else to JSON --------------------------------------

Path_ = tuple  # a path into a nested state tree: dict keys and list indices


def _leaves(tree: Any, prefix: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise TypeError(f"state tree keys must be strings, got {key!r} at {prefix}")
            yield from _leaves(value, prefix + (key,))
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple, torch.Tensor)) for v in tree):
        # Containers of containers or tensors (param_groups) are walked; plain lists of numbers
        # (betas, base_lrs) are leaves of their own.
        for i, value in enumerate(tree):
            yield from _leaves(value, prefix + (i,))
    else:
        yield prefix, tree


def replica_keys(replica: int) -> Callable[[str], str]:
    """The `rename` for DiLoCo: its replicas hold different fast weights and inner optimizer
    state under the same names, and DCP would keep one copy of each name, so each replica's
    model and optimizer tensors are saved under `replica{r}/` (RNG and trainer state are not)."""

    def rename(key: str) -> str:
        return f"replica{replica}/{key}" if key.startswith(("model/", "optim/")) else key

    return rename


def _tensor_key(path: Path_) -> str:
    return "/".join(str(p) for p in path)


def split_state(tree: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[list[Any]]]:
    """(tensors by flat key for DCP, [path, value] pairs of the plain values for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: list[list[Any]] = []
    for path, value in _leaves(tree):
        if isinstance(value, torch.Tensor):
            tensors[_tensor_key(path)] = value
        else:
            plain.append([list(path), list(value) if isinstance(value, tuple) else value])
    return tensors, plain


def _set_path(tree: Any, path: list, value: Any) -> None:
    node = tree
    for part in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[part]
    last = path[-1]
    old = node.get(last) if isinstance(node, dict) else node[last]
    node[last] = tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value


# -- reading safely ------------------------------------------------------------------------

# The classes a DCP `.metadata` pickle may name. Anything else (a function, os.system, a class
# from an arbitrary module) is refused before it is constructed.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's filesystem reader with an allow-listed unpickler for `.metadata`, and a refusal of
    non-tensor entries (DCP would load those with `torch.load(weights_only=False)`)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except Exception as e:
                raise CorruptCheckpoint(f"{path}: unreadable DCP metadata ({e})") from e
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpoint(f"{path}: not DCP metadata")
        pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        if pickled:
            raise CorruptCheckpoint(
                f"{path}: holds pickled objects ({', '.join(pickled[:3])}); only tensors are loaded"
            )
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_tensor_keys(path: str | os.PathLike) -> dict[str, torch.Size]:
    """The tensor keys and global shapes a checkpoint holds (read safely)."""
    metadata = SafeFileSystemReader(path).read_metadata()
    return {k: v.size for k, v in metadata.state_dict_metadata.items()}


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's state.json: {"format", "step", "world_size", "meta", "plain"}, its shape
    checked, so that nothing later trips over a missing key or a value of the wrong type."""
    try:
        with open(Path(path) / STATE_FILE) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable {STATE_FILE} ({e})") from e
    problem = _state_problem(doc)
    if problem:
        raise CorruptCheckpoint(f"{path}: malformed {STATE_FILE} ({problem})")
    return doc


def _state_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return f"a JSON {type(doc).__name__}, not an object"
    for key, kind in (("format", int), ("step", int), ("world_size", int), ("meta", dict), ("plain", list)):
        if key not in doc:
            return f"no {key!r}"
        if not isinstance(doc[key], kind) or isinstance(doc[key], bool):
            return f"{key}={doc[key]!r} is not {'an' if kind is int else 'a'} {kind.__name__}"
    if doc["world_size"] < 1 or doc["step"] < 0:
        return f"world_size={doc['world_size']}, step={doc['step']}"
    if not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], list) for e in doc["plain"]):
        return "plain holds entries that are not [path, value] pairs"
    return None


# -- integrity --------------------------------------------------------------------------------


def _crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _write_manifest(directory: Path, checksum: bool) -> None:
    files = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != MANIFEST_FILE:
            files[p.name] = {"bytes": p.stat().st_size, **({"crc32": _crc32(p)} if checksum else {})}
    manifest = {"format": FORMAT_VERSION, "completed_at": time.time(), "files": files}
    _write_json_durably(directory / MANIFEST_FILE, manifest)


def verify_checkpoint(path: str | os.PathLike, checksum: bool = True) -> None:
    """Raise CheckpointError unless every file the manifest lists is there, whole and (with
    `checksum`) bit-identical to what was written."""
    path = Path(path)
    if not path.is_dir():
        raise CorruptCheckpoint(f"{path}: no such checkpoint directory")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{path}: incomplete checkpoint (no readable {MANIFEST_FILE})") from e
    for name in (".metadata", STATE_FILE):
        if name not in files:
            raise CorruptCheckpoint(f"{path}: manifest does not list {name}")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{path}: {name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CorruptCheckpoint(f"{path}: {name} is truncated or altered ({size} bytes, expected {info['bytes']})")
        if checksum and "crc32" in info and _crc32(f) != info["crc32"]:
            raise CorruptCheckpoint(f"{path}: {name} is corrupt (CRC32 mismatch)")


def _write_json_durably(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: readers see the old or the new pointer, never half of one


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- finding checkpoints ------------------------------------------------------------------------


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints that finished saving (renamed out of .incomplete), newest completion first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and not p.name.endswith(INCOMPLETE_SUFFIX):
            try:
                checkpoint_step(p)
            except ValueError:
                continue
            found.append(p)

    def completed_at(p: Path) -> tuple[float, int]:
        try:
            return float(json.loads((p / MANIFEST_FILE).read_text())["completed_at"]), checkpoint_step(p)
        except (OSError, ValueError, KeyError, TypeError):
            return p.stat().st_mtime, checkpoint_step(p)

    return sorted(found, key=completed_at, reverse=True)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names; None (with a warning) if the pointer is unreadable or
    names anything but a checkpoint directory here (a path elsewhere is never followed)."""
    pointer = Path(ckpt_dir) / LATEST
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        log.warning("ignoring %s: unreadable (%s)", pointer, e)
        return None
    if not _CHECKPOINT_NAME.fullmatch(name):
        log.warning("ignoring %s: %r is not a checkpoint name", pointer, name[:40])
        return None
    return Path(ckpt_dir) / name


def resume_candidates(
    ckpt_dir: str | os.PathLike, checksum: bool = True, problems: list[str] | None = None
) -> Iterator[Path]:
    """The checkpoints `trainer.resume=auto` may load, best first: the one `latest` names, then
    the other complete ones, newest first. Each is verified (manifest, checksums, metadata,
    state.json) before it is yielded; one that fails is skipped with a warning and its reason
    appended to `problems`. A caller whose load of a yielded checkpoint fails on damage the
    manifest does not cover (CorruptCheckpoint) records it there too and takes the next one."""
    candidates: list[Path] = []
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None and latest.is_dir():
        candidates.append(latest)
    candidates += [p for p in complete_checkpoints(ckpt_dir) if p != latest]
    problems = [] if problems is None else problems
    for path in candidates:
        try:
            verify_checkpoint(path, checksum=checksum)
            read_tensor_keys(path)
            read_state(path)
        except CorruptCheckpoint as e:
            problems.append(str(e))
            log.warning("skipping checkpoint: %s", e)
            continue
        if problems:
            log.warning("resuming from the previous complete checkpoint %s", path)
        yield path


def no_loadable_checkpoint(ckpt_dir: str | os.PathLike, problems: list[str]) -> CorruptCheckpoint:
    return CorruptCheckpoint(
        f"no loadable checkpoint in {ckpt_dir}: " + "; ".join(problems)
        + " (move the directory away, or start fresh in a new hydra.run.dir)"
    )


def find_resume_checkpoint(ckpt_dir: str | os.PathLike, checksum: bool = True) -> Path | None:
    """`trainer.resume=auto`: the first of `resume_candidates`. None when there are no
    checkpoints; CorruptCheckpoint when there are some but none verifies."""
    problems: list[str] = []
    path = next(resume_candidates(ckpt_dir, checksum=checksum, problems=problems), None)
    if path is None and problems:
        raise no_loadable_checkpoint(ckpt_dir, problems)
    return path


def resolve_checkpoint(path: str | os.PathLike, checksum: bool = True) -> Path:
    """The checkpoint a user named: a checkpoint directory (verified, no fallback: it was named
    explicitly), or a run directory or checkpoints directory (its newest loadable checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if (path / MANIFEST_FILE).exists() or (path / ".metadata").exists():
        verify_checkpoint(path, checksum=checksum)
        return path
    for directory in (path / "checkpoints", path):
        found = find_resume_checkpoint(directory, checksum=checksum)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: holds no complete checkpoint")


# -- saving and loading ---------------------------------------------------------------------------


@contextmanager
def _single_process_quietly() -> Iterator[None]:
    # DCP warns on every call without a process group that it assumes a single process: that
    # is exactly the intent at world size 1 and in export.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Checkpointer:
    """Saves and loads state trees under `ckpt_dir`, on every rank of the default group.

    `async_save=True` returns from `save()` once the tensors are staged in host memory (a copy):
    training continues while a background thread writes them; the checkpoint becomes visible
    (rename + `latest`) when the write is complete, and `wait()` blocks until then. One save is
    in flight at a time: a new save first waits for the previous one.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        *,
        keep_latest: int = 2,
        async_save: bool = False,
        checksum: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_latest = keep_latest
        self.async_save = async_save
        self.checksum = checksum
        self.rank, self.world_size = rank, world_size
        self._distributed = in_process_group()
        # The background writer's collectives run on their own gloo group: sharing the training
        # group would interleave them with the training step's collectives.
        self._async_group = (
            dist.new_group(backend="gloo") if async_save and self._distributed else None
        )
        self._pending: concurrent.futures.Future | None = None
        self._finalizer = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-finalize")
            if async_save
            else None
        )
        self.last_saved_step: int | None = None
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_incomplete()
        self._barrier()

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier()

    def _remove_incomplete(self) -> None:
        """Leftovers of saves killed mid-way: never loadable, safe to delete."""
        for p in self.dir.glob(f"{STEP_PREFIX}*{INCOMPLETE_SUFFIX}"):
            log.warning("removing incomplete checkpoint %s (a save was interrupted)", p)
            shutil.rmtree(p, ignore_errors=True)

    # -- save --

    def save(
        self,
        step: int,
        state: dict[str, Any],
        meta: dict[str, Any],
        *,
        blocking: bool | None = None,
        rename: Callable[[str], str] | None = None,
    ) -> None:
        """Save `state` (tensors and plain values) as checkpoint `step`. `meta` (JSON) records
        what the checkpoint belongs to (config, world size); `load` hands it back. `rename`
        maps tensor keys to the keys saved (e.g. a per-replica prefix where ranks hold different
        values under one name); plain values are taken from rank 0."""
        self.wait()
        blocking = (not self.async_save) if blocking is None else blocking
        final = self.dir / checkpoint_name(step)
        tmp = self.dir / (checkpoint_name(step) + INCOMPLETE_SUFFIX)
        tensors, plain = split_state(state)
        if rename is not None:
            tensors = {rename(k): v for k, v in tensors.items()}
        self._refuse_non_finite(step, tensors)
        # The directory exists before any rank writes into it, or every rank raises rank 0's error.
        error = self._share(self._start_save(step, tmp, meta, plain) if self.rank == 0 else None)
        if error:
            raise CheckpointError(error)

        writer = FileSystemWriter(tmp, sync_files=True)
        if blocking:
            try:
                with _single_process_quietly():
                    dcp.save(tensors, storage_writer=writer, no_dist=not self._distributed)
                if self.rank == 0:
                    self._finalize(tmp, final)
            except (Exception, CheckpointException) as e:  # DCP raises every rank's failure on all
                error = self._write_failed(tmp, e)
            error = self._share(error)
            if error:
                raise CheckpointError(error)
            self.last_saved_step = step
            return

        with _single_process_quietly():
            future = dcp.async_save(
                tensors, storage_writer=writer, process_group=self._async_group, no_dist=not self._distributed
            )
        # DCP completes the future on a rank only after the coordinator has written .metadata,
        # which it does after every rank's data is on disk: rank 0 may then publish.
        if self.rank == 0:
            self._pending = self._finalizer.submit(self._wait_and_finalize, future, tmp, final)
        else:
            self._pending = future
        self.last_saved_step = step

    def _start_save(self, step: int, tmp: Path, meta: dict[str, Any], plain: list) -> str | None:
        """Rank 0: a fresh `.incomplete` directory holding state.json; an error message if not."""
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            doc = {"format": FORMAT_VERSION, "step": step, "world_size": self.world_size, "meta": meta, "plain": plain}
            _write_json_durably(tmp / STATE_FILE, doc)
        except OSError as e:
            return self._write_failed(tmp, e)
        return None

    def _share(self, error: str | None) -> str | None:
        """Rank 0's outcome on every rank (a barrier too): all ranks go on, or all raise."""
        if not self._distributed:
            return error
        box = [error]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _write_failed(self, tmp: Path, e: BaseException) -> str:
        # The half-written directory stays `.incomplete` (never loaded, removed at the next
        # start): another rank may still be writing into it.
        latest = latest_checkpoint(self.dir)
        kept = f"the previous checkpoint {latest} is intact" if latest else "no earlier checkpoint exists"
        if isinstance(e, OSError) and e.strerror:
            reason = f"{e.strerror} ({e.filename or tmp})"
        else:  # torch's writer reports a failed write without its errno: say what could cause it
            reason = f"the writer failed ({_first_line(e)})"
        causes = []
        try:
            causes.append(f"{shutil.disk_usage(self.dir).free / 2**30:.2f} GiB free there")
        except OSError:
            pass
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            causes.append(f"a file-size limit of {limit} bytes (ulimit -f)")
        return f"cannot write checkpoint {tmp.name} in {self.dir}: {reason}; {', '.join(causes)}; {kept}"

    def _refuse_non_finite(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """Never publish NaN or inf: a checkpoint that `resume=auto` would pick up and that can
        only diverge again. Each rank checks its own shards (one flag per key, one host sync per
        device), the flags are OR-ed over ranks. It reads every element once: far less than the
        write that follows."""
        keys = list(tensors)
        by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        for i, key in enumerate(keys):
            local = local_shard(tensors[key])
            if local.is_floating_point() and local.numel():
                by_device.setdefault(local.device, []).append((i, torch.isfinite(local).all()))
        bad = torch.zeros(len(keys), dtype=torch.int64)
        for flags in by_device.values():
            finite = torch.stack([f for _, f in flags]).cpu()
            for (i, _), ok in zip(flags, finite.tolist()):
                bad[i] = int(not ok)
        if self._distributed:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            on_device = bad.to(device)
            dist.all_reduce(on_device, op=dist.ReduceOp.MAX)
            bad = on_device.cpu()
        count = int(bad.sum())
        if count:
            latest = latest_checkpoint(self.dir)
            first = keys[int(bad.nonzero()[0])]
            raise NonFiniteState(
                f"not saving step {step}: {count} of {len(keys)} tensors hold NaN or inf (first: {first}); "
                "the weights or optimizer state diverged. "
                + (f"The newest checkpoint is still {latest.name}." if latest else "No checkpoint was written.")
            )

    def _wait_and_finalize(self, future: Any, tmp: Path, final: Path) -> None:
        future.result()
        self._finalize(tmp, final)

    def _finalize(self, tmp: Path, final: Path) -> None:
        _write_manifest(tmp, self.checksum)
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an abandoned later branch
            stale = final.with_name(final.name + ".replaced")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        _write_text_durably(self.dir / LATEST, final.name + "\n")
        self._prune(keep=final)
        log.info("checkpoint saved: %s", final)

    def _prune(self, keep: Path) -> None:
        if self.keep_latest <= 0:
            return
        for old in complete_checkpoints(self.dir)[self.keep_latest:]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and published."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # on rank 0: written and published; elsewhere: written

    def poll(self) -> None:
        """Surface the result of a finished background save (an error raises here)."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._finalizer is not None:
                self._finalizer.shutdown(wait=True)
                self._finalizer = None

    # -- load --

    def load(self, path: str | os.PathLike, state: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return load_state(path, state, **kwargs)


def _first_line(e: BaseException) -> str:
    """A one-line reason: DCP wraps each rank's traceback into its message; torch.load's refusal
    is a paragraph (including advice to load with weights_only=False, which we never do)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "Error" in ln and not ln.startswith(("File ", "Traceback")):
            return ln[:300]
    return (lines[0] if lines else type(e).__name__)[:300]


def load_state(
    path: str | os.PathLike,
    state: dict[str, Any],
    *,
    check_meta: Callable[[dict[str, Any], int], None] | None = None,
    skip: Callable[[str], bool] | None = None,
    rename: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Load checkpoint `path` into `state` (a tree shaped like the one saved, or a part of it):
    tensors in place (DCP reshards them to this run's placements), plain values replaced.
    `check_meta(meta, saved_world_size)` may refuse the checkpoint before any tensor is read.
    Tensor keys for which `skip(key)` is true are left untouched; `rename` maps a tree key to
    the key it was saved under (see `Checkpointer.save`). Returns the saved meta."""
    path = Path(path)
    doc = read_state(path)
    if doc.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {doc.get('format')!r}, expected {FORMAT_VERSION}")
    if check_meta is not None:
        try:
            check_meta(doc["meta"], doc["world_size"])
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{path}: {e}") from e
    tensors, _ = split_state(state)
    if skip is not None:
        tensors = {k: v for k, v in tensors.items() if not skip(k)}
    if rename is not None:
        tensors = {rename(k): v for k, v in tensors.items()}
    saved = read_tensor_keys(path)
    missing = [k for k in tensors if k not in saved]
    if missing:
        raise CheckpointError(
            f"{path}: has no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
            f"({len(missing)} missing tensors): it was written by a different model or optimizer"
        )
    wrong = [
        f"{k} {tuple(saved[k])} vs {tuple(v.shape)}"
        for k, v in tensors.items()
        if tuple(saved[k]) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes differ from this run's: {'; '.join(wrong[:3])}")
    # no_dist: one process without a process group (export, world size 1) loads everything.
    try:
        with _single_process_quietly():
            dcp.load(tensors, storage_reader=SafeFileSystemReader(path), no_dist=not in_process_group())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP gathers every rank's failure, raises it on all
        raise CorruptCheckpoint(f"{path}: tensor data unreadable ({_first_line(e)})") from e
    prefixes = tuple(state)
    for p, value in doc["plain"]:
        if p and p[0] in prefixes:  # a partial tree (export) takes only its own parts
            _set_path(state, p, value)
    return doc["meta"]
