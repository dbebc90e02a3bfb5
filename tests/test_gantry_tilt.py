"""Gantry-tilted (sheared) CT series: every mask lies on the lesion in patient space, whichever way it is loaded."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ibisagent.imaging import ImageError, load_image, load_mask, save_mask_like

FIELD_CASE = Path(__file__).parent / "data" / "gantry_tilt"  # ../shared/field-cases/gantry-tilt/series
SIZE, CENTRE, RADIUS = 24, 12, 3.5


def _slice(iop: np.ndarray, ipp: np.ndarray, k: int, series: str, study: str, tilt: float) -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "tilt", k + 1
    ds.GantryDetectorTilt = tilt
    ds.ImageOrientationPatient = [round(float(v), 8) for v in iop]
    ds.ImagePositionPatient = [round(float(v), 6) for v in ipp]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 5.0
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    yy, xx = np.mgrid[:SIZE, :SIZE]
    pixels = np.where((yy - CENTRE) ** 2 + (xx - CENTRE) ** 2 <= RADIUS**2, 300, -50).astype(np.int16)
    ds.PixelData = pixels.tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    return ds


def write_tilted_series(folder: Path, tilt: float, axis: str = "x", n: int = 8, step: float = 5.0,
                        shift: dict[int, np.ndarray] | None = None) -> Path:
    """``n`` slices tilted ``tilt`` degrees about patient ``axis`` while the table steps ``step`` mm along z; the
    lesion sits at row/column 12 of every slice, so in patient space it runs along z."""
    folder.mkdir(parents=True, exist_ok=True)
    c, s = np.cos(np.radians(tilt)), np.sin(np.radians(tilt))
    iop = np.array([1, 0, 0, 0, c, s]) if axis == "x" else np.array([c, 0, s, 0, 1, 0])
    series, study = generate_uid(), generate_uid()
    for k in range(n):
        ipp = np.array([0.0, 0.0, step * k]) + (shift or {}).get(k, 0.0)
        ds = _slice(iop, ipp, k, series, study, tilt)
        ds.save_as(str(folder / f"ct{k:02d}.dcm"), write_like_original=False)
    return folder


def lesion_world(files: list[Path]) -> np.ndarray:
    """World (LPS mm) centre of the lesion on each file, from its own ImagePositionPatient / Orientation / spacing."""
    out = []
    for f in files:
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        dy, dx = (float(v) for v in ds.PixelSpacing)
        out.append(np.asarray(ds.ImagePositionPatient, float) + CENTRE * dx * iop[:3] + CENTRE * dy * iop[3:])
    return np.asarray(out)


def mask_world_per_slice(path: Path) -> list[np.ndarray]:
    """Centroid (LPS mm) of the written mask on each stored slice, read back with nibabel's affine."""
    nii = nib.load(str(path))
    data = np.asarray(nii.dataobj) > 0
    out = []
    for k in range(data.shape[2]):
        ij = np.argwhere(data[:, :, k])
        ijk = np.c_[ij, np.full(len(ij), k), np.ones(len(ij))]
        out.append(((nii.affine @ ijk.T).T[:, :3] * [-1, -1, 1]).mean(axis=0))
    return out


def _assert_on_lesion(image_source: Path, mask_path: Path) -> None:
    files = sorted(image_source.glob("*.dcm"))
    truth = lesion_world(files)
    found = mask_world_per_slice(mask_path)
    distances = [min(np.linalg.norm(truth - w, axis=1)) for w in found]
    assert len(found) == len(files)
    assert max(distances) < 1.0, distances


def test_field_case_mask_lies_on_the_lesion_on_every_slice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ibisagent.imaging.dicom"):
        image = load_image(FIELD_CASE)
    assert any("tilted 20.00 deg" in r.getMessage() and "sheared" in r.getMessage() for r in caplog.records)
    assert image.array.shape == (8, SIZE, SIZE)
    out = save_mask_like(image.array > 100, image, tmp_path / "mask.nii.gz")
    _assert_on_lesion(FIELD_CASE, out)
    assert np.array_equal(load_mask(out, image), image.array > 100)  # reads back on the image's own grid


@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("tilt", [-30.0, -20.0, -7.5, 12.0, 20.0, 25.0])
def test_other_tilts_and_axes_place_the_mask_on_the_lesion(tmp_path: Path, tilt: float, axis: str) -> None:
    folder = write_tilted_series(tmp_path / "series", tilt, axis)
    image = load_image(folder)
    mask = image.array > 100
    _assert_on_lesion(folder, save_mask_like(mask, image, tmp_path / "mask.nii.gz"))
    # NRRD carries the shear in its space directions; SimpleITK (as Slicer) reads it back exactly
    nrrd = sitk.ReadImage(str(save_mask_like(mask, image, tmp_path / "mask.nrrd")))
    arr = sitk.GetArrayFromImage(nrrd)  # [k, j, i]
    truth = lesion_world(sorted(folder.glob("*.dcm")))
    for k in range(arr.shape[0]):
        jj, ii = np.nonzero(arr[k])
        world = np.mean([nrrd.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
                         for i, j in zip(ii, jj)], axis=0)
        assert min(np.linalg.norm(truth - world, axis=1)) < 1.0


def test_an_untilted_series_keeps_simpleitks_geometry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_tilted_series(tmp_path / "series", 0.0)
    with caplog.at_level(logging.INFO, logger="ibisagent.imaging.dicom"):
        image = load_image(folder)
    assert not any("tilted" in r.getMessage() for r in caplog.records)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    from ibisagent.imaging.io import sitk_to_ras_affine

    assert np.allclose(image.geometry.source_affine, sitk_to_ras_affine(reader.Execute()), atol=1e-4)
    nii = save_mask_like(image.array > 100, image, tmp_path / "m.nii.gz")
    assert int(nib.load(str(nii)).header["qform_code"]) == 1  # orthogonal grids keep their qform


