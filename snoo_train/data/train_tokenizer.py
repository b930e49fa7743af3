"""`python -m snoo_train.data.train_tokenizer [overrides]`: a byte-level BPE tokenizer from a data config.

The corpus is named by the same `data.*` keys as training (snoo_train/configs/train_tokenizer.yaml
composes the same data group), and only the documents training would train on shape the
tokenizer: those that the validation hash (split.py) holds out are skipped, so validation text
never leaks into the vocabulary. The result is a directory `AutoTokenizer.from_pretrained` loads,
so training takes it as `data.tokenizer=DIR`:

    python -m snoo_train.data.train_tokenizer data=local 'data.files=[corpus/*.jsonl]' \\
        tokenizer.vocab_size=32000 tokenizer.out=tok/corpus32k
    python -m snoo_train.train data=local 'data.files=[corpus/*.jsonl]' data.tokenizer=tok/corpus32k

The directory is written next to `tokenizer.out` and renamed into place only when complete, so
an interrupted run never leaves a half-written tokenizer where training would load it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Optional

from snoo_train.config import ConfigError, TokenizerJob, _check_data

from .build import open_hf, open_sources
from .errors import DataError
from .sources import Source, iter_texts, read_stdlib
from .split import is_validation
from .tool import run_tool

log = logging.getLogger(__name__)

# Written into the output directory beside the tokenizer files: what made it.
META_FILE = "snoo_train_tokenizer.json"
# The byte-level alphabet: every byte is a symbol of its own, so any text encodes without an
# unknown token. A vocabulary must exceed it plus the EOS to hold a single merge.
BYTE_SYMBOLS = 256


@dataclasses.dataclass
class _Counts:
    """Filled in while the trainer consumes the corpus (it is read once, as a stream)."""

    documents: int = 0
    characters: int = 0
    held_out: int = 0


def check_job(job: TokenizerJob) -> None:
    """Refuse bad values before any data is read; each message names its key."""
    t = job.tokenizer
    if not t.out:
        raise ConfigError(
            "tokenizer.out is not set; name the directory to write (tokenizer.out=DIR)"
        )
    if t.vocab_size <= BYTE_SYMBOLS + 1:
        raise ConfigError(
            f"tokenizer.vocab_size={t.vocab_size} must be > {BYTE_SYMBOLS + 1} "
            f"({BYTE_SYMBOLS} byte symbols + the EOS, and at least one merge)"
        )
    if t.min_frequency < 1:
        raise ConfigError(f"tokenizer.min_frequency={t.min_frequency} must be >= 1")
    if not t.eos_token:
        raise ConfigError("tokenizer.eos_token is empty; documents need an end-of-text token")
    if job.data.source == "prepared":
        raise ConfigError(
            "data.source=prepared: a store is already tokenized; train the tokenizer on the source "
            "the store was prepared from (data=stdlib, data=local or data=hf)"
        )
    _check_data(job.data)
    _check_out(t.out, t.overwrite)


def _check_out(out: str, overwrite: bool) -> None:
    """An existing tokenizer (or anything else) at `out` is replaced only on request."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise ConfigError(
            f"tokenizer.out={out!r} exists and is not a directory; choose another path"
        )
    if os.listdir(out) and not overwrite:
        raise ConfigError(
            f"tokenizer.out={out!r} already exists and is not empty; pass tokenizer.overwrite=true "
            "to replace it, or choose another directory"
        )


def _training_source(data) -> tuple[Source, bool]:
    """The documents to read, and whether the validation hash applies to them (it does not when
    a named split, `data.val_split`, holds the validation documents)."""
    if data.source == "hf" and data.streaming:
        # A stream reads the hub dataset as it trains instead of downloading it all first.
        return open_hf(data, data.split, streaming=True), not data.val_split
    listing, source, _, _ = open_sources(data)
    if source is None:  # the standard library is only listed by open_sources
        source = read_stdlib(listing)
    return source, not (data.source == "hf" and data.val_split)


def _texts(source: Source, val_fraction: float, counts: _Counts) -> Iterator[str]:
    """The training documents, one at a time, counted as the trainer takes them.

    Same rule as training's split (packing.pack_split): a document whose hash falls below
    `val_fraction` is validation. pack_split's fallback (hold out the lowest hash when no
    document falls below it, in a tiny corpus) needs the whole corpus first and is not repeated:
    it only matters for corpora too small to train a tokenizer on."""
    for batch in iter_texts(source):
        for text in batch:
            if val_fraction > 0 and is_validation(text, val_fraction):
                counts.held_out += 1
                continue
            counts.documents += 1
            counts.characters += len(text)
            yield text


