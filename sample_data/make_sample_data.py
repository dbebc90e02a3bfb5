"""Build the sample data set: small synthetic and real images with binary reference masks and a manifest.

Run ``python sample_data/make_sample_data.py`` (optionally ``--out DIR``). Deterministic: every random draw comes
from a seeded generator, DICOM UIDs are derived from fixed strings, and all files are written atomically through
:mod:`ibisagent.fileio` / :mod:`ibisagent.imaging`. The outputs are committed to the repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import skimage
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from skimage import draw, filters, measure, morphology

from ibisagent.fileio import atomic_path, atomic_write_bytes, atomic_write_text
from ibisagent.imaging import load_image, save_mask_like, save_mask_png

SEED = 20240611
SIZE = 256
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's documented example root; UIDs derived from fixed strings


# ---------------------------------------------------------------- shapes and textures


def blob(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, rng: np.random.Generator,
         wobble: float = 0.08, harmonics: int = 4, angle: float = 0.0) -> np.ndarray:
    """(H, W) bool smooth star-convex blob: an ellipse whose radius is modulated by a few random harmonics."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = (dx * ca + dy * sa) / rx, (-dx * sa + dy * ca) / ry
    theta = np.arctan2(v, u)
    radius = np.ones_like(theta)
    for k in range(2, 2 + harmonics):
        radius += wobble / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= radius


def smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean unit-std Gaussian-filtered white noise: organ texture and bias fields."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-12)


