"""CT in Hounsfield units gets the CT window whatever file it comes in (DICOM, NIfTI, NRRD), by the file's modality,
an explicit one (segment --modality, the manifest's field, the app's --conf / request), or the automatic rule."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ibisagent.cli import main
from ibisagent.clicks import Click
from ibisagent.data.trajectory import read_trajectories
from ibisagent.imaging import display_window, load_image, looks_like_hounsfield, slice_of, to_display_rgb
from ibisagent.metrics import iou
from ibisagent.tools import load_tool

FIELD_CASE = Path(__file__).parent / "data" / "ct_window_nifti"  # ../shared/field-cases/ct-window-nifti
ROOT = Path(__file__).resolve().parents[1]
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
LESION_CLICK = Click(x=36, y=44, positive=True)  # the lesion centre (column 36, row 44)


def _one_click_iou(image_path: Path, modality: str | None = None) -> tuple[float, np.ndarray]:
    image = load_image(image_path, modality=modality)
    rgb = to_display_rgb(slice_of(image, 2), image.modality)
    mask = load_tool("embedded").encode(rgb).predict([LESION_CLICK]).mask
    return iou(mask, np.load(FIELD_CASE / "lesion_gt.npy")), rgb


def test_field_case_nifti_is_seen_and_segmented_like_the_dicom_copy() -> None:
    nifti_iou, nifti_rgb = _one_click_iou(FIELD_CASE / "nifti" / "ct.nii.gz")
    dicom_iou, dicom_rgb = _one_click_iou(FIELD_CASE / "dicom")
    assert np.array_equal(nifti_rgb, dicom_rgb)  # the same picture, CT window W400/L40
    lesion = np.load(FIELD_CASE / "lesion_gt.npy")
    liver_ring = np.zeros_like(lesion)
    liver_ring[30:60, 22:52] = True
    liver_ring &= ~lesion
    contrast = float(nifti_rgb[..., 0][liver_ring].mean() - nifti_rgb[..., 0][lesion].mean())
    assert contrast > 15  # 22 grey levels in the CT window; a percentile stretch gave 4
    assert nifti_iou > 0.9 and dicom_iou > 0.9
    low_iou, _ = _one_click_iou(FIELD_CASE / "nifti" / "ct.nii.gz", modality="MR")  # an explicit modality wins
    assert low_iou < 0.5


def test_the_automatic_rule_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ibisagent.imaging.io"):
        image = load_image(FIELD_CASE / "nifti" / "ct.nii.gz")
    assert image.modality == "CT"
    assert any("Hounsfield" in r.getMessage() for r in caplog.records)
    assert display_window(slice_of(image, 2), image.modality).to_dict() == {
        "kind": "window", "width": 400.0, "level": 40.0, "name": "soft_tissue"}


def _ct_small() -> tuple[np.ndarray, pydicom.Dataset]:
    ds = pydicom.dcmread(str(PYDICOM_FILES / "CT_small.dcm"))
    return load_image(PYDICOM_FILES / "CT_small.dcm").array, ds


@pytest.mark.parametrize("store", ["nifti_int16", "nifti_float32", "nifti_scaled_uint16", "nrrd_int16", "nrrd_float"])
def test_hu_from_another_source_gets_the_same_picture_as_its_dicom(tmp_path: Path, store: str) -> None:
    """pydicom's CT_small.dcm (a real CT slice, air read near -850 HU) stored as a 3-slice volume in several ways."""
    hu, _ = _ct_small()
    volume = np.repeat(hu[None], 3, axis=0)  # (Z, Y, X)
    stored = volume.transpose(2, 1, 0)[::-1, ::-1]  # (i, j, k) in RAS, as NIfTI files are usually stored
    affine = np.diag([0.66, 0.66, 2.5, 1.0])
    if store.startswith("nifti"):
        path = tmp_path / "ct.nii.gz"
        if store == "nifti_int16":
            img = nib.Nifti1Image(stored.astype(np.int16), affine)
        elif store == "nifti_float32":
            img = nib.Nifti1Image(stored.astype(np.float32), affine)
        else:  # unsigned storage with slope/intercept, as some converters write it
            img = nib.Nifti1Image((stored + 1024).astype(np.uint16), affine)
            img.header.set_slope_inter(1.0, -1024.0)
        nib.save(img, str(path))
    else:
        path = tmp_path / "ct.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(volume.astype(np.int16 if store == "nrrd_int16" else np.float32)),
                        str(path))
    image = load_image(path)
    assert image.modality == "CT"
    expected = to_display_rgb(hu, "CT")
    got = to_display_rgb(slice_of(image, 1), image.modality)
    assert np.array_equal(got, expected)


