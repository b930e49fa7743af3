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

A save writes into `<name>.incomplete/`; each rank records the size and CRC32 of the files it
writes as it writes them; once every rank's files and DCP's metadata are on disk, rank 0 writes
the manifest from those entries, renames the directory to `<name>/`, then points `latest` at it
and only then prunes old checkpoints. A process killed at any moment leaves the previous
checkpoint complete and `latest` pointing at it.

Reading: a resume deals the manifest's files out over the ranks for verification, and every
rank agrees on each outcome (`agreed`, on the gloo control group). Only proven damage (size or
CRC32 mismatch, a missing or unparsable file: CorruptCheckpoint) lets a resume fall back to an
older checkpoint; any other error (EIO, out of memory, a timeout: CheckpointUnreadable) stops
the run and changes nothing.

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
import threading
import time
import warnings
import zipfile
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
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from snoo_train.dist import control_group, in_process_group
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


class CheckpointUnreadable(CheckpointError):
    """A checkpoint could not be read for a reason that proves no damage (an I/O error, out of
    memory, a timeout): the run stops, naming the checkpoint and the cause; nothing falls back,
    nothing is rewound or deleted."""


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
    model and optimizer tensors are saved under `replica{r}/` (RNG and trainer state are not).
    A resume with another replica count reads saved replica r mod R's (trainer/state.py)."""

    def rename(key: str) -> str:
        return f"replica{replica}/{key}" if key.startswith(("model/", "optim/")) else key

    return rename


def check_replicas_agree(path: str | os.PathLike, tensors: dict[str, torch.Tensor], replicas: int, source: int) -> None:
    """Refuse (CheckpointError, on every rank) unless each saved replica's copy of `tensors` (by
    tree key, loaded from replica `source`) equals them bitwise: state that is the same on every
    DiLoCo replica, checked on an elastic resume rather than assumed. Each rank reads and compares
    its own shards, one saved replica at a time (memory: one more copy of `tensors`)."""
    path = Path(path)
    for other in (j for j in range(replicas) if j != source):
        rename = replica_keys(other)
        theirs = {rename(k): torch.empty_like(v) for k, v in tensors.items()}

        def read_and_compare(rename=rename, theirs=theirs, other=other) -> None:
            with _single_process_quietly():
                dcp.load(
                    theirs, storage_reader=SafeFileSystemReader(path), process_group=control_group(),
                    no_dist=not in_process_group(),
                )  # fmt: skip
            for key, mine in tensors.items():
                if not torch.equal(local_shard(mine), local_shard(theirs[rename(key)])):
                    raise CheckpointError(
                        f"{key} differs between saved replicas {source} and {other}, though every replica holds "
                        "the same copy after an outer step: the checkpoint cannot resume with another replica count"
                    )

        agreed(path, read_and_compare)


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
    """Put a saved plain value into `tree`. A list the checkpoint holds longer than the tree's
    grows: the param groups of a pipelined run name every stage's (trainer/state.py), and one
    stage may have fewer groups than the checkpoint."""
    node = tree
    for part, after in zip(path[:-1], path[1:]):
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            if part == len(node):
                node.append({} if isinstance(after, str) else [])
            node = node[part]
    last = path[-1]
    if isinstance(node, list) and last == len(node):
        node.append(value)
        return
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
            except (MemoryError, OSError):  # not damage: a failure (classify)
                raise
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
    except (FileNotFoundError, ValueError) as e:  # other I/O errors are failures, not damage
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
#
# Every rank checksums the bytes it writes while it writes them (ChecksummingWriter), and rank 0
# merges the per-rank entries, gathered on the control group, into manifest.json: no file is
# read back after a save. Before a resume the files are dealt out over the ranks by size, each
# rank checksums its share, and the outcomes are combined on the control group.


