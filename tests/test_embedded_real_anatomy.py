"""The ``embedded`` tool on real anatomy: targets made of several tissues, faint targets (oracle click loop)."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_faint_lesion_stays_local_within_10_clicks(tmp_path):
    """Sample data ``ct_liver_lesion``: a lesion about 3 grey levels darker than the liver on display. The first
    positive click must mean the lesion, not everything of similar grey (it used to flood the body: 0.80 after 20)."""
    line = next(
        json.loads(raw) for raw in (SAMPLE / "manifest.jsonl").read_text().splitlines() if '"ct_liver_lesion"' in raw
    )
    line["image"] = str(SAMPLE / line["image"])
    for target in line["targets"]:
        target["mask"] = str(SAMPLE / target["mask"])
    manifest = tmp_path / "lesion.jsonl"
    manifest.write_text(json.dumps(line) + "\n")
    _, results = run_oracle(manifest, EmbeddedTool(), max_steps=10, progress=False)
    assert [r.id for r in results] == ["ct_liver_lesion"]
    (r,) = results
    assert r.error is None, r.error
    assert r.iou >= 0.90, (r.iou, r.targets[0].ious)
    assert r.steps <= 10, r.steps
    # the first click already lands on the lesion, not the body (the flood gave IoU 0.03)
    assert r.targets[0].ious[0] >= 0.5, r.targets[0].ious
