"""Trajectory records: mask RLE and the JSONL file round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ibisagent.data.trajectory import (
    ClickRecord,
    StepRecord,
    TrajectoryRecord,
    read_trajectories,
    rle_decode,
    rle_encode,
    write_trajectories,
)


@settings(max_examples=200, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_rle_round_trip(mask: np.ndarray) -> None:
    rle = rle_encode(mask)
    assert rle["size"] == list(mask.shape)
    np.testing.assert_array_equal(rle_decode(rle), mask)


def test_rle_rejects_inconsistent_counts() -> None:
    with pytest.raises(ValueError, match="sum"):
        rle_decode({"size": [2, 2], "counts": [1, 1]})


def test_jsonl_round_trip_and_bad_line(tmp_path: Path) -> None:
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 2:4] = True
    record = TrajectoryRecord(
        id="c1", instruction="segment it", image="img.png", target="organ", tool="embedded", source="simulated",
        steps=[StepRecord(clicks=[ClickRecord(0.5, 0.375, 2, 1, True)], mask=rle_encode(mask), iou=0.9)],
        final_iou=0.9, final_dice=0.95, stop_reason="iou_reached",
    )
    path = write_trajectories(tmp_path / "t.jsonl", [record, record])
    back = list(read_trajectories(path))
    assert back == [record, record]
    np.testing.assert_array_equal(back[0].final_mask(), mask)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:3"):
        list(read_trajectories(path))