class _ChecksummingStream:
    """A binary output stream that keeps the CRC32 and count of every byte written through it."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.crc32 = 0
        self.bytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = self._raw.write(view)
        n = len(view) if n is None else n
        self.crc32 = zlib.crc32(view[:n], self.crc32)
        self.bytes += n
        return n

    def __getattr__(self, name: str) -> Any:  # tell, fileno, flush, close: the file's own
        return getattr(self._raw, name)


class _ChecksummingFileSystem(FileSystem):
    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, dict[str, int]] = {}  # file name -> {"bytes", "crc32"}
        self._lock = threading.Lock()  # DCP may write with several threads

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as raw:
            stream = _ChecksummingStream(raw)
            yield stream
        with self._lock:  # only a stream that was written and closed without an error
            self.written[Path(path).name] = {"bytes": stream.bytes, "crc32": stream.crc32}

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
        with self._lock:
            entry = self.written.pop(Path(path).name, None)
            if entry is not None:
                self.written[Path(new_path).name] = entry


class ChecksummingWriter(FileSystemWriter):
    """DCP's filesystem writer that records the size and CRC32 of each file this rank writes,
    computed on the bytes as they go to the file (`written`), and how long its writing took."""

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.fs = _ChecksummingFileSystem()
        self.path = self.fs.init_path(path)
        self.write_s = self.write_cpu_s = 0.0  # wall and this thread's CPU seconds in write_data

    @property
    def written(self) -> dict[str, dict[str, int]]:
        return dict(self.fs.written)

    def write_data(self, plan: Any, planner: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return super().write_data(plan, planner)  # synchronous: the future is already done
        finally:
            self.write_s += time.perf_counter() - t0
            self.write_cpu_s += time.thread_time() - c0


def _crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _manifest(files: dict[str, dict[str, int]], checksum: bool) -> dict[str, Any]:
    entries = {
        name: {"bytes": e["bytes"], **({"crc32": e["crc32"]} if checksum and "crc32" in e else {})}
        for name, e in sorted(files.items())
    }
    return {"format": FORMAT_VERSION, "completed_at": time.time(), "files": entries}


def _write_manifest(directory: Path, checksum: bool) -> None:
    """A manifest computed from the files on disk (re-reading every byte): for tools and tests
    that rewrite a checkpoint by hand. Saves record what each rank wrote instead."""
    files = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != MANIFEST_FILE:
            files[p.name] = {"bytes": p.stat().st_size, **({"crc32": _crc32(p)} if checksum else {})}
    _write_json_durably(directory / MANIFEST_FILE, _manifest(files, checksum))


def read_manifest(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """The files a checkpoint's manifest lists ({name: {"bytes", "crc32"?}}). A missing or
    unparsable manifest is damage (CorruptCheckpoint); any other error reading it (EIO) is not,
    and propagates."""
    path = Path(path)
    if not path.is_dir():
        raise CorruptCheckpoint(f"{path}: no such checkpoint directory")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_bytes())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) for e in files.values()
        ):
            raise TypeError("malformed file entries")
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{path}: incomplete checkpoint (no readable {MANIFEST_FILE})") from e
    for name in (".metadata", STATE_FILE):
        if name not in files:
            raise CorruptCheckpoint(f"{path}: manifest does not list {name}")
    for name in files:
        if "/" in name or name in ("", ".", ".."):  # a manifest names files of its own directory only
            raise CorruptCheckpoint(f"{path}: manifest lists {name!r}, not a file of the checkpoint")
    return files


def verify_files(path: str | os.PathLike, files: dict[str, dict[str, int]], checksum: bool = True) -> None:
    """Raise CorruptCheckpoint unless each of `files` (manifest entries) is there, whole and (with
    `checksum`) bit-identical to what was written. I/O errors other than a missing file propagate."""
    path = Path(path)
    for name, info in files.items():
        f = path / name
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{path}: {name} is missing") from None
        if not f.is_file():
            raise CorruptCheckpoint(f"{path}: {name} is missing")
        if size != info["bytes"]:
            raise CorruptCheckpoint(f"{path}: {name} is truncated or altered ({size} bytes, expected {info['bytes']})")
        if checksum and "crc32" in info and _crc32(f) != info["crc32"]:
            raise CorruptCheckpoint(f"{path}: {name} is corrupt (CRC32 mismatch)")


def verify_checkpoint(path: str | os.PathLike, checksum: bool = True) -> None:
    """One process: raise CorruptCheckpoint unless every file the manifest lists is there, whole
    and (with `checksum`) bit-identical to what was written (CheckpointUnreadable if reading
    fails otherwise, e.g. EIO)."""
    agreed(path, lambda: verify_files(path, read_manifest(path), checksum), local=True)


def deal_files(files: dict[str, dict[str, int]], ranks: int) -> list[dict[str, dict[str, int]]]:
    """The files dealt out over `ranks` for verification, largest first to the rank with the
    fewest bytes so far: the same deal on every rank, each share about total / ranks bytes."""
    shares: list[dict[str, dict[str, int]]] = [{} for _ in range(ranks)]
    load = [0] * ranks
    for name, info in sorted(files.items(), key=lambda kv: (-kv[1]["bytes"], kv[0])):
        r = min(range(ranks), key=lambda i: (load[i], i))
        shares[r][name] = info
        load[r] += info["bytes"]
    return shares


def verify_spread(path: str | os.PathLike, checksum: bool = True) -> dict[str, float]:
    """Every rank: verify this rank's share of a checkpoint's files (deal_files), all ranks
    agreeing on the outcome (`agreed`). Rank 0 reads the manifest and shares it. Returns the
    wall and CPU seconds this rank spent on its own share (bench/checkpoint.py)."""
    group = control_group()
    rank = dist.get_rank() if group is not None else 0
    ranks = dist.get_world_size() if group is not None else 1
    files = agreed(path, lambda: read_manifest(path) if rank == 0 else None, share_from_rank0=True)
    share = deal_files(files, ranks)[rank]

    def verify_share() -> dict[str, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        verify_files(path, share, checksum)
        return {"verify_s": time.perf_counter() - t0, "verify_cpu_s": time.thread_time() - c0}

    return {**agreed(path, verify_share), "verify_bytes": sum(e["bytes"] for e in share.values())}


# -- damage or failure ----------------------------------------------------------------------------

DAMAGE, UNFIT, FAILURE = "damage", "unfit", "failure"


def _is_unparsable(e: BaseException) -> bool:
    """Bytes that parse as no tensor record: torch.load's unpickler or zip reader gave up."""
    if isinstance(e, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, UnicodeDecodeError)):
        return True
    return type(e) is RuntimeError and "PytorchStreamReader" in str(e)


