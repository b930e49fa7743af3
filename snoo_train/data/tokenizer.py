"""Tokenizers: raw UTF-8 bytes (no files, no network) or any Hugging Face tokenizer.

Both expose the same small surface, so packing never asks which one it has:
`vocab_size`, `eos_id`, `encode`, `encode_batch`, `decode`, and a `fingerprint` that
changes whenever the mapping from text to ids could change (it keys the token cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from .errors import DataError


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; id 256 ends a document."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    fingerprint = "byte-utf8-eos256"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # uint8 views of the encoded bytes: no per-token Python objects on the hot path.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # A window may cut a multi-byte character in half: replace rather than fail.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `transformers` tokenizer; documents are encoded without special tokens and the
    tokenizer's own EOS (or SEP, for tokenizers that have no EOS) separates them."""

    def __init__(self, name_or_path: str):
        tok = load_hf_tokenizer(name_or_path)
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos is None:
            raise DataError(
                f"data.tokenizer={name_or_path!r} defines neither an eos_token nor a sep_token, "
                "so documents could not be separated when packed; choose a tokenizer with an EOS"
            )
        self._tok = tok
        self._fast = getattr(tok, "backend_tokenizer", None)
        self.name = name_or_path
        # len() counts added special tokens, which `tok.vocab_size` leaves out: the embedding
        # table must cover every id the tokenizer can emit.
        self.vocab_size = len(tok)
        self.eos_id = int(eos)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        if self._fast is not None:
            blob = self._fast.to_str()
        else:
            blob = json.dumps(sorted(self._tok.get_vocab().items())) + type(self._tok).__name__
        return "hf-" + hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.encode_batch([text])[0]]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self._fast is not None:
            # The Rust tokenizer directly: batched, parallel, and no "sequence longer than
            # model_max_length" warning, which means nothing for documents that get packed.
            encs = self._fast.encode_batch(list(texts), add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int64) for e in encs]
        ids = self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(x, dtype=np.int64) for x in ids]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, directory: str) -> None:
        """Write the tokenizer where AutoTokenizer.from_pretrained (and data.tokenizer=DIR) loads it."""
        self._tok.save_pretrained(directory)


def load_hf_tokenizer(name_or_path: str):
    """The `transformers` tokenizer `data.tokenizer` names (the trainer's and export's): a local
    directory, or a hub name from the local cache, or from the hub when it answers; never tens
    of seconds of retries against a network that is not there."""
    from transformers import AutoTokenizer

    looks_like_path = name_or_path.startswith(("/", ".", "~")) or os.path.isdir(name_or_path)
    path = os.path.expanduser(name_or_path)
    if looks_like_path and not os.path.exists(path):
        raise FileNotFoundError(f"data.tokenizer={name_or_path!r}: no such tokenizer directory")
    return _load_tokenizer(AutoTokenizer, path if looks_like_path else name_or_path, looks_like_path)


def _load_tokenizer(auto, name: str, local: bool):
    from .hub import hub_offline, hub_unreachable

    try:
        return auto.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        if local:
            raise DataError(f"data.tokenizer={name!r}: not a loadable tokenizer directory ({_short(err)})") from err
    if hub_offline():
        raise DataError(f"data.tokenizer={name!r}: not found locally (HF cache) and HF_HUB_OFFLINE is set")
    unreachable = hub_unreachable()
    if unreachable:
        raise DataError(
            f"data.tokenizer={name!r}: not found locally (HF cache, or a directory) and the hub {unreachable}"
        )
    try:
        return auto.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise DataError(f"data.tokenizer={name!r}: not found on the hub nor locally ({_short(err)})") from err


def _short(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def build_tokenizer(name: str) -> Tokenizer:
    """`"byte"` for the built-in byte tokenizer, otherwise a hub name or a local directory."""
    if name == "byte":
        return ByteTokenizer()
    return HFTokenizer(name)