def test_ct_with_padding_outside_the_field_of_view_is_still_ct() -> None:
    hu, _ = _ct_small()
    yy, xx = np.mgrid[: hu.shape[0], : hu.shape[1]]
    padded = np.where((yy - 64) ** 2 + (xx - 64) ** 2 > 60**2, -3024.0, hu)
    assert looks_like_hounsfield(padded)


@pytest.mark.parametrize("source", ["mr_small", "anatomical", "brain_t1", "zscored", "phase", "subtraction_uint"])
def test_non_ct_volumes_keep_the_percentile_stretch(source: str) -> None:
    rng = np.random.default_rng(0)
    if source == "mr_small":
        values = load_image(PYDICOM_FILES / "MR_small.dcm").array
    elif source == "anatomical":
        values = load_image(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii").array
    elif source == "brain_t1":
        values = load_image(ROOT / "sample_data" / "studies" / "brain_t1.nii").array
    elif source == "zscored":
        values = rng.normal(0, 1, (8, 32, 32)).astype(np.float32)
    elif source == "phase":  # MR phase maps span -4096..4096 evenly
        values = rng.uniform(-4096, 4096, (8, 32, 32)).astype(np.float32)
    else:
        values = rng.integers(0, 4096, (8, 32, 32)).astype(np.uint16)
    assert not looks_like_hounsfield(values)


def test_the_shipped_sample_volume_is_ct() -> None:
    image = load_image(ROOT / "sample_data" / "studies" / "ct_volume.nii.gz")
    assert image.modality == "CT"
    assert display_window(slice_of(image, 16), image.modality).kind == "window"


def test_eval_uses_the_manifest_modality_and_the_automatic_rule(tmp_path: Path) -> None:
    """One oracle click on the lesion, through `eval`: the automatic rule ("" modality) and "CT" give the DICOM
    result; "MR" (the manifest's word wins) gives the percentile stretch."""
    from PIL import Image as PILImage

    PILImage.fromarray((np.load(FIELD_CASE / "lesion_gt.npy") * 255).astype(np.uint8)).save(tmp_path / "lesion.png")
    image = os.path.relpath(FIELD_CASE / "nifti" / "ct.nii.gz", tmp_path)
    lines = [{"id": f"as_{m or 'auto'}", "image": image, "modality": m, "slice": 2,
              "instruction": "Segment the liver lesion.", "targets": [{"name": "lesion", "mask": "lesion.png"}]}
             for m in ("", "CT", "MR")]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code = main(["eval", str(manifest), "--policy", "oracle", "--out", str(tmp_path / "out"), "--max-steps", "1",
                 "--no-progress", "--trajectories"])
    assert code == 0
    cases = {c["id"]: c for c in json.loads((tmp_path / "out" / "results.json").read_text())["cases"]}
    assert cases["as_auto"]["iou"] > 0.9 and cases["as_CT"]["iou"] > 0.9 and cases["as_MR"]["iou"] < 0.5
    windows = {r.id: r.window["kind"] for r in read_trajectories(tmp_path / "out" / "trajectories.jsonl")}
    assert windows == {"as_auto": "window", "as_CT": "window", "as_MR": "percentile"}
