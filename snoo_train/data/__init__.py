"""Token data: sources (embedded standard library, hub datasets, local files), tokenizers,
packing into fixed windows, token stores (prepare once, memory-map), held-out validation, and
per-rank resumable batches."""

from .build import build_datasets, resolve_tokenizer
from .errors import DataError
from .loader import BatchLoader, eval_batches
from .packing import PackedDataset, StreamingPackedDataset
from .prefetch import PrefetchLoader, pin_batches
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "BatchLoader",
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "PackedDataset",
    "PrefetchLoader",
    "StreamingPackedDataset",
    "Tokenizer",
    "build_datasets",
    "resolve_tokenizer",
    "build_tokenizer",
    "eval_batches",
    "pin_batches",
]
