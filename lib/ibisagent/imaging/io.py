"""Reading images: PNG/JPEG, NIfTI, NRRD, single DICOM files and DICOM series folders.

Axis conventions (used everywhere in :mod:`ibisagent.imaging`):

* A 2D image is ``array[y, x]`` = ``(H, W)`` for grey or ``(H, W, C)`` for colour, ``y`` the row, ``x`` the column.
* A volume is ``array[z, y, x]`` = ``(Z, Y, X)`` = (slices, rows, columns), so ``array[k]`` is axial slice ``k``.
  Volumes are reoriented on load to the radiological display orientation: ``x`` grows towards the patient's
  Left, ``y`` towards Posterior, ``z`` towards Superior ("LPS", the orientation of a standard axial DICOM series),
  so ``array[k]`` shows the patient as a radiologist expects (anterior up, patient's right on the viewer's left)
  whatever order the file stores its voxels in. The original storage order is kept in :class:`Geometry` so that
  masks are written back voxel-exactly in the source geometry.
* Affines follow nibabel: 4x4 matrices mapping voxel indices ``(i, j, k)`` to RAS+ world millimetres.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from nibabel import orientations as ornt
from PIL import Image as PILImage

logger = logging.getLogger(__name__)

CANONICAL_AXCODES: tuple[str, str, str] = ("L", "P", "S")
"""Direction each canonical voxel axis ``(x, y, z)`` grows towards (nibabel axis codes)."""

PNG_SUFFIXES = (".png",)
JPEG_SUFFIXES = (".jpg", ".jpeg")
PIL_SUFFIXES = PNG_SUFFIXES + JPEG_SUFFIXES + (".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ImageError(ValueError):
    """An image or mask could not be read or does not fit; the message names the file and the problem."""


@dataclass(frozen=True, eq=False)
class Geometry:
    """How the loaded array relates to the voxels stored in the source file.

    Attributes:
        source_affine: 4x4 RAS affine of the stored voxel grid ``(i, j, k)``.
        source_shape: stored grid shape ``(I, J, K)`` (``K == 1`` for 2D images).
        transform: nibabel orientation transform (``(3, 2)`` array) taking the stored ``(i, j, k)`` grid to the
            canonical ``(x, y, z)`` grid; the identity for 2D images.
    """

    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    transform: np.ndarray

    @property
    def affine(self) -> np.ndarray:
        """4x4 RAS affine of the canonical ``(x, y, z)`` grid (``array[z, y, x]``)."""
        return self.source_affine @ ornt.inv_ornt_aff(self.transform, self.source_shape)

    def to_canonical(self, stored: np.ndarray) -> np.ndarray:
        """Stored ``(I, J, K)`` array -> canonical ``(Z, Y, X)`` array."""
        return np.ascontiguousarray(ornt.apply_orientation(stored, self.transform).transpose(2, 1, 0))

    def voxel_to_canonical(self, ijk: tuple[int, int, int]) -> tuple[int, int, int]:
        """A stored voxel index ``(i, j, k)`` (what MONAI Label clients send) → the canonical ``(z, y, x)`` index of
        the same voxel in ``to_canonical(stored)``. Raises ``ValueError`` outside the stored grid."""
        if len(ijk) != 3 or not all(0 <= int(v) < n for v, n in zip(ijk, self.source_shape)):
            raise ValueError(f"voxel {list(ijk)} is outside the voxel grid {list(self.source_shape)}")
        xyz = [0, 0, 0]
        for axis, (dst, flip) in enumerate(self.transform):
            v = int(ijk[axis])
            xyz[int(dst)] = v if flip > 0 else self.source_shape[axis] - 1 - v
        return xyz[2], xyz[1], xyz[0]

    def canonical_to_voxel(self, zyx: tuple[int, int, int]) -> tuple[int, int, int]:
        """Inverse of :meth:`voxel_to_canonical`."""
        xyz = (int(zyx[2]), int(zyx[1]), int(zyx[0]))
        ijk = [0, 0, 0]
        for axis, (dst, flip) in enumerate(self.transform):
            v = xyz[int(dst)]
            ijk[axis] = v if flip > 0 else self.source_shape[axis] - 1 - v
        return ijk[0], ijk[1], ijk[2]

    def to_source(self, canonical: np.ndarray) -> np.ndarray:
        """Canonical ``(Z, Y, X)`` array -> stored ``(I, J, K)`` array (the exact inverse of :meth:`to_canonical`)."""
        back = _inverse(self.transform)
        return np.ascontiguousarray(ornt.apply_orientation(canonical.transpose(2, 1, 0), back))


@dataclass(frozen=True, eq=False)
class Image:
    """A loaded image or volume.

    Attributes:
        array: 2D image ``(H, W)`` grey or ``(H, W, 3)`` RGB, indexed ``[y, x]``; or a volume ``(Z, Y, X)`` in
            the canonical LPS orientation, ``array[k]`` being axial slice ``k``. Intensities are kept as stored:
            uint8/uint16 for PNG/JPEG, Hounsfield units (float32 or int16) for CT read from DICOM, raw values for
            NIfTI/NRRD.
        is_volume: True for 3D volumes (``array.ndim == 3`` and not colour).
        modality: "CT", "MR", "XR", "US", ... from DICOM tags, "RGB" for colour pictures, "" when unknown.
        spacing: pixel size in mm in array axis order: ``(dz, dy, dx)`` for volumes, ``(dy, dx)`` for 2D images
            (1.0 where the file has none).
        source: the file or folder the image was read from.
        geometry: what is needed to write masks back in the source geometry.
        dicom_files: for DICOM inputs, the instance files in stored slice order (``k`` of the stored grid).
    """

    array: np.ndarray
    is_volume: bool
    modality: str
    spacing: tuple[float, ...]
    source: Path
    geometry: Geometry
    dicom_files: tuple[Path, ...] = field(default=())

    @property
    def affine(self) -> np.ndarray:
        """4x4 RAS affine mapping canonical voxel ``(x, y, z)`` (``array[z, y, x]``) to world mm."""
        return self.geometry.affine

    @property
    def shape2d(self) -> tuple[int, int]:
        """``(H, W)`` of one displayed slice or of the 2D image."""
        return tuple(self.array.shape[1:3]) if self.is_volume else tuple(self.array.shape[:2])  # type: ignore


def _canonical_ornt() -> np.ndarray:
    return ornt.axcodes2ornt(CANONICAL_AXCODES)


def _inverse(transform: np.ndarray) -> np.ndarray:
    """Inverse of a nibabel orientation transform."""
    inv = np.zeros_like(transform)
    for src_axis, (dst_axis, flip) in enumerate(transform):
        inv[int(dst_axis)] = (src_axis, flip)
    return inv


def _identity_transform() -> np.ndarray:
    return np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def geometry_for(source_affine: np.ndarray, source_shape: tuple[int, ...]) -> Geometry:
    """Geometry of a stored grid; volumes with more than one slice are reoriented to LPS, others are not."""
    shape3 = tuple(int(s) for s in source_shape) + (1,) * (3 - len(source_shape))
    affine = np.asarray(source_affine, dtype=float)
    if len(source_shape) == 3 and min(shape3) > 1:
        transform = ornt.ornt_transform(ornt.io_orientation(affine), _canonical_ornt())
    else:
        transform = _identity_transform()
    return Geometry(source_affine=affine, source_shape=shape3, transform=transform)  # type: ignore[arg-type]


def planar_geometry(height: int, width: int, spacing: tuple[float, float] = (1.0, 1.0)) -> Geometry:
    """Geometry of a plain 2D picture ``(H, W)`` with pixel size ``(dy, dx)`` mm, already in LPS orientation."""
    dy, dx = spacing
    affine = np.diag([-float(dx), -float(dy), 1.0, 1.0])
    return geometry_for(affine, (width, height, 1))


def sitk_to_ras_affine(img: sitk.Image) -> np.ndarray:
    """4x4 RAS affine of a 2D or 3D SimpleITK image (index order ``(x, y, z)``)."""
    dim = img.GetDimension()
    direction = np.eye(3)
    direction[:dim, :dim] = np.asarray(img.GetDirection(), dtype=float).reshape(dim, dim)
    spacing = np.ones(3)
    spacing[:dim] = img.GetSpacing()
    origin = np.zeros(3)
    origin[:dim] = img.GetOrigin()
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = origin
    return _LPS_TO_RAS @ lps


def ras_affine_to_sitk(affine: np.ndarray, dim: int) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(spacing, origin, direction)`` in SimpleITK's LPS convention for the first ``dim`` axes of ``affine``."""
    lps = _LPS_TO_RAS @ np.asarray(affine, dtype=float)
    cols = lps[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    direction = cols / spacing[None, :]
    origin = lps[:3, 3]
    return (
        tuple(float(s) for s in spacing[:dim]),
        tuple(float(o) for o in origin[:dim]),
        tuple(float(d) for d in direction[:dim, :dim].ravel()),
    )


def _spacing_from(affine: np.ndarray, volume: bool) -> tuple[float, ...]:
    dx, dy, dz = (float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return (dz, dy, dx) if volume else (dy, dx)


def has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    """Case-insensitive suffix test that understands double suffixes such as ``.nii.gz``."""
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def detect_format(path: Path) -> str:
    """One of ``"pil"``, ``"nifti"``, ``"nrrd"``, ``"dicom"``, ``"dicom_dir"``; raises :class:`ImageError`."""
    if not path.exists():
        raise ImageError(f"{path}: file or folder not found")
    if path.is_dir():
        return "dicom_dir"
    if has_suffix(path, NIFTI_SUFFIXES):
        return "nifti"
    if has_suffix(path, NRRD_SUFFIXES):
        return "nrrd"
    if has_suffix(path, PIL_SUFFIXES):
        return "pil"
    if has_suffix(path, DICOM_SUFFIXES) or pydicom.misc.is_dicom(str(path)):
        return "dicom"
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "pil"
    raise ImageError(
        f"{path}: unknown image format (expected PNG/JPEG, NIfTI .nii/.nii.gz, NRRD .nrrd, DICOM file or DICOM folder)"
    )


def load_image(path: str | os.PathLike[str], modality: str | None = None) -> Image:
    """Load a 2D picture, a volume or a DICOM series folder.

    Args:
        path: PNG/JPEG (8/16-bit, grey/RGB/RGBA — alpha is dropped), NIfTI (.nii/.nii.gz), NRRD, a single DICOM
            file, or a folder holding one DICOM series (sorted by slice position; the largest series if several).
        modality: overrides the modality read from the file (DICOM tags) or guessed. Without it, an image whose
            file names no modality (NIfTI, NRRD, PNG/JPEG/TIFF) is ``"RGB"`` when colour, ``"CT"`` when its values
            look like Hounsfield units (:func:`ibisagent.imaging.windowing.looks_like_hounsfield`: air, -1100..-700,
            present and 95 % of the values in -1100..3100), ``""`` otherwise; the choice is logged. ``"CT"`` gets
            the CT window on display (:func:`ibisagent.imaging.to_display_rgb`).

    Returns:
        An :class:`Image`; see the module docstring for axis orders.

    Raises:
        ImageError: missing file, unknown format, unreadable or corrupt content, empty folder.
    """
    p = Path(path)
    kind = detect_format(p)
    try:
        if kind == "pil":
            image = _load_pil(p)
        elif kind == "nifti":
            image = _load_nifti(p)
        elif kind == "nrrd":
            image = _load_sitk_file(p)
        elif kind == "dicom":
            from .dicom import load_dicom_file

            image = load_dicom_file(p)
        else:
            from .dicom import load_dicom_series

            image = load_dicom_series(p)
    except ImageError:
        raise
    except Exception as exc:  # library errors on corrupt content become ImageError naming the file
        raise ImageError(f"{p}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if modality is None and not image.modality:
        modality = _guess_modality(image)
    if modality is not None and modality != image.modality:
        image = Image(
            array=image.array,
            is_volume=image.is_volume,
            modality=modality,
            spacing=image.spacing,
            source=image.source,
            geometry=image.geometry,
            dicom_files=image.dicom_files,
        )
    return image


def _guess_modality(image: Image) -> str | None:
    """``"CT"`` for a grey image without a modality whose values look like Hounsfield units, else ``None``."""
    from .windowing import looks_like_hounsfield

    colour = not image.is_volume and image.array.ndim == 3
    if colour or not looks_like_hounsfield(image.array):
        return None
    logger.info("%s: no modality in the file; the values look like CT in Hounsfield units (air present, 95 %% "
                "within -1100..3100 HU), so it is treated as CT and shown in the CT window; pass a modality to "
                "override", image.source)
    return "CT"


def _load_pil(path: Path) -> Image:
    with PILImage.open(path) as pil:
        pil.load()
        array = pil_to_array(pil, path)
    modality = "RGB" if array.ndim == 3 else ""
    return Image(
        array=array,
        is_volume=False,
        modality=modality,
        spacing=(1.0, 1.0),
        source=path,
        geometry=planar_geometry(array.shape[0], array.shape[1]),
    )


def pil_to_array(pil: PILImage.Image, path: Path) -> np.ndarray:
    """PIL image -> ``(H, W)`` uint8/uint16 grey or ``(H, W, 3)`` uint8 RGB (alpha dropped, palettes expanded)."""
    mode = pil.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(pil)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageError(f"{path}: 32-bit integer pixels outside the uint16 range [{arr.min()}, {arr.max()}]")
        return arr.astype(np.uint16)
    if mode == "F":
        return np.asarray(pil, dtype=np.float32)
    if mode in ("1", "L"):
        return np.asarray(pil.convert("L"), dtype=np.uint8)
    if mode == "LA":
        return np.asarray(pil.convert("L"), dtype=np.uint8)
    if mode == "P":
        rgb = np.asarray(pil.convert("RGB"), dtype=np.uint8)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0])
        return rgb
    return np.asarray(pil.convert("RGB"), dtype=np.uint8)


def _volume_image(stored: np.ndarray, affine: np.ndarray, path: Path, modality: str,
                  dicom_files: tuple[Path, ...] = ()) -> Image:
    """Build an Image from a stored ``(I, J[, K])`` array and its RAS affine."""
    stored = np.asarray(stored)
    while stored.ndim > 3 and stored.shape[-1] == 1:
        stored = stored[..., 0]
    if stored.ndim not in (2, 3):
        raise ImageError(f"{path}: expected a 2D or 3D scalar image, got array shape {stored.shape}")
    geometry = geometry_for(affine, stored.shape)
    stored3 = stored.reshape(geometry.source_shape)
    canonical = geometry.to_canonical(stored3)
    is_volume = min(geometry.source_shape) > 1
    if not is_volume and geometry.source_shape[2] != 1:
        raise ImageError(f"{path}: degenerate volume of stored shape {geometry.source_shape}")
    if not is_volume:
        canonical = canonical[0]
    return Image(
        array=canonical,
        is_volume=is_volume,
        modality=modality,
        spacing=_spacing_from(geometry.affine, is_volume),
        source=path,
        geometry=geometry,
        dicom_files=dicom_files,
    )


def _load_nifti(path: Path) -> Image:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.dtype.kind == "f" or img.dataobj.slope != 1 or img.dataobj.inter != 0:  # type: ignore[attr-defined]
        data = np.asarray(img.get_fdata(dtype=np.float32))
    elif data.dtype.byteorder not in ("=", "|"):
        data = data.astype(data.dtype.newbyteorder("="))
    return _volume_image(data, img.affine, path, "")


def _load_sitk_file(path: Path) -> Image:
    img = sitk.ReadImage(str(path))
    return sitk_image_to_image(img, path, "")


def sitk_image_to_image(img: sitk.Image, path: Path, modality: str, dicom_files: tuple[Path, ...] = (),
                        affine: np.ndarray | None = None) -> Image:
    """Wrap a scalar 2D/3D SimpleITK image (array ``[z, y, x]``) as an :class:`Image`; ``affine`` (RAS, of the
    ``(x, y, z)`` index grid) replaces the image's own geometry when given (a sheared, gantry-tilted stack)."""
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"{path}: vector/colour pixels are not supported in volumes "
                         f"({img.GetNumberOfComponentsPerPixel()} components)")
    arr = sitk.GetArrayFromImage(img)
    stored = arr.T  # [z, y, x] -> (x, y, z)
    return _volume_image(stored, sitk_to_ras_affine(img) if affine is None else affine, path, modality, dicom_files)


def slice_of(image: Image, k: int) -> np.ndarray:
    """Axial slice ``k`` of a volume as ``(Y, X)``; for a 2D image only ``k == 0`` is valid and returns the image."""
    n = num_slices(image)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ImageError(f"{image.source}: slice index must be an integer, got {k!r}")
    if not 0 <= k < n:
        raise ImageError(f"{image.source}: slice {k} out of range; the image has {n} slice(s) (0..{n - 1})")
    return image.array[int(k)] if image.is_volume else image.array


def num_slices(image: Image) -> int:
    """Number of axial slices: ``Z`` for a volume, 1 for a 2D image."""
    return int(image.array.shape[0]) if image.is_volume else 1
