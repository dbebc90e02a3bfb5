"""DICOM in (single files with pydicom, series folders with SimpleITK/GDCM); DICOM-SEG out is :mod:`.seg`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.pixel_data_handlers.util import apply_modality_lut, convert_color_space

from .io import _LPS_TO_RAS, Image, ImageError, _volume_image, load_image, sitk_image_to_image

logger = logging.getLogger(__name__)

#: Values larger than this are not read when checking a stray DICOM file (pixel data stays on disk).
PIXEL_DEFER_BYTES = 1024



def _read_dataset(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
    except Exception as exc:
        raise ImageError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def _single_frame_affine(ds: pydicom.Dataset) -> np.ndarray:
    """RAS affine of one DICOM frame, voxel ``(column, row, 0)``; pixel-unit identity-like when tags are absent."""
    dy, dx = (float(v) for v in ds.get("PixelSpacing", [1.0, 1.0]))
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    ipp = [float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])]
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row_dir, col_dir)
    dz = float(ds.get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dx
    lps[:3, 1] = col_dir * dy
    lps[:3, 2] = normal * dz
    lps[:3, 3] = ipp
    return _LPS_TO_RAS @ lps


def load_dicom_file(path: Path) -> Image:
    """One DICOM instance: single-frame -> 2D ``(rows, cols)`` (modality LUT applied, CT in HU as float32),
    colour -> ``(rows, cols, 3)`` uint8 RGB; multi-frame -> volume via SimpleITK."""
    ds = _read_dataset(path)
    modality = str(ds.get("Modality", ""))
    if "PixelData" not in ds:
        raise ImageError(f"{path}: DICOM file has no pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        img = sitk.ReadImage(str(path))
        return sitk_image_to_image(img, path, modality, dicom_files=(path,))
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise ImageError(f"{path}: corrupt DICOM pixel data ({type(exc).__name__}: {exc})") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:
        if photometric.startswith("YBR"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        rgb = np.asarray(pixels)
        if rgb.dtype != np.uint8:
            raise ImageError(f"{path}: colour DICOM with {rgb.dtype} samples is not supported")
        image = _volume_image(rgb[..., 0].T, _single_frame_affine(ds), path, modality or "RGB", (path,))
        return Image(rgb, False, modality or "RGB", image.spacing, path, image.geometry, (path,))
    values = apply_modality_lut(pixels, ds)
    if values.dtype.kind == "f" or modality == "CT":
        values = values.astype(np.float32)
    return _volume_image(values.T, _single_frame_affine(ds), path, modality, (path,))


def load_dicom_series(folder: Path) -> Image:
    """A folder holding a DICOM series (the series with most files if several), sorted by slice position."""
    reader = sitk.ImageSeriesReader()
    ids = sorted(reader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        count = sum(1 for p in folder.rglob("*") if p.is_file())
        raise ImageError(f"{folder}: no DICOM series found in folder ({count} file(s))")
    files_by_uid = {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids}
    uid = max(ids, key=lambda u: len(files_by_uid[u]))
    files = [Path(f) for f in files_by_uid[uid]]
    in_series = {Path(f).resolve() for names in files_by_uid.values() for f in names}
    leftovers = [p for p in sorted(folder.iterdir())
                 if p.is_file() and p.resolve() not in in_series and pydicom.misc.is_dicom(str(p))]
    rejected = [p.name for p in leftovers if _unreadable_slice_of(p, uid)]
    if rejected:
        raise ImageError(f"{folder}: DICOM file(s) that GDCM could not read (corrupt or truncated): {rejected[:5]}")
    _check_slice_positions(folder, files)
    first = _read_dataset(files[0], stop_before_pixels=True)
    modality = str(first.get("Modality", ""))
    if len(files) == 1:
        single = load_dicom_file(files[0])
        return Image(single.array, single.is_volume, single.modality, single.spacing, folder, single.geometry,
                     single.dicom_files)
    reader.SetFileNames([str(f) for f in files])
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise ImageError(f"{folder}: cannot read DICOM series {uid} ({exc})") from exc
    if modality == "CT" and img.GetPixelID() not in (sitk.sitkInt16, sitk.sitkFloat32):
        img = sitk.Cast(img, sitk.sitkFloat32)
    return sitk_image_to_image(img, folder, modality, dicom_files=tuple(files))


def _unreadable_slice_of(path: Path, series_uid: str) -> bool:
    """Whether a DICOM file GDCM skipped is a broken image of the series (corrupt or truncated) rather than a harmless
    neighbour (a DICOMDIR, a structured report, another series' object), which is ignored with a warning."""
    try:
        ds = pydicom.dcmread(str(path), defer_size=PIXEL_DEFER_BYTES)
    except Exception:  # noqa: BLE001 - any parse failure means the file is corrupt
        return True
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        logger.warning("%s: not an image (SOP class %s), ignored", path, ds.get("SOPClassUID", "unknown"))
        return False
    if str(ds.get("SeriesInstanceUID", "")) != series_uid:
        logger.warning("%s: belongs to another series, ignored", path)
        return False
    return True


def _check_slice_positions(folder: Path, files: list[Path]) -> None:
    """Raise when the sorted slices are not evenly spaced (a missing or duplicated slice)."""
    if len(files) < 3:
        return
    positions = []
    for f in files:
        ds = _read_dataset(f, stop_before_pixels=True)
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            return
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        positions.append(float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    steps = np.diff(positions)
    if np.any(np.abs(steps) < 1e-4) or np.ptp(steps) > max(1e-2, 0.05 * float(np.median(np.abs(steps)))):
        raise ImageError(f"{folder}: slice positions are not evenly spaced (missing or duplicate slices); "
                         f"steps between sorted slices range {steps.min():.3f}..{steps.max():.3f} mm")
