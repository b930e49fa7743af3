"""Token data: sources (embedded standard library, hub datasets, local files), tokenizers,
packing into fixed windows, held-out validation, and per-rank resumable batches."""

from .build import build_datasets
from .errors import DataError
from .loader import BatchLoader, eval_batches
from .packing import PackedDataset, StreamingPackedDataset
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "BatchLoader",
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "PackedDataset",
    "StreamingPackedDataset",
    "Tokenizer",
    "build_datasets",
    "build_tokenizer",
    "eval_batches",
]
