"""Real T1 MRI brain cases for tuning and comparing the ``embedded`` tool: white matter, grey matter, whole brain.

The MNI152 template is reserved for held-out evaluation and is not used here. Sources (installed packages only,
nothing downloaded):

* dipy's ``t1_coronal_slice.npy`` (``dipy/data/files``; a 256² skull-stripped T1 coronal slice, dev dependency);
* nibabel's ``tests/data/anatomical.nii`` (a 33×41×25 T1 crop of a brain): one axial, one coronal, one sagittal
  slice, upsampled to 256² (cubic).

Each slice is windowed like ``ibisagent eval`` shows it (0.5–99.5 percentiles to uint8). Reference labels from
thresholds + morphology + connected components on the display grey level smoothed with a Gaussian of sigma 1 px:

* whole brain (skull-stripped slices only): grey > 8 % of the brain's 99th percentile, closed with a 3 px disk,
  holes filled, largest component — so the sulci and ventricles inside belong to it (one label over several
  intensity classes);
* the three tissue classes from a 3-class multi-Otsu (``skimage.filters.threshold_multiotsu``) of the smoothed
  grey inside the brain: white matter = above the upper threshold, grey matter = between the two; each opened
  with a 1 px disk, components under 0.1 % of the image dropped;
* one absent target per source image (empty reference).

Variants of the dipy slice (rotated 90°, flipped, zoomed 1.5× and cropped, contrast gamma 0.7 / 1.4) widen the
set without new anatomy; they are marked in the case name.
"""

from __future__ import annotations

import os

import nibabel
import numpy as np
from scipy import ndimage
from skimage import filters, measure, morphology, transform

try:  # the benchmark is run as a script from benchmarks/ or imported from it
    from embedded_candidates import Case, to_display
except ImportError:  # pragma: no cover
    from benchmarks.embedded_candidates import Case, to_display

MIN_COMPONENT_FRACTION = 0.001
BRAIN_FRACTION = 0.08


def _dipy_t1() -> np.ndarray | None:
    try:
        import dipy
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(dipy.__file__), "data", "files", "t1_coronal_slice.npy")
    return np.load(path).astype(np.float64) if os.path.exists(path) else None


def _clean(mask: np.ndarray) -> np.ndarray:
    mask = ndimage.binary_opening(mask, morphology.disk(1))
    lab, _ = ndimage.label(mask)
    sizes = np.bincount(lab.ravel())
    keep = sizes >= max(int(MIN_COMPONENT_FRACTION * mask.size), 1)
    keep[0] = False
    return keep[lab]


def tissue_labels(grey: np.ndarray, brain: np.ndarray | None) -> dict[str, np.ndarray]:
    """White/grey matter (and the whole brain when ``brain`` is given) from a display grey image (H, W) uint8."""
    g = ndimage.gaussian_filter(grey.astype(np.float64), 1.0)
    inside = brain if brain is not None else np.ones(g.shape, bool)
    t_low, t_high = filters.threshold_multiotsu(g[inside], classes=3)
    out = {"wm": _clean((g > t_high) & inside), "gm": _clean((g > t_low) & (g <= t_high) & inside)}
    if brain is not None:
        out["brain"] = brain
    return out


def brain_mask(grey: np.ndarray) -> np.ndarray:
    g = ndimage.gaussian_filter(grey.astype(np.float64), 1.0)
    mask = g > BRAIN_FRACTION * np.percentile(g, 99)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(np.pad(mask, 3), morphology.disk(3))[3:-3, 3:-3])
    lab = measure.label(mask)
    if lab.max() == 0:
        return mask
    return lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def _cases_from(name: str, intensity: np.ndarray, skull_stripped: bool) -> list[Case]:
    img = to_display(intensity)
    grey = img[:, :, 0]
    brain = brain_mask(grey) if skull_stripped else None
    labels = tissue_labels(grey, brain)
    cases = [Case(f"{name}/{k}", img, v) for k, v in labels.items() if v.any()]
    cases.append(Case(f"{name}/absent", img, np.zeros(grey.shape, bool)))
    return cases


def brain_cases(size: int = 256) -> list[Case]:
    """WM / GM / whole-brain / absent cases from real T1 slices (see the module docstring)."""
    cases: list[Case] = []
    t1 = _dipy_t1()
    if t1 is not None:
        t1 = transform.resize(t1, (size, size), order=3, mode="edge", anti_aliasing=False)
        h = t1.shape[0]
        zoom = transform.resize(t1[h // 6 : 5 * h // 6, h // 6 : 5 * h // 6], (size, size), order=3, mode="edge")
        variants = {
            "dipy_cor": t1,
            "dipy_rot90": np.rot90(t1).copy(),
            "dipy_zoom": zoom,
            "dipy_gamma07": np.clip(t1, 0, None) ** 0.7,
            "dipy_gamma14": np.fliplr(np.clip(t1, 0, None) ** 1.4).copy(),
        }
        for name, im in variants.items():
            cases += _cases_from(name, im, skull_stripped=True)
    vol = nibabel.load(os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii"))
    data = np.asarray(vol.get_fdata(), dtype=np.float64)
    slices = {
        "anat_ax": data[:, :, data.shape[2] // 2].T[::-1],
        "anat_cor": data[:, data.shape[1] // 2, :].T[::-1],
        "anat_sag": data[data.shape[0] // 2, :, :].T[::-1],
    }
    for name, sl in slices.items():
        cases += _cases_from(name, transform.resize(sl, (size, size), order=3, mode="edge"), skull_stripped=False)
    return cases
