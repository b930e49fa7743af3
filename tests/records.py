"""Comparing metrics.jsonl records of two runs, key by key.

A key that one run logged at a step and the other did not is a difference, not a None to skip
over; a value outside the tolerance is a difference too. Every difference names its step and key.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest


def assert_records_match(
    got: Sequence[dict[str, Any]],
    want: Sequence[dict[str, Any]],
    keys: Iterable[str],
    rel: float | None = None,
    abs: float | None = None,  # noqa: A002  (pytest.approx's own name)
) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], "the runs logged other steps"
    for key in keys:
        for a, b in zip(got, want, strict=True):
            where = f"step {b['step']}, {key!r}"
            assert (key in a) == (key in b), f"{where}: logged by only one run ({key in a}, {key in b})"
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=rel, abs=abs), f"{where}: {a[key]} != {b[key]}"
