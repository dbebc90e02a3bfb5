"""A real-MRI train/test manifest pair for tuning the training recipe (``ibisagent train tiny``).

Writes ``OUT/train.jsonl``, ``OUT/test.jsonl`` and both together in ``OUT/all.jsonl`` (PNG images and masks under
``OUT/images``): slices of the real
MR volumes that ship inside installed packages, with whole brain, white matter, grey matter and absent-target cases.
The MNI152 template is reserved for held-out evaluation and is not used. Sources:

* dipy ``data/files``: ``S0_10slices.nii.gz`` (b0 EPI, 10 axial slices), ``aniso_vox.nii.gz`` (b0, 24 axial) and
  ``t1_coronal_slice.npy`` (one skull-stripped T1 slice);
* nibabel ``tests/data``: ``example4d.nii.gz`` (EPI, 24 axial) and ``anatomical.nii`` (a T1 crop: axial, coronal and
  sagittal slices).

Labels (documented in :mod:`brain_mri`): the whole brain by threshold + closing + hole filling + largest component;
the tissue classes by a 3-class multi-Otsu inside the brain: on the T1 slices white matter is the brightest class and
grey matter the middle one; on the T2-like EPI/b0 slices (tissue contrast too low for white/grey matter) the brightest
class is the cerebrospinal fluid (ventricles and sulci). Every slice also gets one absent target
(a name cycled from :data:`ABSENT`, empty mask), and every second T1 slice a two-target request ("Segment the white
matter and the grey matter.", the multi-target format of the action grammar). The test manifest holds every third slice of each volume, so its
images never appear in training — though their neighbours do (adjacent slices of one volume look alike: a test of
generalisation across slices, not across patients). Slices are resized to ``SIZE`` × ``SIZE`` (non-square slices are
stretched).

Run: ``PYTHONPATH=lib:benchmarks .venv/bin/python benchmarks/mri_policy_set.py OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import nibabel
import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import filters, transform

from brain_mri import _clean, _dipy_t1, brain_mask
from embedded_candidates import to_display

SIZE = 224
#: Absent-target names: findings these healthy brains do not show. Not organ names from other body regions: a policy
#: trained beside the sample data (which has a present "liver lesion") learnt "liver" → absent from them.
ABSENT = ("brain tumour", "haemorrhage", "metastasis", "infarct")


def _package_file(package: str, *parts: str) -> str:
    module = __import__(package)
    return os.path.join(os.path.dirname(module.__file__), *parts)


def _volumes() -> dict[str, tuple[np.ndarray, str]]:
    """name → (H, W, Z) intensity volume, contrast ("T1" or "T2")."""
    out = {}
    for name, package, parts, contrast in (
        ("s0", "dipy", ("data", "files", "S0_10slices.nii.gz"), "T2"),
        ("aniso", "dipy", ("data", "files", "aniso_vox.nii.gz"), "T2"),
        ("epi", "nibabel", ("tests", "data", "example4d.nii.gz"), "T2"),
    ):
        data = np.asarray(nibabel.load(_package_file(package, *parts)).get_fdata(), dtype=np.float64)
        if data.ndim == 4:
            data = data[..., 0]
        out[name] = (np.stack([data[:, :, z].T[::-1] for z in range(data.shape[2])], axis=-1), contrast)
    anat = np.asarray(nibabel.load(_package_file("nibabel", "tests", "data", "anatomical.nii")).get_fdata())
    out["anat_ax"] = (np.stack([anat[:, :, z].T[::-1] for z in range(anat.shape[2])], -1), "T1")
    out["anat_cor"] = (np.stack([anat[:, y, :].T[::-1] for y in range(anat.shape[1])], -1), "T1")
    out["anat_sag"] = (np.stack([anat[x, :, :].T[::-1] for x in range(anat.shape[0])], -1), "T1")
    return out


def slice_labels(grey: np.ndarray, contrast: str, skull_stripped: bool) -> dict[str, np.ndarray]:
    """brain / white matter / grey matter / cerebrospinal fluid masks of a display grey slice (H, W) uint8."""
    g = ndimage.gaussian_filter(grey.astype(np.float64), 1.0)
    brain = brain_mask(grey) if skull_stripped else np.ones(grey.shape, bool)
    if brain.sum() < 0.03 * brain.size:
        return {}
    t_low, t_high = filters.threshold_multiotsu(g[brain], classes=3)
    if contrast == "T1":
        labels = {"white matter": _clean((g > t_high) & brain),
                  "grey matter": _clean((g > t_low) & (g <= t_high) & brain)}
    else:
        labels = {"cerebrospinal fluid": _clean((g > t_high) & brain)}
    if skull_stripped:
        labels["brain"] = brain
    return {k: v for k, v in labels.items() if v.sum() >= 0.005 * v.size}


def write_set(out: Path, size: int = SIZE) -> tuple[int, int]:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"train": [], "test": []}
    slices: list[tuple[str, np.ndarray, str, bool, int]] = []  # name, slice, contrast, skull-stripped, index in volume
    for name, (volume, contrast) in _volumes().items():
        z0, z1 = int(0.15 * volume.shape[2]), int(np.ceil(0.9 * volume.shape[2]))
        for k, z in enumerate(range(z0, max(z1, z0 + 1))):
            slices.append((f"{name}_{z:02d}", volume[:, :, z], contrast, not name.startswith("anat"), k))
    t1 = _dipy_t1()
    if t1 is not None:  # one slice and its mirror image: one volume, both on the training side
        slices += [("dipy_cor", t1, "T1", True, 0), ("dipy_cor_flip", np.fliplr(t1).copy(), "T1", True, 1)]
    absent_i = 0
    for name, intensity, contrast, stripped, k in slices:
        if np.ptp(intensity) <= 0:
            continue
        rgb = to_display(transform.resize(intensity, (size, size), order=3, mode="edge"))
        labels = slice_labels(rgb[:, :, 0], contrast, stripped)
        if not labels:
            continue
        split = "test" if k % 3 == 2 else "train"
        Image.fromarray(rgb[:, :, 0]).save(images / f"{name}.png")
        for target, mask in labels.items():
            mask_file = f"{name}_{target.replace(' ', '_')}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(images / mask_file)
            lines[split].append(json.dumps({
                "id": f"{name}.{target.replace(' ', '_')}", "image": f"images/{name}.png", "modality": "MRI",
                "instruction": f"Segment the {target}.", "targets": [{"name": target, "mask": f"images/{mask_file}"}]}))
        if k % 2 == 0 and {"white matter", "grey matter"} <= set(labels):  # the multi-target request format
            pair = ("white matter", "grey matter")
            lines[split].append(json.dumps({
                "id": f"{name}.white_and_grey_matter", "image": f"images/{name}.png", "modality": "MRI",
                "instruction": "Segment the white matter and the grey matter.",
                "targets": [{"name": t, "mask": f"images/{name}_{t.replace(' ', '_')}.png"} for t in pair]}))
        absent = ABSENT[absent_i % len(ABSENT)]
        absent_i += 1
        lines[split].append(json.dumps({
            "id": f"{name}.absent", "image": f"images/{name}.png", "modality": "MRI",
            "instruction": f"Segment the {absent}.", "targets": [{"name": absent, "mask": None}]}))
    for split, rows in lines.items():
        (out / f"{split}.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    (out / "all.jsonl").write_text("".join(r + "\n" for r in lines["train"] + lines["test"]), encoding="utf-8")
    return len(lines["train"]), len(lines["test"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=SIZE)
    args = parser.parse_args()
    n_train, n_test = write_set(args.out, args.size)
    print(f"{args.out}: {n_train} training cases, {n_test} test cases")


if __name__ == "__main__":
    main()
