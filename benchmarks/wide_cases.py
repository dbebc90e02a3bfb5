"""The wider comparison set for the ``embedded`` tool: real MR/CT from installed packages and organ-like phantoms
with internal structure (targets made of several intensity classes).

Real images (nothing downloaded; labels from thresholds + morphology + connected components, on the display grey
level smoothed with a Gaussian of sigma 1 px):

* pydicom-data ``MR-SIEMENS-DICOM-WithOverlays.dcm`` (abdominal T1 MR, 484², resized to 256²): the body
  (half the Otsu threshold, closed with a 5 px disk, holes filled, largest component), the two largest bright
  structures (kidneys, spleen: above the 94th percentile inside the body, opened 1 px, area ≥ 0.3 % of the image, closed with a 3 px disk and hole-filled, so the darker medulla inside belongs to
  a kidney), and an absent target;
* pydicom-data ``eCT_Supplemental.dcm`` (brain CT, first frame, 512² resized to 256²): the head (Otsu, holes
  filled) and the brain inside the skull (the largest component below the skull threshold — the 99th percentile
  — inside the eroded head, holes filled, so the dark sulci and ventricles inside belong to it);
* real T1 MRI brain slices (:mod:`brain_mri`): white matter, grey matter, whole brain, absent.

Phantoms (``organ_phantom``, Rician noise, bias field, blur): a kidney (bright cortex rim, dark medulla pyramids
and a sinus inside; target = the whole kidney), a tumour (enhancing rim, necrotic core; target = the whole tumour),
an organ with vessels (dark and bright vessels crossing an organ; target = the organ with its vessels), each next
to organs of similar grey.
"""

from __future__ import annotations

import os

import numpy as np
import pydicom
from scipy import ndimage
from skimage import filters, measure, morphology, transform

try:
    from brain_mri import brain_cases
    from embedded_candidates import Case, to_display
except ImportError:  # pragma: no cover
    from benchmarks.brain_mri import brain_cases
    from benchmarks.embedded_candidates import Case, to_display


def _pydicom_data(name: str) -> str | None:
    """Path of a pydicom-data file (dev dependency), or None when it is not installed."""
    try:
        import data_store  # noqa: F401  (pydicom-data's package)
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(data_store.__file__), "data", name)
    return path if os.path.exists(path) else None


def _fill_largest(mask: np.ndarray) -> np.ndarray:
    lab = measure.label(mask)
    if lab.max() == 0:
        return mask
    return ndimage.binary_fill_holes(lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1))


def _resized(a: np.ndarray, size: int) -> np.ndarray:
    return transform.resize(a.astype(np.float64), (size, size), order=1, mode="edge", anti_aliasing=True)


def pydicom_data_cases(size: int = 256) -> list[Case]:
    cases: list[Case] = []
    path = _pydicom_data("MR-SIEMENS-DICOM-WithOverlays.dcm")
    if path:
        img = to_display(_resized(pydicom.dcmread(path).pixel_array, size))
        g = ndimage.gaussian_filter(img[:, :, 0].astype(np.float64), 1.0)
        body = _fill_largest(ndimage.binary_closing(np.pad(g > 0.5 * filters.threshold_otsu(g), 5),
                                                    morphology.disk(5))[5:-5, 5:-5])
        cases.append(Case("mr_abdomen/body", img, body))
        bright = ndimage.binary_opening((g > np.percentile(g[body], 94)) & body, iterations=1)
        lab = measure.label(bright)
        comps = [lab == i for i in range(1, lab.max() + 1) if (lab == i).sum() >= 0.003 * g.size]
        comps.sort(key=lambda c: -int(c.sum()))
        for i, comp in enumerate(comps[:2]):
            kidney = ndimage.binary_fill_holes(ndimage.binary_closing(np.pad(comp, 3), morphology.disk(3))[3:-3, 3:-3])
            cases.append(Case(f"mr_abdomen/organ{i}", img, kidney))
        cases.append(Case("mr_abdomen/absent", img, np.zeros(g.shape, bool)))
    path = _pydicom_data("eCT_Supplemental.dcm")
    if path:
        arr = pydicom.dcmread(path).pixel_array
        img = to_display(_resized(arr[0] if arr.ndim == 3 else arr, size))
        g = ndimage.gaussian_filter(img[:, :, 0].astype(np.float64), 1.0)
        head = _fill_largest(g > filters.threshold_otsu(g))
        cases.append(Case("ct_head/head", img, head))
        inner = ndimage.binary_erosion(head, iterations=3) & (g < np.percentile(g[head], 99))
        brain = _fill_largest(ndimage.binary_opening(inner, iterations=2))
        cases.append(Case("ct_head/brain", img, brain))
    return cases


