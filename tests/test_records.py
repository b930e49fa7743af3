"""The record comparison the multi-rank tests rely on fails on every kind of difference."""

from __future__ import annotations

import pytest

from tests.records import assert_records_match

RUN = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_loss": 1.6}]


def test_equal_within_tolerance_passes():
    other = [{"step": 1, "loss": 2.0 + 1e-5}, {"step": 2, "loss": 1.5, "val_loss": 1.6 - 1e-5}]
    assert_records_match(other, RUN, ["loss", "val_loss"], rel=1e-3)


@pytest.mark.parametrize(
    "other, message",
    [
        ([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], "step 2, 'val_loss': logged by only one run"),
        (
            [{"step": 1, "loss": 2.0, "val_loss": 1.0}, {"step": 2, "loss": 1.5, "val_loss": 1.6}],
            "step 1, 'val_loss': logged by only one run",
        ),
        ([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.6, "val_loss": 1.6}], "step 2, 'loss'"),
        ([{"step": 1, "loss": 2.0}, {"step": 3, "loss": 1.5, "val_loss": 1.6}], "other steps"),
        ([{"step": 1, "loss": 2.0}], "other steps"),
    ],
)
def test_any_difference_fails(other, message):
    with pytest.raises(AssertionError, match=message):
        assert_records_match(other, RUN, ["loss", "val_loss"], rel=1e-3)
