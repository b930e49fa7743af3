"""Where documents come from, each read through the `datasets` library.

Every loader returns a `datasets.Dataset` or `datasets.IterableDataset` with a text column,
so tokenizing and packing (packing.py) never care about the source. Each source also has a
fingerprint of its input (file names, sizes and modification times; the Arrow fingerprint
of a prepared hub dataset) that keys the token cache; the standard library's is computed
from file stats alone, so a warm cache skips reading its files.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional, Union

import datasets

from .errors import DataError

log = logging.getLogger(__name__)

Documents = Union[datasets.Dataset, datasets.IterableDataset]

# Extensions we can infer a format from; compression suffixes are looked through.
_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_BUILDERS = {"text": "text", "jsonl": "json", "parquet": "parquet"}


@dataclass
class Source:
    documents: Documents
    text_field: str
    fingerprint: Optional[str]  # identifies the input for the token cache; None: do not cache
    describe: str  # for error messages: which config produced these documents
    # Documents with no text (the field absent or null): an error unless skipped on purpose.
    skip_invalid: bool = False
    # Read lazily while training (a hub stream): stop at the first invalid document instead
    # of counting them all first.
    lazy: bool = False
    files: Optional[list[str]] = None  # local files, to point at the line of a bad document


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stat(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


@dataclass
class StdlibListing:
    root: str
    paths: list[str]
    fingerprint: str


def list_stdlib(max_documents: Optional[int]) -> StdlibListing:
    """The running interpreter's standard-library .py files, sorted, without installed
    packages (site-packages/dist-packages) and without empty files (mostly __init__.py).
    Only stats files: the fingerprint is known before anything is read."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        ]
        found += [os.path.join(dirpath, fn) for fn in filenames if fn.endswith(".py")]
    stats = [_stat(p) for p in sorted(found)]
    stats = [s for s in stats if s[1] > 0][:max_documents]
    rel = [[os.path.relpath(s[0], root)] + s[1:] for s in stats]
    return StdlibListing(root, [s[0] for s in stats], _digest(["stdlib", sys.version, root, rel]))


def read_stdlib(listing: StdlibListing) -> Source:
    texts = []
    for p in listing.paths:
        with open(p, "rb") as f:
            # A few test files are deliberately mis-encoded; they are still source text.
            texts.append(f.read().decode("utf-8", errors="replace"))
    rel = [os.path.relpath(p, listing.root) for p in listing.paths]
    docs = datasets.Dataset.from_dict({"path": rel, "text": texts})
    return Source(docs, "text", listing.fingerprint, f"data.source=stdlib ({listing.root})")


def resolve_files(patterns: list[str]) -> list[str]:
    """Expand globs and directories in order; every entry must name at least one readable file."""
    if not patterns:
        raise DataError("data.files is empty: list text/jsonl/parquet files or globs")
    out: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(str(pattern))
        if glob.has_magic(expanded):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"data.files: no file matches {pattern!r}")
        elif os.path.isdir(expanded):
            matches = sorted(
                os.path.join(d, f)
                for d, _, fs in os.walk(expanded)
                for f in fs
                if _infer_one(f) is not None
            )
            if not matches:
                raise FileNotFoundError(
                    f"data.files: directory {pattern!r} holds no .txt/.jsonl/.json/.parquet file"
                )
        elif os.path.exists(expanded):
            matches = [expanded]
        else:
            raise FileNotFoundError(f"data.files: {pattern!r} does not exist")
        for path in matches:
            try:
                with open(path, "rb"):
                    pass
            except OSError as err:
                raise DataError(f"data.files: cannot read {path!r}: {err.strerror or err}") from err
            path = os.path.abspath(path)
            if path not in out:
                out.append(path)
    return out


def _infer_one(path: str) -> Optional[str]:
    name = path.lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _FORMATS.get(os.path.splitext(name)[1])


def infer_format(files: list[str], fmt: Optional[str]) -> str:
    if fmt is not None:
        return fmt
    formats = {}
    for path in files:
        found = _infer_one(path)
        if found is None:
            raise DataError(
                f"data.format: cannot infer the format of {path!r} from its extension; "
                "set data.format=text|jsonl|parquet"
            )
        formats.setdefault(found, path)
    if len(formats) > 1:
        raise DataError(
            f"data.files mixes formats ({', '.join(f'{k}: {v}' for k, v in formats.items())}); "
            "list one format per run or set data.format"
        )
    return next(iter(formats))


def load_local(
    files: list[str],
    fmt: Optional[str],
    text_field: str,
    sample_by: str,
    max_documents: Optional[int],
) -> Source:
    paths = resolve_files(files)
    fmt = infer_format(paths, fmt)
    check_readable(paths, fmt)
    kwargs = {"sample_by": sample_by} if fmt == "text" else {}
    fingerprint = _digest(
        ["local", fmt, sample_by if fmt == "text" else None, [_stat(p) for p in paths]]
    )
    # Streaming reads the files in place: no Arrow copy of the whole corpus in the HF cache,
    # since the tokens end up in our own packed arrays anyway.
    describe = f"data.files={list(files)} ({fmt})"
    try:
        docs = datasets.load_dataset(
            _BUILDERS[fmt], data_files=paths, split="train", streaming=True, **kwargs
        )
    except Exception as err:  # pyarrow, json and datasets each raise their own kinds
        raise DataError(f"could not read {describe}: {type(err).__name__}: {err}") from err
    if max_documents is not None:
        docs = docs.take(max_documents)
    field = "text" if fmt == "text" else text_field
    return Source(docs, field, _digest([fingerprint, max_documents]), describe, files=paths)