def _train(job: TokenizerJob, source: Source, hash_split: bool, counts: _Counts):
    """The HF `tokenizers` BPE model, GPT-2 style byte-level, trained on the stream."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    t = job.tokenizer
    tok = Tokenizer(models.BPE())
    # No prefix space: decode(encode(text)) gives back the text exactly, the first word included.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=t.vocab_size,
        min_frequency=t.min_frequency,
        special_tokens=[t.eos_token],  # id 0
        # All 256 byte symbols, even those the corpus lacks: no text is ever unencodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    docs = source.documents
    length = len(docs) if hasattr(docs, "__len__") else None  # for the progress bar only
    val_fraction = job.data.val_fraction if hash_split else 0.0
    tok.train_from_iterator(_texts(source, val_fraction, counts), trainer=trainer, length=length)
    if counts.documents == 0:
        raise DataError(
            f"{source.describe}: no training documents to train a tokenizer on "
            f"({counts.held_out} held out for validation, data.val_fraction={job.data.val_fraction})"
        )
    return tok


def _save(job: TokenizerJob, tok, counts: _Counts, partial: str) -> int:
    """Write the transformers directory and the record of what made it; the final vocab size."""
    from transformers import PreTrainedTokenizerFast

    t = job.tokenizer
    # EOS only: training separates packed documents with it; a BOS, pad or unk token would be
    # ids the model never sees (byte-level BPE has no unknown input).
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=t.eos_token, clean_up_tokenization_spaces=False
    )
    fast.save_pretrained(partial)
    _portable_class(partial)
    meta = {
        "data": dataclasses.asdict(job.data),
        "vocab_size": t.vocab_size,
        "trained_vocab_size": len(fast),
        "min_frequency": t.min_frequency,
        "eos_token": t.eos_token,
        "documents": counts.documents,
        "characters": counts.characters,
        "held_out_documents": counts.held_out,
    }
    # Sorted keys and no timestamp: the same corpus and config give the same bytes.
    with open(os.path.join(partial, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    return len(fast)


def _portable_class(directory: str) -> None:
    """transformers 5 records its class as TokenizersBackend, which transformers 4 (the project
    accepts >= 4.56) cannot load; PreTrainedTokenizerFast is the same class to both."""
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def _move_into_place(partial: str, out: str) -> None:
    """Rename the complete directory to `out`; an old one is removed only after that succeeds."""
    old: Optional[str] = None
    if os.path.lexists(out):
        old = f"{out}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    try:
        os.replace(partial, out)
    except OSError:
        if old is not None:
            os.replace(old, out)  # put the previous tokenizer back
        raise
    if old is not None:
        shutil.rmtree(old)


def train_tokenizer(job: TokenizerJob) -> str:
    """Train a byte-level BPE tokenizer on the training documents of `job.data`, save it to
    `job.tokenizer.out`; return that directory."""
    check_job(job)
    out = os.path.normpath(os.path.expanduser(job.tokenizer.out))
    start = time.perf_counter()
    source, hash_split = _training_source(job.data)
    counts = _Counts()
    tok = _train(job, source, hash_split, counts)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    # Next to `out`, so the final rename stays on one file system (atomic).
    partial = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        vocab = _save(job, tok, counts, partial)
        _move_into_place(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info(
        "tokenizer: %d documents (%d held out for validation), %d characters -> vocab %d in %.1f s: %s",
        counts.documents, counts.held_out, counts.characters, vocab, time.perf_counter() - start, out,
    )  # fmt: skip
    if vocab < job.tokenizer.vocab_size:
        log.warning(
            "tokenizer: the corpus supports only %d of tokenizer.vocab_size=%d tokens "
            "(too few pairs reach tokenizer.min_frequency=%d)",
            vocab, job.tokenizer.vocab_size, job.tokenizer.min_frequency,
        )  # fmt: skip
    return out


def main(argv: Optional[list[str]] = None) -> None:
    run_tool("train_tokenizer", TokenizerJob, __doc__, train_tokenizer, argv)


if __name__ == "__main__":
    main()
