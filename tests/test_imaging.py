"""ibisagent.imaging: loading every supported format, display conversion, mask round trips, DICOM-SEG."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage
from pydicom.data import get_testdata_file

from ibisagent.imaging import (
    CT_WINDOWS,
    ImageError,
    load_image,
    load_mask,
    num_slices,
    save_dicom_seg,
    save_mask_like,
    save_mask_png,
    slice_of,
    to_display_rgb,
)

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
SERIES = SAMPLE / "synthetic" / "ct_series"


def _ras_volume(tmp_path: Path, shape=(12, 10, 6)) -> tuple[Path, np.ndarray, np.ndarray]:
    """A NIfTI stored RAS with an oblique-free affine; returns (path, stored data, affine)."""
    data = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    affine = np.array([[0.8, 0, 0, -5.0], [0, 0.9, 0, 3.0], [0, 0, 2.5, 10.0], [0, 0, 0, 1]])
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path, data, affine


# ---------------------------------------------------------------- 2D pictures


def test_png_8bit_grey_16bit_rgb_rgba(tmp_path: Path) -> None:
    grey = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    PILImage.fromarray(grey).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.array.shape == (48, 64) and img.array.dtype == np.uint8 and not img.is_volume
    assert np.array_equal(img.array, grey)

    deep = (np.arange(48 * 64, dtype=np.uint32) * 20).astype(np.uint16).reshape(48, 64)
    PILImage.fromarray(deep).save(tmp_path / "d.png")
    img16 = load_image(tmp_path / "d.png")
    assert img16.array.dtype == np.uint16 and np.array_equal(img16.array, deep)

    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 17
    PILImage.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img_rgba = load_image(tmp_path / "a.png")
    assert img_rgba.array.shape == (48, 64, 3) and img_rgba.modality == "RGB"
    assert (img_rgba.array[..., 0] == 200).all()


def test_jpeg_loads_rgb(tmp_path: Path) -> None:
    PILImage.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "x.jpg")
    img = load_image(tmp_path / "x.jpg")
    assert img.array.shape == (20, 30, 3)
    assert num_slices(img) == 1 and slice_of(img, 0) is img.array


@pytest.mark.parametrize("name", ["missing.png", "missing.nii.gz", "nofolder"])
def test_missing_file_names_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(ImageError, match=name):
        load_image(tmp_path / name)


def test_unknown_format_and_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match="notes.txt.*unknown image format"):
        load_image(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="empty.*no DICOM series"):
        load_image(tmp_path / "empty")


def test_corrupt_png_names_file(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ImageError, match="broken.png"):
        load_image(tmp_path / "broken.png")


# ---------------------------------------------------------------- DICOM


def test_single_dicom_files() -> None:
    ct = load_image(get_testdata_file("CT_small.dcm"))
    assert ct.modality == "CT" and ct.array.shape == (128, 128) and not ct.is_volume
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert ct.array.min() == float(ds.pixel_array.min()) + float(ds.RescaleIntercept)  # HU
    assert ct.spacing == pytest.approx((0.661468, 0.661468))
    mr = load_image(get_testdata_file("MR_small.dcm"))
    assert mr.modality == "MR" and mr.array.shape == (64, 64)


def test_truncated_dicom_raises(tmp_path: Path) -> None:
    src = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(ImageError, match="MR_truncated.dcm"):
        load_image(src)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:2000])
    with pytest.raises(ImageError, match="cut.dcm"):
        load_image(cut)


def test_dicom_series_sorted_by_position() -> None:
    img = load_image(SERIES)
    assert img.is_volume and img.modality == "CT"
    assert img.array.shape == (20, 128, 128)
    assert img.spacing == pytest.approx((3.0, 0.7, 0.7))
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in img.dicom_files]
    assert z == sorted(z) and len(set(z)) == 20
    # file names are shuffled on purpose: the order must come from the positions
    assert [f.name for f in img.dicom_files] != sorted(f.name for f in img.dicom_files)
    # slice k of the array is the file at z = k * 3 mm, in HU
    for k in (0, 7, 19):
        ds = pydicom.dcmread(img.dicom_files[k])
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(3.0 * k)
        assert np.array_equal(img.array[k], ds.pixel_array.astype(np.int32) - 1024)


def test_series_folder_with_a_corrupt_member(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    shutil.copytree(SERIES, folder)
    victim = sorted(folder.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:3000])
    with pytest.raises(ImageError, match="series"):
        load_image(folder)


# ---------------------------------------------------------------- volumes and orientation


def test_nifti_reoriented_to_lps_and_back(tmp_path: Path) -> None:
    path, data, affine = _ras_volume(tmp_path)
    img = load_image(path)
    assert img.is_volume and img.array.shape == (6, 10, 12)  # (Z, Y, X)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    # canonical voxel (x, y, z) and stored voxel (i, j, k) map to the same world point
    z, y, x = 2, 3, 4
    world = img.affine @ np.array([x, y, z, 1.0])
    i, j, k = np.round(np.linalg.inv(affine) @ world)[:3].astype(int)
    assert img.array[z, y, x] == data[i, j, k]
    assert img.spacing == pytest.approx((2.5, 0.9, 0.8))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_volume_mask_round_trip_keeps_geometry(tmp_path: Path, suffix: str) -> None:
    path, data, affine = _ras_volume(tmp_path)
    img = load_image(path)
    mask = img.array % 7 == 0
    out = tmp_path / f"mask{suffix}"
    save_mask_like(mask, img, out)
    assert np.array_equal(load_mask(out, img), mask)
    if suffix != ".nrrd":
        back = nib.load(str(out))
        assert back.shape == data.shape
        assert np.allclose(back.affine, affine)
        assert np.array_equal(np.asarray(back.dataobj) > 0, data % 7 == 0)
    else:
        back = sitk.ReadImage(str(out))
        assert back.GetSize() == data.shape
        assert np.allclose(back.GetSpacing(), (0.8, 0.9, 2.5))


def test_slice_mask_written_as_full_volume(tmp_path: Path) -> None:
    path, data, affine = _ras_volume(tmp_path)
    img = load_image(path)
    m2 = np.zeros(img.array.shape[1:], bool)
    m2[2:5, 3:9] = True
    save_mask_like(m2, img, tmp_path / "s.nii.gz", slice=4)
    back = nib.load(str(tmp_path / "s.nii.gz"))
    assert back.shape == data.shape and np.allclose(back.affine, affine)
    full = load_mask(tmp_path / "s.nii.gz", img)
    assert full.sum() == m2.sum() and np.array_equal(full[4], m2)
    assert np.array_equal(load_mask(tmp_path / "s.nii.gz", img, slice=4), m2)
    with pytest.raises(ImageError, match="slice"):
        save_mask_like(m2, img, tmp_path / "t.nii.gz")


def test_mask_of_dicom_series_round_trip(tmp_path: Path) -> None:
    img = load_image(SERIES)
    mask = np.zeros(img.array.shape, bool)
    mask[5:9, 40:60, 70:90] = True
    save_mask_like(mask, img, tmp_path / "m.nii.gz")
    nii = nib.load(str(tmp_path / "m.nii.gz"))
    assert nii.shape == (128, 128, 20)
    assert np.allclose(nii.affine, img.geometry.source_affine)
    assert np.array_equal(load_mask(tmp_path / "m.nii.gz", img), mask)


def test_slice_of_out_of_range(tmp_path: Path) -> None:
    img = load_image(_ras_volume(tmp_path)[0])
    assert slice_of(img, 5).shape == (10, 12)
    with pytest.raises(ImageError, match="slice 6 out of range"):
        slice_of(img, 6)
    with pytest.raises(ImageError, match="out of range"):
        slice_of(img, -1)


# ---------------------------------------------------------------- display


def test_ct_window_default_and_override() -> None:
    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]], dtype=np.float32)
    rgb = to_display_rgb(hu, "CT")
    assert rgb.shape == (1, 5, 3) and rgb.dtype == np.uint8
    assert list(rgb[0, :, 0]) == [0, 0, 128, 255, 255]
    assert CT_WINDOWS["soft_tissue"] == (400.0, 40.0)
    lung = to_display_rgb(hu, "CT", window=(1500, -600))
    assert lung[0, 1, 0] > 150 and lung[0, 0, 0] > 0
    assert np.array_equal(to_display_rgb(hu, "CT", window="bone"), to_display_rgb(hu, "MR", window=(1800, 400)))


def test_percentiles_rgb_passthrough_and_uint8() -> None:
    rng = np.random.default_rng(0)
    mr = rng.normal(1000, 100, (32, 32))
    mr[0, 0] = 1e6  # an outlier must not squash the contrast
    out = to_display_rgb(mr, "MR")
    assert out[..., 0].std() > 40
    rgb = rng.integers(0, 255, (8, 9, 3), dtype=np.uint8)
    assert np.array_equal(to_display_rgb(rgb, "fundus"), rgb)
    grey = rng.integers(0, 255, (8, 9), dtype=np.uint8)
    assert np.array_equal(to_display_rgb(grey, "US")[..., 1], grey)
    deep = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)
    d = to_display_rgb(deep, "")
    assert d.min() == 0 and d.max() == 255
    assert (to_display_rgb(np.full((4, 4), 7.0), "MR") == 0).all()


# ---------------------------------------------------------------- PNG masks


def test_png_mask_round_trip_and_binary_levels(tmp_path: Path) -> None:
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:30] = True
    save_mask_png(mask, tmp_path / "m.png")
    assert set(np.unique(np.asarray(PILImage.open(tmp_path / "m.png")))) == {0, 255}
    assert np.array_equal(load_mask(tmp_path / "m.png", (30, 40)), mask)
    assert np.array_equal(load_mask(tmp_path / "m.png", (30, 40, 3)), mask)
    PILImage.fromarray(mask.astype(np.uint8)).save(tmp_path / "ones.png")  # {0, 1} is binary too
    assert np.array_equal(load_mask(tmp_path / "ones.png", (30, 40)), mask)
    save_mask_png(np.zeros((30, 40), bool), tmp_path / "empty.png")
    assert not load_mask(tmp_path / "empty.png", (30, 40)).any()  # allowed here; load_case decides


def test_non_binary_mask_names_file_and_values(tmp_path: Path) -> None:
    values = np.zeros((10, 10), np.uint8)
    values[2:4] = 1
    values[5:7] = 2
    PILImage.fromarray(values).save(tmp_path / "labels.png")
    with pytest.raises(ImageError, match=r"labels.png.*not binary.*\[0, 1, 2\]"):
        load_mask(tmp_path / "labels.png", (10, 10))


def test_mask_size_mismatch_names_both_shapes(tmp_path: Path) -> None:
    save_mask_png(np.ones((10, 12), bool), tmp_path / "m.png")
    with pytest.raises(ImageError, match=r"m.png.*\(10, 12\).*\(12, 10\)"):
        load_mask(tmp_path / "m.png", (12, 10))
    path, _, _ = _ras_volume(tmp_path)
    img = load_image(path)
    with pytest.raises(ImageError, match="needs a slice"):
        load_mask(tmp_path / "m.png", img)


def test_nifti_mask_with_wrong_geometry(tmp_path: Path) -> None:
    path, data, affine = _ras_volume(tmp_path)
    img = load_image(path)
    shifted = affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image((data % 2).astype(np.uint8), shifted), str(tmp_path / "off.nii.gz"))
    with pytest.raises(ImageError, match="off.nii.gz.*geometry"):
        load_mask(tmp_path / "off.nii.gz", img)


def test_2d_image_mask_as_nifti(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    mask = np.zeros((20, 30), bool)
    mask[3:7, 11:25] = True
    save_mask_like(mask, img, tmp_path / "m.nii.gz")
    assert nib.load(str(tmp_path / "m.nii.gz")).shape == (30, 20)
    assert np.array_equal(load_mask(tmp_path / "m.nii.gz", img), mask)


def test_writers_are_atomic_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "m.png"
    save_mask_png(np.ones((4, 4), bool), target)
    before = target.read_bytes()
    with pytest.raises(ImageError):
        save_mask_png(np.ones((2, 2, 2), bool), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]


# ---------------------------------------------------------------- DICOM-SEG


def test_dicom_seg_for_series_slice(tmp_path: Path) -> None:
    img = load_image(SERIES)
    mask = np.zeros(img.array.shape, bool)
    mask[4, 30:50, 30:60] = True
    mask[11, 60:70, 60:80] = True
    out = save_dicom_seg(mask, SERIES, tmp_path / "seg.dcm", ["spleen"])
    seg = hd.seg.segread(str(out))
    assert seg.Modality == "SEG" and seg.NumberOfFrames == 2
    assert seg.SegmentSequence[0].SegmentLabel == "spleen"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "ibisagent"
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in img.dicom_files]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    assert np.array_equal(pixels[..., 0].astype(bool), mask)


def test_dicom_seg_two_labels_and_single_file(tmp_path: Path) -> None:
    img = load_image(SERIES)
    labels = np.zeros(img.array.shape[1:], np.uint8)
    labels[10:20, 10:20] = 1
    labels[40:50, 40:60] = 2
    seg = hd.seg.segread(str(save_dicom_seg(labels, SERIES, tmp_path / "two.dcm", ["a", "b"], slice=9)))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["a", "b"]
    assert seg.NumberOfFrames == 2
    uid = pydicom.dcmread(img.dicom_files[9], stop_before_pixels=True).SOPInstanceUID
    px = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2], combine_segments=True)
    assert np.array_equal(px[0], labels)

    src = get_testdata_file("CT_small.dcm")
    ct = load_image(src)
    seg1 = hd.seg.segread(str(save_dicom_seg(ct.array > 200, src, tmp_path / "ct.dcm", ["bone"])))
    assert seg1.NumberOfFrames == 1 and seg1.pixel_array.shape == (128, 128)
    with pytest.raises(ImageError, match="does not match"):
        save_dicom_seg(np.ones((3, 3), bool), src, tmp_path / "bad.dcm", ["bone"])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_mask_of_single_dicom_round_trip(tmp_path: Path, suffix: str) -> None:
    img = load_image(get_testdata_file("CT_small.dcm"))
    mask = img.array > 200
    out = save_mask_like(mask, img, tmp_path / f"bone{suffix}")
    assert np.array_equal(load_mask(out, img), mask)


def test_voxel_index_maps_to_the_same_voxel_in_the_canonical_array(tmp_path: Path) -> None:
    """Clients send stored (i, j, k) indices; the canonical (z, y, x) index must address the same voxel."""
    import nibabel as nib

    from ibisagent.imaging import load_image

    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)  # stored (i, j, k), every voxel unique
    affine = np.array([[0, 0, 2.0, 1], [-1.5, 0, 0, 2], [0, 1.0, 0, 3], [0, 0, 0, 1]])  # oblique axis order + flip
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    image = load_image(tmp_path / "v.nii.gz")
    geometry = image.geometry
    for ijk in [(0, 0, 0), (4, 5, 6), (2, 3, 1), (1, 0, 6)]:
        zyx = geometry.voxel_to_canonical(ijk)
        assert image.array[zyx] == data[ijk]
        assert geometry.canonical_to_voxel(zyx) == ijk
    with pytest.raises(ValueError, match="outside"):
        geometry.voxel_to_canonical((5, 0, 0))


def test_series_folder_ignores_a_dicomdir_and_a_report_but_rejects_a_truncated_slice(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from ibisagent.imaging import load_image

    series = Path(__file__).resolve().parents[1] / "sample_data" / "synthetic" / "ct_series"
    folder = tmp_path / "series"
    shutil.copytree(series, folder)
    expected = load_image(series).array.shape
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "report.dcm")  # a structured report: no pixels
    assert load_image(folder).array.shape == expected
    first = sorted(folder.glob("*.dcm"))[0]
    data = first.read_bytes()
    (folder / "broken.dcm").write_bytes(data[: len(data) // 2])  # a truncated slice of the same series
    with pytest.raises(ImageError, match="broken.dcm"):
        load_image(folder)


def test_mask_drawn_in_the_alpha_channel_is_read_from_alpha(tmp_path: Path) -> None:
    from ibisagent.imaging import load_mask

    truth = np.zeros((40, 50), dtype=bool)
    truth[10:20, 5:35] = True
    rgba = np.zeros((40, 50, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere: only alpha carries the mask
    rgba[..., 3] = truth * 255
    PILImage.fromarray(rgba, mode="RGBA").save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png", (40, 50)), truth)
