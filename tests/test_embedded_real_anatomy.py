"""The ``embedded`` tool on real anatomy: targets made of several tissues, faint targets (oracle click loop)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ibisagent.evaluate import run_oracle
from ibisagent.tools.embedded import EmbeddedTool

DATA = Path(__file__).parent / "data" / "heterogeneous_target"
SAMPLE = Path(__file__).parent.parent / "sample_data"


def test_whole_brain_over_several_tissues_within_12_clicks():
    """Field case: the whole brain (white + grey matter + nuclei + ventricles) on two real T1 slices."""
    _, results = run_oracle(DATA / "manifest.jsonl", EmbeddedTool(), max_steps=12, progress=False)
    assert [r.id for r in results] == ["axial_82_brain", "sagittal_112_brain"]
    for r in results:
        assert r.error is None, r.error
        assert r.iou >= 0.90, (r.id, r.iou, r.targets[0].ious)
        assert r.steps <= 12, (r.id, r.steps)