def test_a_tilted_nifti_has_only_the_exact_sform(tmp_path: Path) -> None:
    """The qform cannot hold a shear: it is left out, so no reader can place the mask on an approximate grid."""
    image = load_image(FIELD_CASE)
    nii = nib.load(str(save_mask_like(image.array > 100, image, tmp_path / "m.nii.gz")))
    assert int(nii.header["qform_code"]) == 0 and int(nii.header["sform_code"]) == 1
    assert np.allclose(nii.affine[:3, 2], [0, 0, 5], atol=1e-4)  # the table step, not the slice normal
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(tmp_path / "m.nii.gz"))  # ITK refuses rather than misplacing


def test_each_slice_alone_sits_on_the_lesion(tmp_path: Path) -> None:
    """The single-file path: a tilted slice read alone is placed by its own position and orientation."""
    files = sorted(FIELD_CASE.glob("*.dcm"))
    truth = lesion_world(files)
    for k, f in enumerate(files):
        image = load_image(f)
        world = image.affine @ np.array([CENTRE, CENTRE, 0, 1.0])  # 2D image: voxel (column, row, 0)
        assert np.linalg.norm(world[:3] * [-1, -1, 1] - truth[k]) < 1e-3
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(files[3], one / files[3].name)
    image = load_image(one)  # a one-file folder
    assert np.linalg.norm((image.affine @ np.array([CENTRE, CENTRE, 0, 1.0]))[:3] * [-1, -1, 1] - truth[3]) < 1e-3


def test_a_slice_shifted_within_its_plane_is_refused(tmp_path: Path) -> None:
    """Spacing along the slice normal is even here; only the 3D position check sees the 2 mm in-plane drift."""
    c, s = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
    folder = write_tilted_series(tmp_path / "series", 20.0, shift={5: 2.0 * np.array([0.0, c, s])})
    with pytest.raises(ImageError, match="evenly stepped line"):
        load_image(folder)


def test_uneven_table_steps_are_refused(tmp_path: Path) -> None:
    folder = write_tilted_series(tmp_path / "series", 15.0, shift={k: np.array([0.0, 0.0, 1.5 * (k >= 4)])
                                                                   for k in range(8)})
    with pytest.raises(ImageError, match="not evenly spaced|evenly stepped"):
        load_image(folder)


def test_slices_of_different_tilts_are_refused(tmp_path: Path) -> None:
    folder = write_tilted_series(tmp_path / "a", 20.0)
    other = write_tilted_series(tmp_path / "b", 10.0)
    target = pydicom.dcmread(str(folder / "ct03.dcm"))
    changed = pydicom.dcmread(str(other / "ct03.dcm"))
    target.ImageOrientationPatient = changed.ImageOrientationPatient
    target.save_as(str(folder / "ct03.dcm"))
    with pytest.raises(ImageError, match="different orientations"):
        load_image(folder)


def _enhanced_multiframe(files: list[Path], path: Path) -> Path:
    """The series as one enhanced multi-frame CT instance (highdicom's legacy converter; per-frame positions)."""
    import highdicom as hd

    datasets = []
    for f in files:
        ds = pydicom.dcmread(str(f))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "Tilt^Test", "", "O"
        ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20260101", "000000", "20260101", "000000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID, ds.SeriesNumber = "", "", "1", 1
        ds.Manufacturer, ds.KVP, ds.AcquisitionNumber = "test", 120, 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = "1.2.826.0.1.3680043.8.498.1", ""
        datasets.append(ds)
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(datasets, series_instance_uid=hd.UID(), series_number=2,
                                                  sop_instance_uid=hd.UID(), instance_number=1)
    mf.save_as(str(path))
    return path


@pytest.mark.parametrize("tilt", [-20.0, 20.0])
def test_an_enhanced_multiframe_file_places_the_mask_on_the_lesion(tmp_path: Path, tilt: float) -> None:
    folder = write_tilted_series(tmp_path / "series", tilt)
    single = _enhanced_multiframe(sorted(folder.glob("*.dcm")), tmp_path / "enhanced.dcm")
    image = load_image(single)
    assert image.is_volume and image.array.shape == (8, SIZE, SIZE)
    _assert_on_lesion(folder, save_mask_like(image.array > 100, image, tmp_path / "mask.nii.gz"))


def test_a_dicom_seg_of_a_tilted_series_references_each_slice_where_it_is(tmp_path: Path) -> None:
    """DICOM-SEG frames take each source slice's own plane position, read back with highdicom."""
    import highdicom as hd

    from ibisagent.imaging import save_dicom_seg

    image = load_image(FIELD_CASE)
    seg = hd.seg.segread(str(save_dicom_seg(image.array > 100, FIELD_CASE, tmp_path / "seg.dcm", ["lesion"])))
    files = sorted(FIELD_CASE.glob("*.dcm"))
    truth = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID: lesion_world([f])[0] for f in files}
    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) == len(files)
    for k, frame in enumerate(frames):
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        origin = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        iop = np.asarray(seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient,
                         float)
        rows, cols = np.nonzero(seg.pixel_array[k] if seg.pixel_array.ndim == 3 else seg.pixel_array)
        world = origin + cols.mean() * iop[:3] + rows.mean() * iop[3:]
        assert np.linalg.norm(world - truth[ref]) < 1.0