def classify(e: BaseException) -> tuple[str, str]:
    """(DAMAGE | UNFIT | FAILURE, a one-line cause). Only proven damage lets a resume fall back:
    a size or checksum mismatch, a missing or unparsable file. A checkpoint that does not fit the
    run is refused (UNFIT). Anything else (an I/O error, out of memory, a timeout) is a FAILURE:
    the run stops, nothing is rewound."""
    if isinstance(e, CheckpointException):  # DCP gathers every rank's failure: the first rank's
        rank, (inner, _) = min(e.failures.items())
        kind, cause = classify(inner)
        return kind, f"{cause} (rank {rank})" if in_process_group() else cause
    if isinstance(e, CorruptCheckpoint):
        return DAMAGE, str(e)
    if isinstance(e, CheckpointError):
        return UNFIT, str(e)
    if isinstance(e, FileNotFoundError):
        return DAMAGE, f"{e.filename or e} is missing"
    if _is_unparsable(e):
        return DAMAGE, f"unparsable data ({_first_line(e)})"
    if isinstance(e, MemoryError):
        return FAILURE, f"out of memory ({type(e).__name__}{': ' + _first_line(e) if str(e) else ''})"
    if isinstance(e, OSError):
        return FAILURE, f"{type(e).__name__}: {e.strerror or _first_line(e)}" + (f" ({e.filename})" if e.filename else "")
    return FAILURE, f"{type(e).__name__}: {_first_line(e)}"


