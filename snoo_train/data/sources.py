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
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional, Union

import datasets

from .errors import DataError

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
    kwargs = {"sample_by": sample_by} if fmt == "text" else {}
    fingerprint = _digest(
        ["local", fmt, sample_by if fmt == "text" else None, [_stat(p) for p in paths]]
    )
    # Streaming reads the files in place: no Arrow copy of the whole corpus in the HF cache,
    # since the tokens end up in our own packed arrays anyway.
    docs = datasets.load_dataset(
        _BUILDERS[fmt], data_files=paths, split="train", streaming=True, **kwargs
    )
    if max_documents is not None:
        docs = docs.take(max_documents)
    field = "text" if fmt == "text" else text_field
    return Source(
        docs, field, _digest([fingerprint, max_documents]), f"data.files={list(files)} ({fmt})"
    )


def load_hf(
    path: str,
    name: Optional[str],
    split: str,
    text_field: str,
    *,
    streaming: bool,
    max_documents: Optional[int],
) -> Source:
    where = f"data.path={path!r}" + (f" data.name={name!r}" if name else "") + f" split={split!r}"
    try:
        docs = datasets.load_dataset(path, name, split=split, streaming=streaming)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{where}: dataset not found ({err})") from err
    except ValueError as err:  # e.g. an unknown split or config name
        raise DataError(f"{where}: {err}") from err
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
    """Batches of non-empty document texts, in the source's order."""
    docs = source.documents
    columns = docs.column_names
    if columns is not None and source.text_field not in columns:
        raise DataError(
            f"data.text_field={source.text_field!r} is not a column of {source.describe}; "
            f"columns: {', '.join(columns)}"
        )
    try:
        for batch in docs.select_columns([source.text_field]).iter(batch_size=batch_size):
            texts = [t for t in batch[source.text_field] if t]
            if texts:
                yield texts
    except KeyError as err:
        raise DataError(
            f"data.text_field={source.text_field!r} is missing from documents of {source.describe}"
        ) from err
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise DataError(f"could not read {source.describe}: {err}") from err
