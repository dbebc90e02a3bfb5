"""DICOM in (single files with pydicom, series folders with SimpleITK/GDCM); DICOM-SEG out is :mod:`.seg`.

Compressed pixel data: single-frame files are decoded by pydicom with its plug-ins (pylibjpeg with the libjpeg,
openjpeg and rle plug-ins; Pillow), then by GDCM through SimpleITK; series and multi-frame files by GDCM. Colour
JPEG Baseline is decoded by Pillow with the colour transform the JPEG stream itself declares (:func:`_decode_jpeg_rgb`).

Geometry: a series' voxel grid is built from every slice's ImagePositionPatient, so a gantry-tilted (sheared) stack
keeps its exact world positions (:func:`_stack_affine`); see docs/INPUTS.md.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image as PILImage
from pydicom.encaps import defragment_data
from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, convert_color_space
from pydicom.uid import UID

from .io import _LPS_TO_RAS, Image, ImageError, _volume_image, load_image, sitk_image_to_image

logger = logging.getLogger(__name__)

#: Values larger than this are not read when checking a stray DICOM file (pixel data stays on disk).
PIXEL_DEFER_BYTES = 1024


#: Slice positions may stray this far (mm) from the straight, evenly stepped line through the first and last slice
#: (or this fraction of the slice step, whichever is larger) before the series is refused as irregular.
POSITION_TOLERANCE_MM = 0.1
POSITION_TOLERANCE_FRACTION = 0.05
#: Slice orientations (direction cosines) may differ by this much within a series.
ORIENTATION_TOLERANCE = 1e-4

#: Transfer syntaxes GDCM (inside SimpleITK) decodes besides the uncompressed ones.
_GDCM_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
})
_JPEG_LOSSY = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})

#: What to install when no decoder here reads a transfer syntax (UID -> advice).
_DECODER_ADVICE = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                     "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
                    "install pylibjpeg and pylibjpeg-libjpeg"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                     "1.2.840.10008.1.2.4.93"), "install pylibjpeg and pylibjpeg-openjpeg"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
                    "HTJ2K needs pylibjpeg-openjpeg with pydicom>=3 (which monailabel 0.8.5 does not accept); "
                    "convert the files with gdcmconv --raw or dcmdjp2k first"),
    "1.2.840.10008.1.2.5": "install pylibjpeg and pylibjpeg-rle",
    **dict.fromkeys(tuple(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),
                    "video transfer syntaxes (MPEG-2/MPEG-4/HEVC) are not decoded here; export the frames to an "
                    "image transfer syntax first (e.g. ffmpeg, or gdcmconv --raw)"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112"),
                    "JPEG XL needs pydicom>=3 with pylibjpeg-libjxl; convert the files with gdcmconv --raw first"),
}


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
        if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
            raise ImageError(f"{path}: colour multi-frame DICOM ({ds.NumberOfFrames} frames, "
                             f"{ds.get('PhotometricInterpretation', '?')}) is not supported: volumes must be grey; "
                             f"export one frame as a single-frame file")
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise _undecodable(path, ds, {"GDCM": exc}) from exc
        return sitk_image_to_image(img, path, modality, dicom_files=(path,), affine=_multiframe_affine(path, ds, img))
    pixels, rescaled = _decode_single_frame(path, ds)
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR" and pixels.ndim == 2:
        pixels = apply_color_lut(pixels, ds)  # indices -> RGB through the file's palette
    if pixels.ndim == 3:
        rgb = _colour_to_uint8(np.asarray(pixels), ds)
        image = _volume_image(rgb[..., 0].T, _single_frame_affine(ds), path, modality or "RGB", (path,))
        return Image(rgb, False, modality or "RGB", image.spacing, path, image.geometry, (path,))
    values = pixels if rescaled else apply_modality_lut(pixels, ds)
    if values.dtype.kind == "f" or modality == "CT":
        values = values.astype(np.float32)
    return _volume_image(values.T, _single_frame_affine(ds), path, modality, (path,))


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    return UID(str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))) if meta is not None else UID("1.2.840.10008.1.2")


def _decode_single_frame(path: Path, ds: pydicom.Dataset) -> tuple[np.ndarray, bool]:
    """Pixels of a single-frame instance: ``(rows, cols)`` grey, or ``(rows, cols, 3)`` RGB; and whether the
    modality LUT (RescaleSlope/Intercept) is already applied (GDCM applies it, pydicom does not).

    Order: colour JPEG Baseline/Extended through :func:`_decode_jpeg_rgb`; then pydicom with its installed
    plug-ins; then GDCM (SimpleITK). Raises :class:`ImageError` naming the transfer syntax and, when nothing here can
    decode it, what to install (:func:`_undecodable`).
    """
    syntax = _transfer_syntax(ds)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    errors: dict[str, Exception] = {}
    if syntax in _JPEG_LOSSY and samples == 3:
        try:
            return _decode_jpeg_rgb(ds), False
        except Exception as exc:  # noqa: BLE001 - fall through to the generic decoders
            errors["Pillow"] = exc
    try:
        pixels = np.asarray(ds.pixel_array)
        if samples == 3 and str(ds.get("PhotometricInterpretation", "")) in ("YBR_FULL", "YBR_FULL_422"):
            pixels = convert_color_space(pixels, str(ds.PhotometricInterpretation), "RGB")
        # YBR_ICT / YBR_RCT (JPEG 2000): the J2K decoders invert the component transform, the samples are RGB
        return pixels, False
    except Exception as exc:  # noqa: BLE001 - try GDCM next
        errors["pydicom"] = exc
    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        errors["GDCM"] = exc
        raise _undecodable(path, ds, errors) from exc
    logger.info("%s: decoded by GDCM (pydicom: %s)", path, errors.get("pydicom"))
    return (arr[0] if arr.ndim == 4 or (arr.ndim == 3 and samples == 1) else arr), True


def _decode_jpeg_rgb(ds: pydicom.Dataset) -> np.ndarray:
    """A colour JPEG Baseline/Extended frame as ``(rows, cols, 3)`` RGB, with the colour transform the JPEG stream
    declares, whatever the DICOM PhotometricInterpretation says.

    The stream decides as libjpeg does (an Adobe APP14 transform flag; else a JFIF marker = YCbCr; else component
    ids ``R, G, B`` = RGB and ``1, 2, 3`` = YCbCr); only a stream that declares nothing follows the DICOM label
    (``RGB``: stored without transform). pydicom 2.4's Pillow handler does this by setting ``Image.mode``, which
    Pillow >= 10.1 forbids, and its fallback (pylibjpeg) then transforms such RGB files wrongly; this uses Pillow's
    public ``draft`` instead.
    """
    with PILImage.open(io.BytesIO(defragment_data(ds.PixelData))) as im:
        ids = [layer[0] for layer in getattr(im, "layer", [])]
        declared = "adobe_transform" in im.info or "jfif" in im.info or ids in ([82, 71, 66], [1, 2, 3])
        if not declared and str(ds.get("PhotometricInterpretation", "")) == "RGB":
            im.draft("YCbCr", im.size)  # decode without the (undeclared) YCbCr -> RGB transform
            return np.asarray(im)
        return np.asarray(im.convert("RGB"))


def _colour_to_uint8(rgb: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """``(rows, cols, 3)`` samples -> uint8 RGB (samples of more than 8 bits are shifted down by BitsStored - 8)."""
    if rgb.dtype == np.uint8:
        return rgb
    if rgb.dtype.kind != "u":
        raise ImageError(f"colour DICOM with {rgb.dtype} samples is not supported")
    bits = int(ds.get("BitsStored", rgb.dtype.itemsize * 8) or rgb.dtype.itemsize * 8)
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        bits = rgb.dtype.itemsize * 8  # palette entries are 16-bit, whatever the index depth
    return (rgb >> max(bits - 8, 0)).astype(np.uint8)


def _undecodable(path: Path, ds: pydicom.Dataset, errors: dict[str, Exception]) -> ImageError:
    """The error for pixel data no decoder here could read: the transfer syntax by name and UID; when no installed
    decoder claims it, what to install; else each decoder's complaint."""
    syntax = _transfer_syntax(ds)
    name = f"{syntax.name} ({syntax})" if syntax.name != str(syntax) else str(syntax)
    claimed = str(syntax) in _GDCM_SYNTAXES or any(
        handler.is_available() and handler.supports_transfer_syntax(syntax)
        for handler in pydicom.config.pixel_data_handlers
    )
    if not claimed:
        advice = _DECODER_ADVICE.get(str(syntax), "no decoder for it is installed; convert the files to an "
                                                  "uncompressed transfer syntax (gdcmconv --raw, dcmdjpeg)")
        return ImageError(f"{path}: transfer syntax {name} cannot be decoded here: {advice}")
    detail = "; ".join(f"{who}: {type(exc).__name__}: {exc}" for who, exc in errors.items())
    return ImageError(f"{path}: the installed decoders could not decode the {name} pixel data ({detail})")


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
    headers = [_read_dataset(f, stop_before_pixels=True) for f in files]
    _check_slice_positions(folder, headers)
    first = headers[0]
    modality = str(first.get("Modality", ""))
    if len(files) == 1:
        single = load_dicom_file(files[0])
        return Image(single.array, single.is_volume, single.modality, single.spacing, folder, single.geometry,
                     single.dicom_files)
    reader.SetFileNames([str(f) for f in files])
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise _undecodable(folder, first, {"GDCM": exc}) from exc
    if modality == "CT" and img.GetPixelID() not in (sitk.sitkInt16, sitk.sitkFloat32):
        img = sitk.Cast(img, sitk.sitkFloat32)
    affine = _exact_affine(folder, img, _plane_positions(headers), first)
    return sitk_image_to_image(img, folder, modality, dicom_files=tuple(files), affine=affine)