_PRECEDENCE = {FAILURE: 3, UNFIT: 2, DAMAGE: 1}


def agreed(
    path: str | os.PathLike, fn: Callable[[], Any], *, share_from_rank0: bool = False, local: bool = False
) -> Any:
    """Run `fn` on every rank of the process group (or in this one process) and combine the
    outcomes on the control group: every rank returns (its own result, or rank 0's with
    `share_from_rank0`), or every rank raises the same error. A failure on any rank outweighs a
    refusal, which outweighs damage: a resume falls back only when damage is all that was found.
    `fn` must not issue collectives after a point where it may fail on one rank only (DCP's
    own collectives share every rank's failure, so dcp.load may be called in it). `local`: this
    process alone (a tool, or one rank's own check), the same errors, no messages."""
    try:
        result, outcome = fn(), None
    except (Exception, CheckpointException) as e:  # MemoryError included; KeyboardInterrupt not
        result, outcome = None, classify(e)
    group = None if local else control_group()
    outcomes = [outcome]
    if group is not None:  # outcomes only (a line each): rank 0's result follows if all went well
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, outcome, group=group)
    bad = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if bad:
        r, (kind, cause) = max(bad, key=lambda ro: (_PRECEDENCE[ro[1][0]], -ro[0]))
        # Name the rank where the ranks differ (one rank's disk, one rank's memory).
        alike = all(o == outcomes[0] for o in outcomes)
        where = "" if alike or "(rank " in cause else f" (rank {r})"
        if kind == FAILURE:
            raise CheckpointUnreadable(
                f"cannot read checkpoint {path}: {cause}{where}; this is not damage, so nothing was rewound or "
                "deleted: fix the cause and run again (the checkpoint is left as it was)"
            )
        prefix = "" if str(path) in cause else f"{path}: "
        raise (CorruptCheckpoint if kind == DAMAGE else CheckpointError)(f"{prefix}{cause}{where}")
    if share_from_rank0 and group is not None:
        box = [result]
        dist.broadcast_object_list(box, src=0, group=group)
        result = box[0]
    return result


def _write_json_durably(path: Path, obj: Any) -> dict[str, int]:
    """Write `obj` as JSON, atomically; its manifest entry (size and CRC32 of the bytes written)."""
    data = json.dumps(obj, indent=1).encode()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


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


