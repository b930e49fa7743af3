"""Held-out validation documents, chosen by a hash of the document text.

Hashing the text (rather than drawing with the training seed, or hashing a path) makes the
split the same for every seed, world size and machine, and sends identical documents (the
standard library has a few duplicated files) to the same side: no validation text can ever
reach training by way of a copy.
"""

from __future__ import annotations

import hashlib


def document_hash(text: str) -> float:
    """A stable number in [0, 1) for a document."""
    digest = hashlib.sha1(text.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_validation(text: str, val_fraction: float) -> bool:
    return val_fraction > 0.0 and document_hash(text) < val_fraction