def _plane_positions(headers: Sequence[pydicom.Dataset]) -> list[tuple[list[float], list[float]] | None]:
    """Per slice ``(ImagePositionPatient, ImageOrientationPatient)`` in LPS mm, ``None`` where a tag is missing."""
    out: list[tuple[list[float], list[float]] | None] = []
    for ds in headers:
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            out.append(([float(v) for v in ds.ImagePositionPatient], [float(v) for v in ds.ImageOrientationPatient]))
        else:
            out.append(None)
    return out


def _stack_affine(source: Path, planes: Sequence[tuple[list[float], list[float]]],
                  pixel_spacing: tuple[float, float]) -> tuple[np.ndarray, float]:
    """RAS affine of a stack of parallel slices from each slice's position, and its tilt in degrees.

    The slice axis is the step between slice positions, not the slice normal: for a gantry-tilted CT the two differ
    by the tilt angle and the grid is sheared; this affine places every pixel where its own slice's
    ImagePositionPatient / ImageOrientationPatient / PixelSpacing put it (DICOM PS3.3 C.7.6.2.1.1), so nothing is
    resampled.

    Args:
        planes: per slice, in stored order, ``(ImagePositionPatient, ImageOrientationPatient)`` (LPS mm).
        pixel_spacing: ``PixelSpacing`` = (row spacing, column spacing) mm.

    Returns:
        ``(affine, tilt)``: 4x4 RAS affine of voxel ``(column, row, slice)``; the angle between the slice step and
        the slice normal.

    Raises:
        ImageError: slices of different orientations, or positions off a straight, evenly stepped line (by more than
            :data:`POSITION_TOLERANCE_MM` or :data:`POSITION_TOLERANCE_FRACTION` of the step).
    """
    positions = np.asarray([p for p, _ in planes], dtype=float)
    orientations = np.asarray([o for _, o in planes], dtype=float)
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise ImageError(f"{source}: the slices have different orientations (ImageOrientationPatient varies within "
                         f"the series, e.g. a tilt that changes); cannot place them on one grid")
    row_dir, col_dir = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_dir, col_dir)
    n = len(positions)
    step = (positions[-1] - positions[0]) / max(n - 1, 1) if n > 1 else normal * 1.0
    if n > 1:
        expected = positions[0] + np.arange(n)[:, None] * step
        deviation = float(np.linalg.norm(positions - expected, axis=1).max())
        if deviation > max(POSITION_TOLERANCE_MM, POSITION_TOLERANCE_FRACTION * float(np.linalg.norm(step))):
            raise ImageError(f"{source}: slice positions are not on an evenly stepped line (irregular spacing or a "
                             f"missing slice): a slice lies {deviation:.2f} mm from where an even step of "
                             f"{np.round(step, 3).tolist()} mm puts it")
    dy, dx = pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dx
    lps[:3, 1] = col_dir * dy
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    cosine = abs(float(np.dot(step, normal))) / max(float(np.linalg.norm(step)), 1e-12)
    return _LPS_TO_RAS @ lps, float(np.degrees(np.arccos(min(cosine, 1.0))))