def remove_small(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Drop connected components with fewer than ``min_pixels`` pixels."""
    labels = measure.label(mask)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected (6-connected in 3D) component of ``mask``."""
    labels = measure.label(mask, connectivity=1)
    if labels.max() == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


# ---------------------------------------------------------------- synthetic 2D images


def ct_abdomen(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """CT-like axial abdomen in HU (float, (256, 256)) and its organ masks.

    Radiological convention: the patient's right (liver, right kidney) is on the image's left.
    """
    shape = (SIZE, SIZE)
    hu = np.full(shape, -1000.0)
    body = blob(shape, 132, 128, 96, 118, rng, wobble=0.03)
    fat = body & ~blob(shape, 132, 128, 86, 108, rng, wobble=0.03)
    hu[body] = 40.0
    inner = body & ~fat
    hu[inner] = -90.0
    liver = blob(shape, 112, 82, 52, 48, rng, wobble=0.1, angle=0.3) & inner
    spleen = blob(shape, 118, 190, 26, 18, rng, wobble=0.1, angle=-0.4) & inner
    right_kidney = blob(shape, 168, 88, 19, 13, rng, wobble=0.06, angle=0.5) & ~liver
    left_kidney = blob(shape, 170, 168, 19, 13, rng, wobble=0.06, angle=-0.5)
    spine = blob(shape, 182, 128, 17, 17, rng, wobble=0.05)
    aorta = blob(shape, 152, 136, 9, 9, rng, wobble=0.0)
    bowel = blob(shape, 95, 150, 30, 26, rng, wobble=0.15) & ~liver
    lesion = blob(shape, 104, 70, 11, 13, rng, wobble=0.12) & liver
    texture = smooth_noise(shape, 2.0, rng)
    for organ, value in ((bowel, 20.0), (liver, 62.0), (spleen, 50.0), (right_kidney, 150.0),
                         (left_kidney, 150.0), (aorta, 180.0), (spine, 450.0), (lesion, 36.0)):
        hu[organ] = value + 8.0 * texture[organ]
    hu[spine & ~blob(shape, 182, 128, 11, 11, rng, wobble=0.05)] = 900.0
    hu = ndimage.gaussian_filter(hu, 0.7) + rng.normal(0.0, 12.0, shape)
    masks = {"liver": liver, "liver lesion": lesion, "right kidney": right_kidney, "left kidney": left_kidney}
    return hu, masks


def mr_brain(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """T1-like axial brain ((256, 256) uint8) with a multiplicative bias field; cortex ring and ventricle masks."""
    shape = (SIZE, SIZE)
    yy, xx = np.mgrid[: SIZE, : SIZE].astype(np.float64)
    head = blob(shape, 128, 128, 112, 94, rng, wobble=0.02)
    skull_inner = blob(shape, 128, 128, 102, 84, rng, wobble=0.02)
    brain = blob(shape, 128, 128, 96, 78, rng, wobble=0.02)
    theta = np.arctan2(yy - 128, xx - 128)
    gyri = 7.0 * np.sin(14 * theta + rng.uniform(0, 6.3)) + 3.0 * np.sin(23 * theta + rng.uniform(0, 6.3))
    r = np.hypot((yy - 128) / 96 * 78, xx - 128)
    white = brain & (r < 60 + gyri)
    cortex = brain & ~white
    horn_l = blob(shape, 112, 112, 26, 6, rng, wobble=0.1, angle=np.pi / 2 - 0.35)
    horn_r = blob(shape, 112, 144, 26, 6, rng, wobble=0.1, angle=np.pi / 2 + 0.35)
    body_l = blob(shape, 142, 116, 14, 5, rng, wobble=0.1, angle=np.pi / 2 + 0.2)
    body_r = blob(shape, 142, 140, 14, 5, rng, wobble=0.1, angle=np.pi / 2 - 0.2)
    ventricles = (horn_l | horn_r | body_l | body_r) & white
    img = np.zeros(shape)
    img[head] = 200.0
    img[skull_inner] = 30.0
    img[brain] = 45.0
    img[cortex] = 110.0
    img[white] = 165.0
    img[ventricles] = 40.0
    img = ndimage.gaussian_filter(img, 1.0)
    bias = 1.0 + 0.18 * (xx - 128) / 128 - 0.1 * (yy - 128) / 128 + 0.05 * smooth_noise(shape, 30.0, rng)
    img = img * bias + np.abs(rng.normal(0.0, 6.0, shape))
    return np.clip(img, 0, 255).astype(np.uint8), {"cortex": cortex, "lateral ventricles": ventricles}


def fundus(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Fundus-photo-like RGB ((256, 256, 3) uint8) with a branching vessel tree and an optic disc."""
    shape = (SIZE, SIZE)
    yy, xx = np.mgrid[: SIZE, : SIZE].astype(np.float64)
    fov = np.hypot(yy - 128, xx - 128) < 120
    disc_c = (128.0, 80.0)
    disc = np.hypot(yy - disc_c[0], xx - disc_c[1]) < 16
    vessels = np.zeros(shape, dtype=bool)

    def grow(y: float, x: float, angle: float, width: float, length: int) -> None:
        for _ in range(length):
            if width < 0.8 or not (0 <= y < SIZE and 0 <= x < SIZE) or not fov[int(y), int(x)]:
                return
            rr, cc = draw.disk((y, x), width, shape=shape)
            vessels[rr, cc] = True
            angle += rng.normal(0.0, 0.12)
            y, x = y + 2.0 * np.sin(angle), x + 2.0 * np.cos(angle)
            if rng.random() < 0.045:
                side = rng.choice([-1.0, 1.0])
                grow(y, x, angle + side * rng.uniform(0.4, 0.9), width * 0.7, length // 2)
                width *= 0.85

    for angle in (-1.2, -0.5, 0.4, 1.1, 2.6, -2.6):
        grow(disc_c[0] + 6 * np.sin(angle), disc_c[1] + 6 * np.cos(angle), angle, 2.6, 80)
    vessels &= fov & ~disc
    shade = 1.0 - 0.35 * np.hypot(yy - 128, xx - 128) / 128 + 0.05 * smooth_noise(shape, 12.0, rng)
    rgb = np.zeros(shape + (3,))
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200.0 * shade, 90.0 * shade, 40.0 * shade
    rgb[vessels] *= np.array([0.62, 0.45, 0.55])
    rgb[disc] = np.array([245.0, 210.0, 130.0])
    rgb = ndimage.gaussian_filter(rgb, (0.6, 0.6, 0)) + rng.normal(0.0, 3.0, rgb.shape)
    rgb[~fov] = 0.0
    return np.clip(rgb, 0, 255).astype(np.uint8), {"retinal vessels": vessels, "optic disc": disc}


def ultrasound(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """B-mode-like sector image ((256, 256) uint8) with Rayleigh speckle and a hypoechoic lesion."""
    shape = (SIZE, SIZE)
    yy, xx = np.mgrid[: SIZE, : SIZE].astype(np.float64)
    r = np.hypot(yy + 20, xx - 128)
    theta = np.arctan2(xx - 128, yy + 20)
    sector = (r > 30) & (r < 270) & (np.abs(theta) < 0.75)
    echo = 0.55 + 0.15 * (yy > 90) + 0.1 * smooth_noise(shape, 10.0, rng)
    lesion = blob(shape, 150, 120, 24, 32, rng, wobble=0.1)
    echo[lesion] = 0.18
    echo[ndimage.binary_dilation(lesion, iterations=2) & ~lesion] = 0.8
    below = (xx > 95) & (xx < 150) & (yy > 175)
    echo[below & ~lesion] *= 1.2
    speckle = rng.rayleigh(1.0, shape)
    speckle = ndimage.gaussian_filter(speckle, (1.6, 0.7))
    img = 150.0 * echo * speckle / speckle.mean() * np.exp(-yy / 600)
    img[~sector] = 0.0
    return np.clip(img, 0, 255).astype(np.uint8), {"lesion": lesion & sector}


# ---------------------------------------------------------------- synthetic volumes


def ct_volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """CT-like (Z, Y, X) volume in HU with ellipsoidal organs; z grows towards the head."""
    nz, ny, nx = shape
    zz, yy, xx = np.mgrid[:nz, :ny, :nx].astype(np.float64)
    zc, yc, xc = (nz - 1) / 2, ny / 2, nx / 2
    warp = 0.08 * smooth_noise(shape, 4.0, rng)

    def ellipsoid(cz: float, cy: float, cx: float, rz: float, ry: float, rx: float) -> np.ndarray:
        return ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 + warp <= 1.0

    body = ellipsoid(zc, yc, xc, nz * 4, ny * 0.42, nx * 0.46)
    liver = ellipsoid(zc + nz * 0.1, yc - ny * 0.06, xc - nx * 0.2, nz * 0.45, ny * 0.22, nx * 0.2) & body
    spleen = ellipsoid(zc + nz * 0.05, yc + ny * 0.02, xc + nx * 0.28, nz * 0.3, ny * 0.11, nx * 0.08) & body
    spine = ((yy - yc - ny * 0.24) ** 2 + (xx - xc) ** 2) <= (nx * 0.07) ** 2
    hu = np.full(shape, -1000.0)
    hu[body] = -80.0
    texture = smooth_noise(shape, 1.5, rng)
    for organ, value in ((liver, 60.0), (spleen, 48.0), (spine & body, 500.0)):
        hu[organ] = value + 8.0 * texture[organ]
    hu = hu + rng.normal(0.0, 10.0, shape)
    return hu, {"liver": liver, "spleen": spleen}


# ---------------------------------------------------------------- real images shipped in packages


def real_vertebra_mask(hu: np.ndarray) -> np.ndarray:
    """pydicom CT_small: the vertebra = largest bone component (> 180 HU), closed and hole-filled."""
    bone = ndimage.gaussian_filter(hu, 0.8) > 180.0
    bone = remove_small(bone, 30)
    vertebra = largest_component(ndimage.binary_closing(bone, morphology.disk(2)))
    return ndimage.binary_fill_holes(vertebra)


def real_mr_small_mask(values: np.ndarray) -> np.ndarray:
    """pydicom MR_small: the dark round hole inside the bright ring near (x=41, y=37): smoothed intensity below
    25 % of the maximum, within 6 px of the darkest point there, largest component, holes filled."""
    smooth = filters.gaussian(values.astype(np.float64) / values.max(), 0.8)
    window = smooth[32:42, 36:46]
    dy, dx = np.unravel_index(int(np.argmin(window)), window.shape)
    cy, cx = 32 + int(dy), 36 + int(dx)
    yy, xx = np.mgrid[: values.shape[0], : values.shape[1]]
    near = np.hypot(yy - cy, xx - cx) <= 6
    return ndimage.binary_fill_holes(largest_component((smooth < 0.25) & near))


def real_ventricle_mask(volume: np.ndarray) -> np.ndarray:
    """nibabel anatomical.nii (T1, (Z, Y, X)): lateral ventricles = dark CSF component nearest the centre."""
    smooth = ndimage.gaussian_filter(volume.astype(np.float64), 0.6)
    dark = smooth < np.percentile(smooth, 12)
    labels = measure.label(dark)
    nz, ny, nx = volume.shape
    centre = labels[nz // 2 + 1, ny // 2 - 4 : ny // 2 + 4, nx // 2 - 3 : nx // 2 + 3]
    ids, counts = np.unique(centre[centre > 0], return_counts=True)
    return labels == int(ids[np.argmax(counts)])


def real_retina_vessels(rgb: np.ndarray) -> np.ndarray:
    """scikit-image retina.jpg: Sato vesselness on the inverted green channel, thresholded, small bits removed."""
    green = rgb[..., 1].astype(np.float64) / 255.0
    fov = ndimage.binary_erosion(rgb[..., 0] > 30, iterations=12)
    response = filters.sato(1.0 - green, sigmas=(1, 2, 3), black_ridges=False)
    response[~fov] = 0.0
    vessels = response > np.percentile(response[fov], 88)
    vessels = remove_small(vessels, 150)
    return vessels & fov


# ---------------------------------------------------------------- writers


def save_png(array: np.ndarray, path: Path) -> None:
    """Write an 8-bit grey, 16-bit grey or RGB array as PNG (atomically)."""
    from PIL import Image as PILImage

    with atomic_path(path, suffix=".png") as tmp:
        PILImage.fromarray(array).save(tmp, format="PNG")


def _uid(name: str) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["ibisagent-sample", name])


def write_ct_series(hu: np.ndarray, folder: Path, spacing: tuple[float, float, float]) -> None:
    """Write a (Z, Y, X) HU volume as an axial CT series (one file per slice, int16 + RescaleIntercept -1024).

    Slice ``k`` sits at ``z = k * dz`` (inferior to superior) with the standard axial orientation, so the loader's
    canonical array equals ``hu``.
    """
    dz, dy, dx = spacing
    study, series, frame = _uid("study"), _uid("series"), _uid("frame")
    stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.uint16)
    date = datetime.date(2024, 1, 1).strftime("%Y%m%d")
    nz, ny, nx = hu.shape
    order = list(range(nz))
    np.random.default_rng(SEED).shuffle(order)  # file names do not follow the slice order: sorting is the reader's
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = _uid(f"slice{k}")
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = _uid("implementation")
        ds = FileDataset(str(folder), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientBirthDate = "Synthetic^Phantom", "IBIS0001", "O", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "IBIS0001", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.Manufacturer, ds.SeriesDescription, ds.BodyPartExamined = "ibisagent synthetic", "Synthetic CT", "ABDOMEN"
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{-nx * dx / 2:.3f}", f"{-ny * dy / 2:.3f}", f"{k * dz:.3f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
        ds.SliceThickness = f"{dz:g}"
        ds.KVP, ds.PatientPosition = "120", "HFS"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = stored[k].tobytes()
        with atomic_path(folder / f"IM{order[k]:04d}.dcm", suffix=".dcm") as tmp:
            ds.save_as(str(tmp), write_like_original=False)


def copy_file(src: Path, dst: Path) -> None:
    atomic_write_bytes(dst, Path(src).read_bytes())


# ---------------------------------------------------------------- the data set


def build(out: Path) -> list[dict]:
    """Write every sample file under ``out`` and return the manifest rows (paths relative to ``out``)."""
    rng = np.random.default_rng(SEED)
    rows: list[dict] = []

    def case(case_id: str, image: str, modality: str, instruction: str, targets: list[tuple[str, str | None]],
             **extra: object) -> None:
        row: dict = {"id": case_id, "image": image, "modality": modality, "instruction": instruction,
                     "targets": [{"name": n, "mask": m} for n, m in targets]}
        row.update({k: v for k, v in extra.items() if v is not None})
        rows.append(row)

    def mask_png(mask: np.ndarray, rel: str) -> str:
        save_mask_png(mask, out / rel)
        return rel

    # CT abdomen, stored as a 16-bit PNG of HU + 1024
    hu, ct = ct_abdomen(rng)
    save_png(np.clip(np.round(hu + 1024.0), 0, 65535).astype(np.uint16), out / "synthetic/ct_abdomen.png")
    img = "synthetic/ct_abdomen.png"
    case("ct_liver", img, "CT", "Segment the liver.", [("liver", mask_png(ct["liver"], "synthetic/ct_liver.png"))])
    case("ct_liver_lesion", img, "CT", "Segment the low-density lesion in the liver.",
         [("liver lesion", mask_png(ct["liver lesion"], "synthetic/ct_liver_lesion.png"))])
    case("ct_kidneys", img, "CT", "Segment the right kidney and the left kidney.",
         [("right kidney", mask_png(ct["right kidney"], "synthetic/ct_right_kidney.png")),
          ("left kidney", mask_png(ct["left kidney"], "synthetic/ct_left_kidney.png"))])
    case("ct_kidney_stone_absent", img, "CT", "Segment the kidney stone.", [("kidney stone", None)])

    # MR brain, 8-bit grey
    mr, brain = mr_brain(rng)
    save_png(mr, out / "synthetic/mr_brain.png")
    img = "synthetic/mr_brain.png"
    case("mr_ventricles", img, "MR", "Segment the lateral ventricles.",
         [("lateral ventricles", mask_png(brain["lateral ventricles"], "synthetic/mr_ventricles.png"))])
    case("mr_cortex", img, "MR", "Segment the cortical grey matter.",
         [("cortex", mask_png(brain["cortex"], "synthetic/mr_cortex.png"))])
    case("mr_tumour_absent", img, "MR", "Segment the brain tumour.", [("brain tumour", None)])

    # Fundus, RGB
    rgb, eye = fundus(rng)
    save_png(rgb, out / "synthetic/fundus.png")
    img = "synthetic/fundus.png"
    case("fundus_vessels", img, "fundus", "Segment the retinal vessel tree.",
         [("retinal vessels", mask_png(eye["retinal vessels"], "synthetic/fundus_vessels.png"))])
    case("fundus_optic_disc", img, "fundus", "Segment the optic disc.",
         [("optic disc", mask_png(eye["optic disc"], "synthetic/fundus_optic_disc.png"))])

    # Ultrasound, 8-bit grey; one refinement case from a deliberately imperfect mask
    us, lesion = ultrasound(rng)
    save_png(us, out / "synthetic/us_lesion.png")
    img = "synthetic/us_lesion.png"
    gt = mask_png(lesion["lesion"], "synthetic/us_lesion_mask.png")
    case("us_lesion", img, "US", "Segment the hypoechoic lesion.", [("lesion", gt)])
    rough = ndimage.shift(ndimage.binary_dilation(lesion["lesion"], iterations=6).astype(np.uint8), (8, -10),
                          order=0).astype(bool)
    case("us_lesion_refine", img, "US", "Refine the segmentation of the hypoechoic lesion.", [("lesion", gt)],
         initial_mask=mask_png(rough, "synthetic/us_lesion_initial.png"))

    # Synthetic CT volume as NIfTI, stored RAS (the loader reorients it to LPS)
    vol_shape = (32, 96, 96)
    hu3, organs3 = ct_volume(rng, vol_shape)
    spacing = (2.5, 0.8, 0.8)
    lps_affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    lps_affine[:3, 3] = (-40.0, -30.0, -50.0)
    ras_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = vol_shape[2] - 1, vol_shape[1] - 1
    stored = hu3.transpose(2, 1, 0)[::-1, ::-1, :].astype(np.int16)  # canonical LPS (x, y, z) -> stored RAS (i, j, k)
    nii = nib.Nifti1Image(np.ascontiguousarray(stored), ras_affine @ flip)
    nii.set_qform(nii.affine, code=1)
    nii.set_sform(nii.affine, code=1)
    with atomic_path(out / "synthetic/ct_volume.nii.gz") as tmp:
        nib.save(nii, str(tmp))
    volume = load_image(out / "synthetic/ct_volume.nii.gz")
    assert np.array_equal(volume.array, hu3.astype(np.int16)), "NIfTI volume does not reload in LPS order"
    save_mask_like(organs3["liver"], volume, out / "synthetic/ct_volume_liver.nii.gz")
    k = int(np.argmax(organs3["liver"].sum(axis=(1, 2))))
    case("ct_volume_liver", "synthetic/ct_volume.nii.gz", "CT", "Segment the liver on this slice.",
         [("liver", "synthetic/ct_volume_liver.nii.gz")], slice=k)
    case("ct_volume_gallstone_absent", "synthetic/ct_volume.nii.gz", "CT", "Segment the gallstone.",
         [("gallstone", None)], slice=k)

    # Synthetic CT as a DICOM series folder; mask as NIfTI in the series geometry
    series_hu, series_organs = ct_volume(rng, (20, 128, 128))
    series_dir = out / "synthetic/ct_series"
    if series_dir.exists():
        shutil.rmtree(series_dir)
    write_ct_series(series_hu, series_dir, (3.0, 0.7, 0.7))
    series = load_image(series_dir)
    assert np.array_equal(series.array, np.clip(np.round(series_hu + 1024), 0, 4095) - 1024), "series reorder"
    save_mask_like(series_organs["spleen"], series, out / "synthetic/ct_series_spleen.nii.gz")
    k = int(np.argmax(series_organs["spleen"].sum(axis=(1, 2))))
    case("ct_series_spleen", "synthetic/ct_series", "CT", "Segment the spleen.",
         [("spleen", "synthetic/ct_series_spleen.nii.gz")], slice=k)

    # Real images shipped inside installed packages; masks are algorithmic references
    ct_src = Path(get_testdata_file("CT_small.dcm"))
    copy_file(ct_src, out / "real/ct_small.dcm")
    ct_img = load_image(out / "real/ct_small.dcm")
    case("real_ct_vertebra", "real/ct_small.dcm", "CT", "Segment the vertebra.",
         [("vertebra", mask_png(real_vertebra_mask(ct_img.array), "real/ct_small_vertebra.png"))])
    mr_src = Path(get_testdata_file("MR_small.dcm"))
    copy_file(mr_src, out / "real/mr_small.dcm")
    mr_img = load_image(out / "real/mr_small.dcm")
    case("real_mr_dark_structure", "real/mr_small.dcm", "MR",
         "Segment the round dark structure enclosed by the bright ring.",
         [("dark round structure", mask_png(real_mr_small_mask(mr_img.array), "real/mr_small_structure.png"))])
    anat_src = Path(nib.__file__).parent / "tests/data/anatomical.nii"
    copy_file(anat_src, out / "real/anatomical.nii")
    anat = load_image(out / "real/anatomical.nii")
    ventricles = real_ventricle_mask(anat.array)
    save_mask_like(ventricles, anat, out / "real/anatomical_ventricles.nii.gz")
    k = int(np.argmax(ventricles.sum(axis=(1, 2))))
    case("real_brain_ventricles", "real/anatomical.nii", "MR", "Segment the lateral ventricles.",
         [("lateral ventricles", "real/anatomical_ventricles.nii.gz")], slice=k)
    retina_src = Path(skimage.data.__file__).parent / "retina.jpg"
    copy_file(retina_src, out / "real/retina.jpg")
    retina = load_image(out / "real/retina.jpg")
    case("real_retina_vessels", "real/retina.jpg", "fundus", "Segment the retinal vessels.",
         [("retinal vessels", mask_png(real_retina_vessels(retina.array), "real/retina_vessels.png"))])
    return rows


#: The MONAI Label studies folder of the README's server command: links to images only (never to masks).
STUDIES = {
    "ct_abdomen.png": "../synthetic/ct_abdomen.png",
    "mr_brain.png": "../synthetic/mr_brain.png",
    "fundus.png": "../synthetic/fundus.png",
    "us_lesion.png": "../synthetic/us_lesion.png",
    "ct_volume.nii.gz": "../synthetic/ct_volume.nii.gz",
    "brain_t1.nii": "../real/anatomical.nii",
}


def write_studies(out: Path) -> None:
    """``out/studies/``: relative symbolic links to the images, so the folder costs no space and stays in sync."""
    studies = out / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    for name, target in STUDIES.items():
        link = studies / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    rows = build(args.out)
    text = "".join(json.dumps(row, sort_keys=False) + "\n" for row in rows)
    atomic_write_text(args.out / "manifest.jsonl", text)
    write_studies(args.out)
    print(f"wrote {len(rows)} cases to {args.out / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
