"""`build_datasets`: from a DataConfig to packed train and validation token sources."""

from __future__ import annotations

import os
from typing import Union

import numpy as np

from . import cache
from .errors import DataError
from .mixture import Mixture
from .packing import PackedDataset, StreamingPackedDataset, pack_documents, pack_split
from .sources import Source, list_stdlib, load_hf, load_local, read_stdlib
from .store import StoreError, TokenStore, read_manifest
from .streaming import StreamingTrain
from .tokenizer import Tokenizer, build_tokenizer

Packed = Union[PackedDataset, StreamingPackedDataset, StreamingTrain, Mixture]


def store_paths(cfg) -> list[str]:
    """The token stores a data=prepared config reads: data.path, or the mixture's data.paths."""
    return [cfg.path] if cfg.path else [str(p) for p in cfg.paths]


# data.tokenizer=null outside token stores and warm starts: the source's usual tokenizer.
FALLBACK_TOKENIZER = {"stdlib": "byte", "local": "byte", "hf": "gpt2"}


def fallback_tokenizer(cfg) -> str:
    """What data.tokenizer=null means for a source without a tokenizer of its own (a warm start
    sets data.tokenizer before this is asked: models.pretrained.choose_tokenizer)."""
    return FALLBACK_TOKENIZER.get(cfg.source, "byte")


def resolve_tokenizer(cfg) -> Tokenizer:
    """The tokenizer a data config trains with. For token stores: the one they were made with
    (saved in the store), and every store of a mixture must share it; a data.tokenizer given as
    well must be that same tokenizer, or the ids would mean other text."""
    if cfg.source != "prepared":
        return build_tokenizer(cfg.tokenizer or fallback_tokenizer(cfg))
    paths = store_paths(cfg)
    manifests = [read_manifest(p) for p in paths]
    made_with = manifests[0]["tokenizer"]
    for path, meta in zip(paths[1:], manifests[1:]):
        if meta["tokenizer"]["fingerprint"] != made_with["fingerprint"]:
            raise StoreError(
                f"the stores of data.paths were made with different tokenizers: {paths[0]} with "
                f"{made_with['name']!r}, {path} with {meta['tokenizer']['name']!r}; prepare them with one tokenizer"
            )
    tokenizer = build_tokenizer(cfg.tokenizer or store_tokenizer(paths[0], made_with["name"]))
    if tokenizer.fingerprint != made_with["fingerprint"]:
        given = f"data.tokenizer={cfg.tokenizer}" if cfg.tokenizer else f"the tokenizer saved in {paths[0]}"
        raise StoreError(
            f"{given} is not the tokenizer the store {paths[0]} was made with ({made_with['name']!r}, "
            f"fingerprint {made_with['fingerprint']}, this one {tokenizer.fingerprint}); leave data.tokenizer "
            "unset to use the store's, or prepare the store again with this tokenizer"
        )
    return tokenizer


def store_tokenizer(path: str, name: str) -> str:
    """What to load as the tokenizer a store was made with: `byte`, or its saved copy."""
    if name == "byte":
        return "byte"
    saved = os.path.join(os.path.expanduser(path), "tokenizer")
    if not os.path.isdir(saved):
        raise StoreError(f"{path} has no tokenizer/ directory; set data.tokenizer to {name!r}")
    return saved


def training_tokenizer_name(cfg) -> str:
    """The data.tokenizer a run trained with, for export: a store's saved copy when unset. (A
    run records the tokenizer it chose, so null here is only an older or library-built config.)"""
    if cfg.source == "prepared" and not cfg.tokenizer:
        path = store_paths(cfg)[0]
        return store_tokenizer(path, read_manifest(path)["tokenizer"]["name"])
    return cfg.tokenizer or fallback_tokenizer(cfg)


def build_prepared(cfg, *, seed: int):
    """(train, val) from token stores: one store's windows, or a Mixture of several stores'
    training windows with their validation windows evaluated together."""
    paths = store_paths(cfg)
    stores = [TokenStore(p, verify_checksums=cfg.verify_checksums) for p in paths]
    if len(stores) == 1:
        return stores[0].dataset("train", cfg.seq_len), stores[0].dataset("val", cfg.seq_len)
    train = Mixture([s.dataset("train", cfg.seq_len) for s in stores], list(cfg.weights), paths, seed=seed)
    return train, ConcatWindows([s.dataset("val", cfg.seq_len) for s in stores])


class ConcatWindows:
    """Several window sets read as one (the validation windows of a mixture's stores)."""

    def __init__(self, parts):
        self.parts = parts
        self.seq_len = parts[0].seq_len
        self.num_documents = sum(p.num_documents for p in parts)
        self._ends = np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def take(self, indices) -> np.ndarray:
        out = []
        for i in np.asarray(indices, dtype=np.int64):
            part = int(np.searchsorted(self._ends, i, side="right"))
            out.append(self.parts[part].take([i - (int(self._ends[part - 1]) if part else 0)])[0])
        return np.stack(out)


