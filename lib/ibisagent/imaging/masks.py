"""Masks in (binary PNG, NIfTI, NRRD in the image's geometry) and out (PNG, NIfTI, NRRD, DICOM-SEG), always
atomically. :func:`save_mask_like` is the one writer behind the command line and the app.

Masks are numpy bool arrays in the same axis order as :attr:`Image.array`: ``(H, W)`` indexed ``[y, x]`` for a
2D image or one axial slice, ``(Z, Y, X)`` for a whole volume.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image as PILImage

from ..fileio import atomic_path
from .io import (
    NIFTI_SUFFIXES,
    NRRD_SUFFIXES,
    PNG_SUFFIXES,
    Image,
    ImageError,
    detect_format,
    has_suffix,
    load_image,
    pil_to_array,
    ras_affine_to_sitk,
)

_AFFINE_TOLERANCE_MM = 1e-3


def binary_levels(values: np.ndarray, path: Path, colour: bool = False) -> np.ndarray:
    """``values != 0`` after checking the array holds at most two levels, one of them 0 (or a single level).

    With ``colour`` the last axis holds colour channels: the levels are whole colours and the result drops that axis.

    Raises:
        ImageError: more than two distinct values, or two values none of which is 0; names ``path`` and the values.
    """
    if colour:
        flat = values.reshape(-1, values.shape[-1])
        levels = np.unique(flat, axis=0)
        if len(levels) > 2 or (len(levels) == 2 and not (levels == 0).all(axis=1).any()):
            shown = [tuple(int(c) for c in lv) for lv in levels[:6]]
            raise ImageError(f"{path}: mask is not binary: {len(levels)} distinct colours {shown}; "
                             f"expected background 0 and one foreground value")
        return values.any(axis=-1)
    levels = np.unique(values)
    if len(levels) > 2 or (len(levels) == 2 and levels[0] != 0 and levels[1] != 0):
        shown = [v.item() for v in levels[:8]]
        more = "" if len(levels) <= 8 else f" ... ({len(levels)} in all)"
        raise ImageError(f"{path}: mask is not binary: values {shown}{more}; expected 0 and one foreground value")
    return values != 0


def load_mask(path: str | os.PathLike[str], shape: tuple[int, ...] | Image, slice: int | None = None) -> np.ndarray:
    """Load a binary mask and check it fits an image.

    Args:
        path: binary PNG (2D; any colour, two levels: 0 and one foreground value), or NIfTI/NRRD stored on the
            image's voxel grid (reoriented exactly like the image).
        shape: the image (preferred: its geometry is checked for NIfTI/NRRD masks) or its array shape:
            ``(H, W)``/``(H, W, C)`` for 2D images, ``(Z, Y, X)`` for volumes.
        slice: for a volume, the axial slice to return; a PNG mask of a volume must be given with ``slice``.

    Returns:
        bool ``(H, W)``, or ``(Z, Y, X)`` for a volume mask without ``slice``. An all-zero mask is returned as is.

    Raises:
        ImageError: missing/unreadable file, non-binary values, shape or geometry mismatch (naming both shapes),
            slice out of range.
    """
    p = Path(path)
    image = shape if isinstance(shape, Image) else None
    if image is not None:
        target = tuple(image.array.shape) if image.is_volume else tuple(image.array.shape[:2])
        is_volume = image.is_volume
    else:
        target = tuple(int(s) for s in shape)  # type: ignore[union-attr]
        is_volume = len(target) == 3 and target[-1] not in (3, 4)
        if not is_volume:
            target = target[:2]
    kind = detect_format(p)
    if kind == "pil":
        mask = _load_png_mask(p)
        expected = target[1:] if is_volume else target
        if is_volume and slice is None:
            raise ImageError(f"{p}: a 2D mask for a volume of shape {target} needs a slice index")
        if is_volume:
            _check_slice(p, slice, target[0])  # type: ignore[arg-type]
        _check_shape(p, mask.shape, expected)
        return mask
    loaded = load_image(p)
    if loaded.array.ndim == 3 and not loaded.is_volume:
        raise ImageError(f"{p}: mask has colour channels, shape {loaded.array.shape}")
    mask = binary_levels(loaded.array, p)
    _check_shape(p, mask.shape, target)
    if image is not None:
        _check_geometry(p, loaded, image)
    if is_volume and slice is not None:
        _check_slice(p, slice, target[0])
        return mask[slice]
    return mask


def _load_png_mask(path: Path) -> np.ndarray:
    try:
        with PILImage.open(path) as pil:
            pil.load()
            if pil.mode == "PA":
                pil = pil.convert("RGBA")
            if pil.mode in ("RGBA", "LA"):
                alpha = np.asarray(pil.getchannel("A"))
                if alpha.min() != alpha.max():  # the mask is drawn in transparency (common in paint tools)
                    return binary_levels(alpha, path)
                pil = pil.convert("RGB") if pil.mode == "RGBA" else pil.convert("L")
            values = pil_to_array(pil, path)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{path}: cannot read mask image ({type(exc).__name__}: {exc})") from exc
    return binary_levels(values, path, colour=values.ndim == 3)


def _check_shape(path: Path, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        hint = ""
        if len(got) == 2 and tuple(got) == tuple(expected)[::-1]:
            hint = " (transposed? masks are (rows, columns) = (H, W), as the image)"
        raise ImageError(f"{path}: mask shape {tuple(got)} does not match image shape {tuple(expected)}{hint}")


def _check_slice(path: Path, slice: int, n: int) -> None:
    if isinstance(slice, bool) or not isinstance(slice, (int, np.integer)) or not 0 <= slice < n:
        raise ImageError(f"{path}: slice {slice!r} out of range; the volume has {n} slices (0..{n - 1})")


def _check_geometry(path: Path, mask: Image, image: Image) -> None:
    """NIfTI/NRRD masks of a volume must sit on the same world grid as the image (within 1 µm)."""
    if not image.is_volume or not mask.is_volume:
        return
    if not np.allclose(mask.affine, image.affine, atol=_AFFINE_TOLERANCE_MM):
        raise ImageError(
            f"{path}: mask geometry differs from image {image.source}: affine\n{np.round(mask.affine, 4)}\n"
            f"vs\n{np.round(image.affine, 4)}"
        )


def is_sheared(affine: np.ndarray, tolerance: float = 1e-6) -> bool:
    """Whether a 4x4 affine's voxel axes are not mutually orthogonal (a gantry-tilted stack)."""
    cols = np.asarray(affine, dtype=float)[:3, :3]
    unit = cols / np.linalg.norm(cols, axis=0)
    gram = unit.T @ unit
    return bool(np.abs(gram - np.eye(3)).max() > tolerance)


