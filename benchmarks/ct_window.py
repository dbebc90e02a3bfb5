"""What the CT window changes: one click on a hypodense lesion, and expert clicks on the shipped sample volume.

Run: ``PYTHONPATH=lib .venv/bin/python benchmarks/ct_window.py``

* **field case** (``tests/data/ct_window_nifti``: the same CT in HU as NIfTI and as a DICOM series): one click at the
  lesion centre with the ``embedded`` tool on slice 2, the NIfTI shown with the percentile stretch (what NIfTI got
  before the automatic rule) and with the CT window (now), against the DICOM copy; the liver - lesion grey-level
  contrast of each picture.
* **shipped sample** (``sample_data/studies/ct_volume.nii.gz``, the app's demo study, liver truth
  ``sample_data/synthetic/ct_volume_liver.nii.gz``): the simulated expert (``ibisagent.clicks.simulate``, stop at IoU
  0.90, 20 clicks) on every liver slice, percentile stretch vs CT window.

Prints a Markdown table. No downloads; the embedded tool is deterministic, so the figures are exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ibisagent.clicks import Click, number_of_clicks, simulate
from ibisagent.imaging import load_image, load_mask, slice_of, to_display_rgb
from ibisagent.metrics import iou
from ibisagent.tools import load_tool

ROOT = Path(__file__).resolve().parents[1]
FIELD = ROOT / "tests" / "data" / "ct_window_nifti"


def field_case() -> list[tuple[str, float, float]]:
    tool = load_tool("embedded")
    lesion = np.load(FIELD / "lesion_gt.npy")
    ring = np.zeros_like(lesion)
    ring[30:60, 22:52] = True
    ring &= ~lesion
    rows = []
    for label, path, modality in (("NIfTI, percentile stretch (before)", FIELD / "nifti" / "ct.nii.gz", "MR"),
                                  ("NIfTI, CT window (automatic rule)", FIELD / "nifti" / "ct.nii.gz", None),
                                  ("DICOM series, CT window", FIELD / "dicom", None)):
        image = load_image(path, modality=modality)
        rgb = to_display_rgb(slice_of(image, 2), image.modality)
        mask = tool.encode(rgb).predict([Click(x=36, y=44, positive=True)]).mask
        grey = rgb[..., 0].astype(float)
        rows.append((label, float(grey[ring].mean() - grey[lesion].mean()), iou(mask, lesion)))
    return rows


def sample_volume() -> list[tuple[str, float, float, float]]:
    tool = load_tool("embedded")
    image = load_image(ROOT / "sample_data" / "studies" / "ct_volume.nii.gz")
    liver = load_mask(ROOT / "sample_data" / "synthetic" / "ct_volume_liver.nii.gz", image)
    slices = [k for k in range(liver.shape[0]) if liver[k].sum() > 50]
    rows = []
    for label, modality in (("percentile stretch (before)", "MR"), ("CT window W400/L40 (now)", image.modality)):
        first, final, noc = [], [], []
        for k in slices:
            steps, _ = simulate(tool.encode(to_display_rgb(slice_of(image, k), modality)), liver[k],
                                iou_stop=0.9, max_clicks=20)
            ious = [s.iou for s in steps]
            first.append(ious[0])
            final.append(ious[-1])
            noc.append(number_of_clicks(ious, 0.9) or 20)
        rows.append((f"{label}, {len(slices)} slices", float(np.mean(first)), float(np.mean(final)),
                     float(np.mean(noc))))
    return rows


def main() -> None:
    print("| field case picture | liver - lesion grey levels | IoU after one click |\n|---|---|---|")
    for label, contrast, score in field_case():
        print(f"| {label} | {contrast:.1f} | {score:.3f} |")
    print("\n| sample ct_volume liver | IoU after 1 click | final IoU | NoC@90 |\n|---|---|---|---|")
    for label, first, final, noc in sample_volume():
        print(f"| {label} | {first:.3f} | {final:.3f} | {noc:.2f} |")


if __name__ == "__main__":
    main()