#: Tilts below this (degrees) are rounding in the position tags, not a sheared grid.
TILT_TOLERANCE_DEG = 0.01


def _exact_affine(source: Path, img: sitk.Image, planes: Sequence[tuple[list[float], list[float]] | None],
                  ds: pydicom.Dataset) -> np.ndarray | None:
    """The stack's affine from its slice positions when it differs from GDCM's (which uses the slice normal, so a
    gantry-tilted series drifts by ``step * sin(tilt)`` per slice); ``None`` to keep GDCM's. Logs what it did."""
    if len(planes) < 2 or any(p is None for p in planes) or img.GetDimension() != 3:
        return None
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is None:
        sx, sy = img.GetSpacing()[:2]
        spacing = (sy, sx)
    affine, tilt = _stack_affine(source, planes, (float(spacing[0]), float(spacing[1])))  # type: ignore[arg-type]
    if tilt < TILT_TOLERANCE_DEG:
        return None
    tag = ds.get("GantryDetectorTilt")
    logger.info("%s: slices are tilted %.2f deg against their stacking direction (gantry tilt%s): kept on the "
                "acquired, sheared grid (slice step %s mm, not the slice normal); nothing resampled, masks are "
                "written on the same grid", source, tilt, f" {float(tag):g} deg in the tags" if tag is not None else "",
                np.round((_LPS_TO_RAS @ affine)[:3, 2], 3).tolist())
    return affine


