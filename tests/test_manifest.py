"""ibisagent.data.manifest: parsing the JSONL contract and loading cases with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from ibisagent.data import Case, CaseError, LoadedCase, load_case, read_manifest
from ibisagent.imaging import save_mask_like, save_mask_png, load_image


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _row(case_id: str = "c1", **extra: object) -> dict:
    row = {"id": case_id, "image": "img.png", "modality": "US", "instruction": "Segment the lesion.",
           "targets": [{"name": "lesion", "mask": "mask.png"}]}
    row.update(extra)
    return row


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    img = np.random.default_rng(1).integers(0, 255, (40, 50), dtype=np.uint8)
    PILImage.fromarray(img).save(tmp_path / "img.png")
    mask = np.zeros((40, 50), bool)
    mask[10:20, 15:30] = True
    save_mask_png(mask, tmp_path / "mask.png")
    return tmp_path


def test_valid_case_paths_relative_to_manifest(folder: Path) -> None:
    (entry,) = read_manifest(_write(folder / "m.jsonl", [_row(initial_mask="mask.png", answer="yes")]))
    assert isinstance(entry, Case)
    assert entry.image == folder / "img.png" and entry.targets[0].mask == folder / "mask.png"
    assert entry.initial_mask == folder / "mask.png" and entry.answer == "yes" and entry.line == 1
    loaded = load_case(entry)
    assert isinstance(loaded, LoadedCase)
    assert loaded.rgb.shape == (40, 50, 3) and loaded.rgb.dtype == np.uint8
    assert loaded.targets["lesion"].dtype == bool and loaded.targets["lesion"].sum() == 150
    assert loaded.initial_mask is not None and loaded.initial_mask.shape == (40, 50)


def test_bad_lines_do_not_abort_the_rest(folder: Path) -> None:
    rows = [
        _row("good"),
        "{not json",
        "",
        _row("nomod", modality=None) | {},
        {"id": "x", "image": "img.png"},
        _row("good"),
        _row("../escape"),
        _row("a/b"),
        _row("sp ace"),
        _row("typed", targets="mask.png"),
        _row("badslice", slice=-1),
        _row("notargets", targets=[]),
        _row("vqa", targets=[], answer="yes"),
        [1, 2],
    ]
    manifest = _write(folder / "m.jsonl", rows)
    entries = read_manifest(manifest)
    assert len(entries) == 13  # the blank line is skipped
    kinds = [type(e).__name__ for e in entries]
    assert kinds == ["Case", "CaseError", "CaseError", "CaseError", "CaseError", "CaseError", "CaseError",
                     "CaseError", "CaseError", "CaseError", "CaseError", "Case", "CaseError"]
    errors = {e.line: e for e in entries if isinstance(e, CaseError)}
    for err in errors.values():
        assert str(manifest) in str(err) and f":{err.line}:" in str(err) and err.path == manifest
    assert "not valid JSON" in str(errors[2]) and errors[2].case_id == "line 2"
    assert "modality" in str(errors[4])
    assert "missing field" in str(errors[5]) and errors[5].case_id == "x"
    assert "duplicate id" in str(errors[6])
    for line in (7, 8, 9):
        assert "invalid id" in str(errors[line])
    assert "targets" in str(errors[10]) and "slice" in str(errors[11]) and "targets" in str(errors[12])
    assert "JSON object" in str(errors[14])


def test_missing_manifest_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "none.jsonl")


def _load_error(folder: Path, row: dict) -> CaseError:
    (entry,) = read_manifest(_write(folder / "m.jsonl", [row]))
    assert isinstance(entry, Case), entry
    with pytest.raises(CaseError) as info:
        load_case(entry)
    return info.value


def test_load_errors_name_the_file(folder: Path) -> None:
    err = _load_error(folder, _row(image="nope.png"))
    assert "nope.png" in str(err) and err.case_id == "c1"
    err = _load_error(folder, _row(targets=[{"name": "lesion", "mask": "gone.png"}]))
    assert "gone.png" in str(err)
    save_mask_png(np.ones((41, 50), bool), folder / "big.png")
    err = _load_error(folder, _row(targets=[{"name": "lesion", "mask": "big.png"}]))
    assert "big.png" in str(err) and "(41, 50)" in str(err) and "(40, 50)" in str(err)
    PILImage.fromarray(np.arange(2000, dtype=np.uint8).reshape(40, 50) % 3).save(folder / "multi.png")
    err = _load_error(folder, _row(targets=[{"name": "lesion", "mask": "multi.png"}]))
    assert "multi.png" in str(err) and "not binary" in str(err)


def test_empty_mask_needs_null(folder: Path) -> None:
    save_mask_png(np.zeros((40, 50), bool), folder / "empty.png")
    err = _load_error(folder, _row(targets=[{"name": "lesion", "mask": "empty.png"}]))
    assert "empty mask for target 'lesion'" in str(err) and "empty.png" in str(err) and "null" in str(err)
    (entry,) = read_manifest(_write(folder / "m.jsonl", [_row(targets=[{"name": "stone", "mask": None}])]))
    assert load_case(entry).targets == {"stone": None}


def test_volume_cases(folder: Path, tmp_path: Path) -> None:
    import nibabel as nib

    vol = np.random.default_rng(2).normal(0, 100, (20, 30, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 3.0, 1.0])), str(folder / "vol.nii.gz"))
    image = load_image(folder / "vol.nii.gz")
    mask = np.zeros(image.array.shape, bool)
    mask[3, 5:10, 5:12] = True
    save_mask_like(mask, image, folder / "vm.nii.gz")
    row = _row(image="vol.nii.gz", modality="CT", targets=[{"name": "lesion", "mask": "vm.nii.gz"}])
    err = _load_error(folder, row)
    assert "needs 'slice'" in str(err) and "vol.nii.gz" in str(err)
    err = _load_error(folder, row | {"slice": 8})
    assert "out of range" in str(err)
    err = _load_error(folder, row | {"slice": 4})
    assert "empty mask" in str(err) and "slice 4" in str(err)
    (entry,) = read_manifest(_write(folder / "m.jsonl", [row | {"slice": 3}]))
    loaded = load_case(entry)
    assert loaded.rgb.shape == (30, 20, 3) and np.array_equal(loaded.targets["lesion"], mask[3])