def checkpoint_candidates(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints `trainer.resume=auto` may load, best first, unverified: the one `latest`
    names, then the other complete ones, newest first."""
    candidates: list[Path] = []
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None and latest.is_dir():
        candidates.append(latest)
    return candidates + [p for p in complete_checkpoints(ckpt_dir) if p != latest]


def named_candidates(path: str | os.PathLike) -> tuple[list[Path], bool]:
    """`trainer.resume=<path>`: (the checkpoints to try, whether damage may fall back to the next).
    A checkpoint directory is that checkpoint alone (named explicitly: no fallback); a run
    directory or checkpoints directory, its candidates as for `auto`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if (path / MANIFEST_FILE).exists() or (path / ".metadata").exists():
        return [path], False
    for directory in (path / "checkpoints", path):
        found = checkpoint_candidates(directory)
        if found:
            return found, True
    raise CheckpointError(f"{path}: holds no complete checkpoint")


def resume_candidates(
    ckpt_dir: str | os.PathLike, checksum: bool = True, problems: list[str] | None = None
) -> Iterator[Path]:
    """The checkpoints `trainer.resume=auto` may load, best first: the one `latest` names, then
    the other complete ones, newest first. Each is verified (manifest, checksums, metadata,
    state.json) before it is yielded; one that fails is skipped with a warning and its reason
    appended to `problems`. A caller whose load of a yielded checkpoint fails on damage the
    manifest does not cover (CorruptCheckpoint) records it there too and takes the next one.
    One process (export, tools); a training run verifies over its ranks (verify_spread)."""
    problems = [] if problems is None else problems
    for path in checkpoint_candidates(ckpt_dir):
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
        # This rank's seconds writing (and checksumming) its files, and rank 0's publishing, in
        # the last save (bench/checkpoint.py).
        self.last_timing: dict[str, float] = {}
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_incomplete()
        self._barrier()

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier(group=control_group())

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
        started = self._start_save(step, tmp, meta, plain) if self.rank == 0 else None
        error = self._broadcast(started if isinstance(started, str) else None, control_group())
        if error:
            raise CheckpointError(error)
        own = {STATE_FILE: started} if self.rank == 0 else {}  # rank 0 wrote state.json

        writer = ChecksummingWriter(tmp, sync_files=True)
        self.last_timing = {"write_s": 0.0, "write_cpu_s": 0.0, "publish_s": 0.0, "publish_cpu_s": 0.0}
        if blocking:
            try:
                with _single_process_quietly():
                    dcp.save(tensors, storage_writer=writer, process_group=control_group(), no_dist=not self._distributed)
                written: tuple[str | None, dict] = (None, {**own, **writer.written})
            except (Exception, CheckpointException) as e:  # DCP raises every rank's failure on all
                written = (self._write_failed(tmp, e), {})
            error = self._publish_agreed(written, tmp, final, control_group(), writer)
            if error:
                raise CheckpointError(error)
            self.last_saved_step = step
            return

        with _single_process_quietly():
            future = dcp.async_save(
                tensors, storage_writer=writer, process_group=self._async_group, no_dist=not self._distributed
            )
        # Every rank finishes the save in the background: its written files go to rank 0, which
        # publishes, and the outcome comes back to every rank on the save's own gloo group
        # (sharing the control group would interleave with the training loop's messages).
        self._pending = self._finalizer.submit(self._wait_and_publish, future, own, writer, tmp, final)
        self.last_saved_step = step

    def _wait_and_publish(self, future: Any, own: dict, writer: ChecksummingWriter, tmp: Path, final: Path) -> str | None:
        try:
            future.result()
            written: tuple[str | None, dict] = (None, {**own, **writer.written})
        except (Exception, CheckpointException) as e:
            written = (self._write_failed(tmp, e), {})
        return self._publish_agreed(written, tmp, final, self._async_group, writer)

    def _publish_agreed(
        self, written: tuple[str | None, dict], tmp: Path, final: Path, group: Any, writer: ChecksummingWriter
    ) -> str | None:
        """Every rank hands rank 0 (its error or None, the files it wrote with their sizes and
        CRC32s); rank 0 publishes only if no rank failed, and every rank gets the outcome: all
        go on, or all raise the same error. Two small messages on a gloo group, whatever the
        size of the checkpoint."""
        self.last_timing.update(write_s=writer.write_s, write_cpu_s=writer.write_cpu_s)
        gathered = [written]
        if self._distributed:
            gathered = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(written, gathered, dst=0, group=group)
        outcome = None
        if self.rank == 0:
            t0, c0 = time.perf_counter(), time.thread_time()
            outcome = next((error for error, _ in gathered if error), None)
            if outcome is None:
                files = {name: entry for _, entries in gathered for name, entry in entries.items()}
                try:
                    self._finalize(tmp, final, files)
                except OSError as e:
                    outcome = self._write_failed(tmp, e)
            self.last_timing.update(publish_s=time.perf_counter() - t0, publish_cpu_s=time.thread_time() - c0)
        return self._broadcast(outcome, group)

    def _start_save(self, step: int, tmp: Path, meta: dict[str, Any], plain: list) -> dict[str, int] | str:
        """Rank 0: a fresh `.incomplete` directory holding state.json; its manifest entry, or an
        error message."""
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            doc = {"format": FORMAT_VERSION, "step": step, "world_size": self.world_size, "meta": meta, "plain": plain}
            return _write_json_durably(tmp / STATE_FILE, doc)
        except OSError as e:
            return self._write_failed(tmp, e)

    def _broadcast(self, outcome: str | None, group: Any) -> str | None:
        """Rank 0's outcome on every rank (a barrier too): all ranks go on, or all raise."""
        if not self._distributed:
            return outcome
        box = [outcome]
        dist.broadcast_object_list(box, src=0, group=group)
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
        bad: list[str] = []
        for flags in by_device.values():
            finite = torch.stack([f for _, f in flags]).cpu()
            bad += [keys[i] for (i, _), ok in zip(flags, finite.tolist()) if not ok]
        if self._distributed:
            # Ranks may hold different keys (pipeline stages): agree on "any" first, one scalar on
            # the control group, and gather the names only when some rank found one.
            flag = torch.tensor([len(bad)], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control_group())
            if flag.item():
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, bad, group=control_group())
                bad = sorted(set().union(*gathered))
        if bad:
            latest = latest_checkpoint(self.dir)
            raise NonFiniteState(
                f"not saving step {step}: {len(bad)} tensor(s) hold NaN or inf (first: {bad[0]}); "
                "the weights or optimizer state diverged. "
                + (f"The newest checkpoint is still {latest.name}." if latest else "No checkpoint was written.")
            )

    def _finalize(self, tmp: Path, final: Path, files: dict[str, dict[str, int]]) -> None:
        """Rank 0, once every rank's files are written: the manifest of what they wrote, then
        the atomic publish (rename, `latest`), then pruning."""
        _write_json_durably(tmp / MANIFEST_FILE, _manifest(files, self.checksum))
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
        """Block until the save in flight (if any) is written and published; raise its error.
        Every rank gets the same outcome (rank 0's, shared by the background task), so a
        failed background save stops every rank here: at the next save, the preemption save,
        or the end of fit. `latest` still names the previous checkpoint."""
        pending, self._pending = self._pending, None
        if pending is not None:
            error = pending.result()
            if error:
                raise CheckpointError(error)

    def poll(self) -> None:
        """One process: surface the result of a finished background save (an error raises
        here). Under a process group, nothing: a background save finishes at a different step
        on each rank, and a rank that raised alone would leave the others waiting in the next
        collective; its outcome is raised on every rank by the next `wait()`."""
        if not self._distributed and self._pending is not None and self._pending.done():
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


def _preflight(
    path: Path,
    state: dict[str, Any],
    check_meta: Callable[[dict[str, Any], int], None] | None,
    skip: Callable[[str], bool] | None,
    rename: Callable[[str], str] | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Everything a rank checks before any tensor is read (load_state's arguments); no
    collectives. Returns the saved document and the tensors to load, by saved key."""
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
    return doc, tensors


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

    def read_tensors() -> None:
        # no_dist: one process without a process group (export, world size 1) loads everything.
        # DCP's own planning messages go on the control group; each rank reads its shards.
        with _single_process_quietly():
            dcp.load(
                tensors, storage_reader=SafeFileSystemReader(path), process_group=control_group(),
                no_dist=not in_process_group(),
            )  # fmt: skip

    # Every rank agrees after each phase (agreed): damage found by one rank is damage for all,
    # and a failure on one rank (EIO, out of memory) stops every rank.
    doc, tensors = agreed(path, lambda: _preflight(path, state, check_meta, skip, rename))
    agreed(path, read_tensors)
    prefixes = tuple(state)
    for p, value in doc["plain"]:
        if p and p[0] in prefixes:  # a partial tree (export) takes only its own parts
            _set_path(state, p, value)
    return doc["meta"]