def save_mask_png(mask2d: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a 2D mask ``(H, W)`` as an 8-bit PNG with values 0 and 255 (atomically). Returns ``path``."""
    mask = np.asarray(mask2d)
    if mask.ndim != 2:
        raise ImageError(f"{path}: a PNG mask must be 2D (H, W), got shape {mask.shape}")
    data = np.where(mask.astype(bool), 255, 0).astype(np.uint8)
    with atomic_path(path, suffix=".png") as tmp:
        PILImage.fromarray(data, mode="L").save(tmp, format="PNG")
    return Path(path)


def full_mask(mask: np.ndarray, image: Image, slice: int | None = None) -> np.ndarray:
    """``mask`` as a bool array of ``image.array``'s full grid: a 2D mask of slice ``slice`` of a volume becomes a
    volume with only that slice set. Raises :class:`ImageError` on shape mismatch."""
    mask = np.asarray(mask).astype(bool)
    if image.is_volume:
        target = tuple(image.array.shape)
        if mask.ndim == 2:
            if slice is None:
                raise ImageError(f"{image.source}: a 2D mask for a volume of shape {target} needs a slice index")
            _check_slice(image.source, slice, target[0])
            _check_shape(image.source, mask.shape, target[1:])
            full = np.zeros(target, dtype=bool)
            full[slice] = mask
            return full
        _check_shape(image.source, mask.shape, target)
        return mask
    _check_shape(image.source, mask.shape, tuple(image.array.shape[:2]))
    return mask


#: Mask output suffixes for DICOM sources only (DICOM-SEG).
DICOM_SEG_SUFFIXES = (".dcm",)


def check_mask_output(path: str | os.PathLike[str], image: Image) -> Path:
    """Reject an output file that cannot hold ``image``'s mask before any work: PNG only for 2D images, ``.dcm``
    (DICOM-SEG) only for DICOM sources. Raises :class:`ImageError` naming the formats that fit."""
    p = Path(path)
    allowed = [".nii", ".nii.gz", ".nrrd"] + ([] if image.is_volume else [".png"])
    if image.dicom_files:
        allowed.append(".dcm")
    if not p.name.lower().endswith(tuple(allowed)):
        kind = "a volume" if image.is_volume else "a 2D image"
        source = "DICOM" if image.dicom_files else "non-DICOM"
        raise ImageError(f"{p}: the mask of {kind} ({source} source) can be written as {', '.join(allowed)}")
    return p


def save_mask_like(
    mask: np.ndarray,
    image: Image,
    path: str | os.PathLike[str],
    slice: int | None = None,  # noqa: A002
    *,
    label_names: Sequence[str] = ("target",),
    provenance: object | None = None,
) -> Path:
    """Write ``mask`` in the source geometry of ``image`` (atomically), in the format ``path``'s suffix names.

    Args:
        mask: bool ``(Z, Y, X)`` for a volume, ``(H, W)`` for a 2D image or for axial slice ``slice`` of a volume
            (written as a full volume with only that slice set).
        image: the image the mask was drawn on.
        path: ``.nii``/``.nii.gz`` (nibabel, the image's own affine and voxel order), ``.nrrd`` (SimpleITK),
            ``.png`` (2D only) or ``.dcm`` (DICOM-SEG referencing a DICOM source, :func:`.seg.save_dicom_seg`).
            A sheared (gantry-tilted) grid is carried exactly: NRRD's space directions hold it; NIfTI holds it in
            the sform only (qform code 0), which nibabel reads exactly and ITK-based readers refuse.
        label_names: the segment names (DICOM-SEG; one per segment).
        provenance: a :class:`.seg.Provenance` for DICOM-SEG (how the mask was made).

    Returns:
        ``path``. Values are uint8 0/1 in NIfTI/NRRD, 0/255 in PNG.
    """
    p = Path(path)
    if has_suffix(p, DICOM_SEG_SUFFIXES):
        from .seg import save_dicom_seg

        return save_dicom_seg(mask, image, p, label_names, slice=slice, provenance=provenance)  # type: ignore[arg-type]
    full = full_mask(mask, image, slice)
    if has_suffix(p, PNG_SUFFIXES):
        if full.ndim != 2:
            raise ImageError(f"{p}: PNG output needs a 2D mask; use .nii.gz for volumes")
        return save_mask_png(full, p)
    canonical = full if image.is_volume else full[None]
    stored = image.geometry.to_source(canonical.astype(np.uint8))
    if not image.is_volume:
        stored = stored[:, :, 0]
    if has_suffix(p, NIFTI_SUFFIXES):
        nii = nib.Nifti1Image(stored, image.geometry.source_affine)
        nii.set_data_dtype(np.uint8)
        if is_sheared(image.geometry.source_affine):
            # a gantry-tilted grid: the qform cannot hold a shear, so only the (exact) sform is written; readers
            # that would take an approximate qform (ITK, Slicer) refuse the file instead of misplacing the mask
            nii.set_qform(None, code=0)
        else:
            nii.set_qform(image.geometry.source_affine, code=1)
        nii.set_sform(image.geometry.source_affine, code=1)
        with atomic_path(p) as tmp:
            nib.save(nii, str(tmp))
        return p
    if has_suffix(p, NRRD_SUFFIXES):
        out = sitk.GetImageFromArray(stored.T)  # (i, j[, k]) -> [k, j, i]
        spacing, origin, direction = ras_affine_to_sitk(image.geometry.source_affine, stored.ndim)
        out.SetSpacing(spacing)
        out.SetOrigin(origin)
        out.SetDirection(direction)
        with atomic_path(p) as tmp:
            sitk.WriteImage(out, str(tmp), useCompression=True)
        return p
    raise ImageError(f"{p}: unsupported mask output format (use .nii, .nii.gz, .nrrd or .png)")