def check_readable(paths: list[str], fmt: str) -> None:
    """Per file, before `datasets` reads them all at once and reports a failure without naming
    the file: an empty file, or a parquet file whose footer pyarrow cannot read."""
    for path in paths:
        if os.path.getsize(path) == 0:
            raise DataError(f"data.files: {path} is empty")
        if fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                pq.read_metadata(path)
            except Exception as err:
                raise DataError(f"data.files: {path} is not a readable parquet file ({err})") from err


def load_hf(
    path: str,
    name: Optional[str],
    split: str,
    text_field: str,
    *,
    streaming: bool,
    max_documents: Optional[int],
) -> Source:
    from .hub import hub_offline, hub_unreachable

    where = f"data.path={path!r}" + (f" data.name={name!r}" if name else "") + f" split={split!r}"
    on_disk = os.path.isdir(os.path.expanduser(path))
    if not on_disk and not hub_offline():
        unreachable = hub_unreachable()
        if unreachable:
            raise DataError(
                f"{where}: not a local directory and the hub {unreachable}; for a dataset in "
                "your HF cache set HF_HUB_OFFLINE=1"
            )
    try:
        docs = datasets.load_dataset(path, name, split=split, streaming=streaming)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{where}: dataset not found ({err})") from err
    except ValueError as err:  # e.g. an unknown split or config name
        raise DataError(f"{where}: {err}") from err
    except (OSError, ConnectionError) as err:  # offline and not cached, or the hub went away
        offline = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if hub_offline() else ""
        raise DataError(f"{where}: could not load it{offline}: {type(err).__name__}: {err}") from err
    fingerprint = None
    if isinstance(docs, datasets.Dataset):
        if max_documents is not None:
            docs = docs.select(range(min(max_documents, len(docs))))
        # The Arrow fingerprint changes with the prepared data itself (new revision, new files).
        fingerprint = _digest(["hf", path, name, split, getattr(docs, "_fingerprint", None)])
    elif max_documents is not None:
        docs = docs.take(max_documents)
    return Source(docs, text_field, fingerprint, where)


def iter_texts(source: Source, batch_size: int = 256) -> Iterator[list[str]]:
    """Batches of non-empty document texts, in the source's order.

    A document whose text field is absent or null is invalid: once the source is read through
    (at the first one, for a lazy stream) the run stops with their count and the first one's
    position, unless `source.skip_invalid`, which warns with the same facts and goes on. A text
    that is not a string stops the run at once. Empty texts carry nothing to train on and are
    left out."""
    docs = source.documents
    field = source.text_field
    columns = docs.column_names
    if columns is not None and field not in columns:
        raise DataError(
            f"data.text_field={field!r} is not a column of {source.describe}; "
            f"columns: {', '.join(columns)}"
        )
    seen = invalid = empty = 0
    first_invalid: Optional[int] = None  # 0-based document index
    try:
        for batch in docs.select_columns([field]).iter(batch_size=batch_size):
            texts = []
            for i, text in enumerate(batch[field]):
                if isinstance(text, str):
                    if text:
                        texts.append(text)
                    else:
                        empty += 1
                    continue
                if text is not None:
                    raise DataError(
                        f"data.text_field={field!r} holds a {type(text).__name__} ({str(text)[:40]!r}), "
                        f"not text, in {_where(source, seen + i)}"
                    )
                invalid += 1
                if first_invalid is None:
                    first_invalid = seen + i
                    if source.lazy and not source.skip_invalid:
                        raise DataError(_invalid_message(source, 1, None, first_invalid))
            seen += len(batch[field])
            if texts:
                yield texts
    except KeyError as err:
        raise DataError(f"data.text_field={field!r} is missing from documents of {source.describe}") from err
    except DataError:
        raise
    except (OSError, ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as err:
        raise DataError(f"could not read {source.describe}: {type(err).__name__}: {err}") from err
    if invalid:
        if not source.skip_invalid:
            raise DataError(_invalid_message(source, invalid, seen, first_invalid))
        log.warning("data: %s", _invalid_message(source, invalid, seen, first_invalid))
    if empty:
        log.info("data: %d empty documents of %s left out", empty, source.describe)


def check_text(source: Source, value, index: Optional[int]) -> Optional[str]:
    """One streamed document's text: the string, None for an empty one or (with
    data.skip_invalid_documents) an invalid one; a DataError otherwise, as in iter_texts."""
    if isinstance(value, str):
        return value or None
    if value is not None:
        where = _where(source, index) if index is not None else f"a document of {source.describe}"
        raise DataError(f"data.text_field={source.text_field!r} holds a {type(value).__name__} ({str(value)[:40]!r}), not text, in {where}")
    if not source.skip_invalid:
        raise DataError(_invalid_message(source, 1, None, index))
    return None


def _invalid_message(source: Source, count: int, total: Optional[int], first: Optional[int]) -> str:
    of = f" of {total}" if total is not None else ""
    head = (
        f"{count}{of} documents have no {source.text_field!r} (absent or null); "
        f"the first is {_where(source, first)}"
    )
    if source.skip_invalid:
        return head + "; skipped (data.skip_invalid_documents=true)"
    return head + (
        ". Fix the data or set data.text_field, or pass data.skip_invalid_documents=true to "
        "train on the others"
    )


def _where(source: Source, index: Optional[int]) -> str:
    """Where document `index` (0-based, in the source's order) is: a file and line for local
    JSON lines files, which are read one document per non-blank line; its position otherwise."""
    if index is None:  # a rank's share of a stream: its position in the whole is not known
        return f"a document of {source.describe}"
    files = source.files or []
    if files and all(p.lower().endswith((".jsonl", ".ndjson")) for p in files):
        left = index
        for path in files:
            with open(path, "rb") as f:
                for line_number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if left == 0:
                        return f"{path} line {line_number}"
                    left -= 1
    return f"document {index + 1} of {source.describe}"