def _ellipse(shape, cy, cx, ry, rx, angle=0.0):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1


def organ_phantom(rng: np.random.Generator, kind: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An organ-like phantom with internal structure; returns ``(image (size, size, 3) uint8, target bool)``."""
    shape = (size, size)
    s = size / 256.0
    img = np.full(shape, 0.05)
    body = _ellipse(shape, size / 2, size / 2, 0.45 * size, 0.47 * size)
    img[body] = 0.35
    # Neighbours of similar grey.
    for _ in range(3):
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        img[_ellipse(shape, cy, cx, rng.uniform(12, 25) * s, rng.uniform(12, 25) * s)] = rng.choice([0.55, 0.75, 0.2])
    cy, cx = size / 2 + rng.uniform(-20, 20) * s, size / 2 + rng.uniform(-20, 20) * s
    if kind == "kidney":
        outer = _ellipse(shape, cy, cx, 45 * s, 28 * s, rng.uniform(0, np.pi))
        inner = ndimage.binary_erosion(outer, iterations=int(7 * s))
        img[outer] = 0.8  # cortex
        for k in range(5):  # medulla pyramids
            a = 2 * np.pi * k / 5
            img[_ellipse(shape, cy + 20 * s * np.sin(a), cx + 12 * s * np.cos(a), 7 * s, 5 * s, a) & inner] = 0.45
        img[_ellipse(shape, cy, cx, 10 * s, 6 * s) & inner] = 0.15  # sinus fat / pelvis
        target = outer
    elif kind == "tumour":
        target = _ellipse(shape, cy, cx, 34 * s, 30 * s, rng.uniform(0, np.pi))
        core = ndimage.binary_erosion(target, iterations=int(8 * s))
        img[target] = 0.85  # enhancing rim
        img[core] = 0.18  # necrotic core
        img[core & _ellipse(shape, cy + 5 * s, cx - 4 * s, 8 * s, 6 * s)] = 0.5  # residual tissue
        target = target.copy()
    else:  # organ with vessels
        target = _ellipse(shape, cy, cx, 55 * s, 42 * s, rng.uniform(0, np.pi))
        img[target] = 0.6
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        for k, value in enumerate((0.15, 0.95, 0.15)):
            a = rng.uniform(0, np.pi)
            d = np.abs((yy - cy) * np.cos(a) - (xx - cx) * np.sin(a) + rng.uniform(-15, 15) * s)
            img[(d <= (2 + k) * s) & target] = value
    bias = 1.0 + 0.15 * _ellipse(shape, size / 3, size / 3, size, size) * np.sin(
        np.mgrid[0:size, 0:size][0] / (60 * s))
    img = ndimage.gaussian_filter(img * bias, 0.8 * s)
    noise = rng.uniform(0.02, 0.04)
    img = np.sqrt((img + rng.normal(0, noise, shape)) ** 2 + rng.normal(0, noise, shape) ** 2)
    return to_display(img), target


def phantom_cases(size: int = 256, per_kind: int = 2, seed: int = 4321) -> list[Case]:
    rng = np.random.default_rng(seed + size)
    return [Case(f"organ{size}/{kind}{i}", *organ_phantom(rng, kind, size))
            for kind in ("kidney", "tumour", "vessels") for i in range(per_kind)]


def wide_cases(size: int = 256) -> list[Case]:
    """Real MR/CT (pydicom-data), real T1 brain slices (dipy, nibabel) and organ-like phantoms."""
    return pydicom_data_cases(size) + brain_cases(size) + phantom_cases(size)


def kind_of(name: str) -> str:
    """The kind a case counts under in per-kind reports: the target part of the name without its digits, with the
    brain tissue classes and absent targets each their own kind."""
    target = name.split("/")[-1].rstrip("0123456789")
    source = name.split("/")[0].rstrip("0123456789")
    if target == "absent" or (source.startswith(("dipy", "anat_")) and target in ("wm", "gm", "brain")):
        return {"wm": "brain MRI: white matter", "gm": "brain MRI: grey matter", "brain": "brain MRI: whole brain",
                "absent": "absent target"}[target]
    return f"{source}/{target}"