def build_datasets(cfg, tokenizer: Tokenizer, *, seed: int) -> tuple[Packed, Packed]:
    """(train, val) packed to windows of `cfg.seq_len + 1` tokens.

    Map-style `PackedDataset`s for stdlib, local files and non-streaming hub datasets;
    `StreamingPackedDataset`s for `data.streaming=true`, where `seed` shuffles the order of
    the stream's shards and documents. The validation documents are a named split
    (`data.val_split`) or the documents whose text hash falls below `data.val_fraction`;
    they never appear in train.
    """
    if cfg.source == "prepared":
        return build_prepared(cfg, seed=seed)
    if cfg.streaming:
        return _build_streaming(cfg, tokenizer)
    listing, train_source, val_source, fingerprints = open_sources(cfg)
    named_val = cfg.source == "hf" and bool(cfg.val_split)
    key = None
    if cfg.cache_dir and fingerprints[0] is not None:
        key = cache.cache_key(
            inputs=fingerprints,
            tokenizer=tokenizer.fingerprint,
            val_fraction=None if named_val else cfg.val_fraction,
        )
        hit = cache.load(cfg.cache_dir, key)
        if hit is not None:
            train_tokens, val_tokens, meta = hit
            return (
                PackedDataset(train_tokens, cfg.seq_len, num_documents=meta["train_documents"]),
                PackedDataset(val_tokens, cfg.seq_len, num_documents=meta["val_documents"]),
            )

    if train_source is None:
        train_source = read_stdlib(listing)
    if val_source is None:
        train_tokens, val_tokens, n_train, n_val = pack_split(
            train_source, tokenizer, cfg.val_fraction
        )
    else:
        train_tokens, n_train = pack_documents(train_source, tokenizer)
        val_tokens, n_val = pack_documents(val_source, tokenizer)
        if n_train == 0:
            raise DataError(f"{train_source.describe} produced no non-empty documents")
    if key is not None:
        meta = {"train_documents": n_train, "val_documents": n_val, "source": train_source.describe}
        cache.save(cfg.cache_dir, key, train_tokens, val_tokens, meta)
    return (
        PackedDataset(train_tokens, cfg.seq_len, num_documents=n_train),
        PackedDataset(val_tokens, cfg.seq_len, num_documents=n_val),
    )


def open_sources(cfg):
    """(stdlib listing, train source, named validation source, fingerprints for the cache).
    The standard library is only listed and stat-ed here: reading it is the costly part, left
    until the cache misses."""
    listing = train_source = val_source = None
    if cfg.source == "stdlib":
        listing = list_stdlib(cfg.max_documents)
        fingerprints = [listing.fingerprint, None]
    elif cfg.source == "local":
        train_source = load_local(cfg.files, cfg.format, cfg.text_field, cfg.sample_by, cfg.max_documents)
        fingerprints = [train_source.fingerprint, None]
    elif cfg.source == "hf":
        train_source = open_hf(cfg, cfg.split, streaming=False)
        val_source = open_hf(cfg, cfg.val_split, streaming=False) if cfg.val_split else None
        fingerprints = [train_source.fingerprint, val_source.fingerprint if val_source else None]
    else:
        raise DataError(f"data.source={cfg.source!r} is not allowed; choose one of stdlib, hf, local")
    for source in (train_source, val_source):
        if source is not None:
            source.skip_invalid = cfg.skip_invalid_documents
    return listing, train_source, val_source, fingerprints


def open_hf(cfg, split: str, *, streaming: bool) -> Source:
    source = load_hf(
        cfg.path,
        cfg.name,
        split,
        cfg.text_field,
        streaming=streaming,
        max_documents=cfg.max_documents,
    )
    source.skip_invalid, source.lazy = cfg.skip_invalid_documents, streaming
    return source


def _build_streaming(cfg, tokenizer: Tokenizer):
    """Training windows streamed per rank (streaming.StreamingTrain; the loader starts each
    rank's stream), and validation windows from the head of the stream (or the named split)."""
    if cfg.source == "hf":
        stream = open_hf(cfg, cfg.split, streaming=True)
    else:
        stream = open_sources(cfg)[1]
        stream.lazy = True
    common = dict(tokenizer=tokenizer, seq_len=cfg.seq_len, shuffle_buffer=cfg.shuffle_buffer)
    if cfg.source == "hf" and cfg.val_split:
        val = StreamingPackedDataset(open_hf(cfg, cfg.val_split, streaming=True), **common)
        held_out = 0.0  # the named split is the validation set; the train split is all training
    else:
        val = StreamingPackedDataset(stream, keep_validation=True, val_fraction=cfg.val_fraction, **common)
        held_out = cfg.val_fraction
    train = StreamingTrain(stream, tokenizer, cfg.seq_len, val_fraction=held_out, block_windows=cfg.shuffle_buffer)
    return train, val
