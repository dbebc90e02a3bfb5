"""sample_data/: every case in the manifest loads, masks are binary and fit, and the generator is deterministic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ibisagent.data import Case, load_case, read_manifest
from ibisagent.imaging import load_image

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
MANIFEST = SAMPLE / "manifest.jsonl"


def _cases() -> list[Case]:
    entries = read_manifest(MANIFEST)
    bad = [e for e in entries if not isinstance(e, Case)]
    assert not bad, bad
    return entries  # type: ignore[return-value]


def test_manifest_size_and_coverage() -> None:
    cases = _cases()
    assert 14 <= len(cases) <= 24
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
    assert {r["modality"] for r in rows} >= {"CT", "MR", "fundus", "US"}
    assert any(t.mask is None for c in cases for t in c.targets), "an absent-target case"
    assert any(len(c.targets) >= 2 for c in cases), "a multi-target case"
    assert any(c.initial_mask is not None for c in cases), "a refinement case"
    assert any(c.image.is_dir() for c in cases), "a DICOM series case"
    assert any(c.image.name.endswith(".nii.gz") and c.slice is not None for c in cases), "a NIfTI volume case"
    kinds = {load_image(c.image).array.dtype.name for c in cases if c.image.suffix == ".png"}
    assert {"uint16", "uint8"} <= kinds
    assert any(load_image(c.image).array.ndim == 3 for c in cases if c.image.suffix == ".png"), "an RGB PNG"


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_every_case_loads(case: Case) -> None:
    loaded = load_case(case)
    h, w = loaded.rgb.shape[:2]
    assert loaded.rgb.shape == (h, w, 3) and loaded.rgb.dtype == np.uint8
    assert loaded.rgb.std() > 5, "display image should not be flat"
    for name, mask in loaded.targets.items():
        if mask is None:
            continue
        assert mask.dtype == bool and mask.shape == (h, w), name
        assert 0 < mask.sum() < mask.size, name
    if loaded.initial_mask is not None:
        assert loaded.initial_mask.shape == (h, w)


def test_sample_data_is_small() -> None:
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 4 * 1024 * 1024


def test_generator_is_deterministic(tmp_path: Path) -> None:
    out = tmp_path / "sample"
    subprocess.run([sys.executable, str(SAMPLE / "make_sample_data.py"), "--out", str(out)], check=True,
                   capture_output=True, timeout=120)
    assert (out / "manifest.jsonl").read_text() == MANIFEST.read_text()
    for rel in ("synthetic/ct_abdomen.png", "synthetic/fundus.png", "synthetic/ct_volume_liver.nii.gz",
                "real/retina_vessels.png", "real/anatomical_ventricles.nii.gz"):
        assert (out / rel).read_bytes() == (SAMPLE / rel).read_bytes(), rel
    generated = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(SAMPLE) for p in SAMPLE.rglob("*")
                       if p.is_file() and p.name not in ("make_sample_data.py", "README.md"))
    assert generated == committed