def _multiframe_affine(path: Path, ds: pydicom.Dataset, img: sitk.Image) -> np.ndarray | None:
    """:func:`_exact_affine` for an enhanced multi-frame instance (per-frame PlanePositionSequence)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return None
    shared = (ds.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]

    def item(group: pydicom.Dataset, seq: str) -> pydicom.Dataset | None:
        value = group.get(seq) or shared.get(seq)
        return value[0] if value else None

    planes: list[tuple[list[float], list[float]] | None] = []
    spacing = None
    for frame in per_frame:
        pos, orient, measures = (item(frame, "PlanePositionSequence"), item(frame, "PlaneOrientationSequence"),
                                 item(frame, "PixelMeasuresSequence"))
        if pos is None or orient is None:
            return None
        planes.append(([float(v) for v in pos.ImagePositionPatient], [float(v) for v in orient.ImageOrientationPatient]))
        if measures is not None and "PixelSpacing" in measures:
            spacing = measures.PixelSpacing
    header = pydicom.Dataset()
    if spacing is not None:
        header.PixelSpacing = spacing
    if "GantryDetectorTilt" in ds:
        header.GantryDetectorTilt = ds.GantryDetectorTilt
    return _exact_affine(path, img, planes, header)


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


def _check_slice_positions(folder: Path, headers: list[pydicom.Dataset]) -> None:
    """Raise when the sorted slices are not evenly spaced along the slice normal (a missing or duplicated slice).
    In-plane drift (gantry tilt) and irregular steps in 3D are checked by :func:`_stack_affine`."""
    if len(headers) < 3:
        return
    positions = []
    first_iop = None
    for ds in headers:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            return
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        first_iop = iop if first_iop is None else first_iop
        if np.abs(iop - first_iop).max() > ORIENTATION_TOLERANCE:
            raise ImageError(f"{folder}: the slices have different orientations (ImageOrientationPatient varies "
                             f"within the series, e.g. a tilt that changes); cannot place them on one grid")
        normal = np.cross(iop[:3], iop[3:])
        positions.append(float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    steps = np.diff(positions)
    if np.any(np.abs(steps) < 1e-4) or np.ptp(steps) > max(1e-2, 0.05 * float(np.median(np.abs(steps)))):
        raise ImageError(f"{folder}: slice positions are not evenly spaced (missing or duplicate slices); "
                         f"steps between sorted slices range {steps.min():.3f}..{steps.max():.3f} mm")
