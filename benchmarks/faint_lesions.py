"""Faint lesions in a noisy organ: does a click on a lesion a few grey levels darker than its organ stay local?

Held-out check for the ``embedded`` tool's weak-contrast path (never used for tuning): 12 synthetic 256 px CT-like
slices (body 120, organ 145, background 60 grey levels; Gaussian noise sd 2.5 then blur sigma 0.6), one disk lesion
per slice, darker than the organ by 2.5 / 3.5 / 5 / 8 grey levels, radius 7 / 12 / 18 px. Oracle loop as
``ibisagent eval`` (rule "peak", stop at IoU 0.90), 10 clicks at most.

Run: ``PYTHONPATH=lib .venv/bin/python benchmarks/faint_lesions.py [--baseline OLD_embedded.py]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from ibisagent.clicks import simulate
from ibisagent.tools.embedded import EmbeddedTool
from scipy import ndimage

try:
    from embedded_candidates import embedded_from_file
except ImportError:  # pragma: no cover
    from benchmarks.embedded_candidates import embedded_from_file

CONTRASTS = (2.5, 3.5, 5.0, 8.0)
RADII = (7, 12, 18)
SIZE = 256
SEED = 1


def faint_cases(seed: int = SEED) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, (256, 256, 3) uint8 grey image, (256, 256) bool lesion) for every contrast x radius."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cases = []
    for contrast in CONTRASTS:
        for r in RADII:
            img = np.full((SIZE, SIZE), 60.0)
            img[((yy - 128) / 110) ** 2 + ((xx - 128) / 120) ** 2 < 1] = 120
            img[((yy - 110) / 60) ** 2 + ((xx - 100) / 70) ** 2 < 1] = 145
            cy, cx = 110 + rng.integers(-15, 15), 100 + rng.integers(-20, 20)
            lesion = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[lesion] -= contrast
            img = ndimage.gaussian_filter(img + rng.normal(0, 2.5, img.shape), 0.6)
            grey = np.clip(img, 0, 255).astype(np.uint8)
            cases.append((f"contrast {contrast} r {r}", np.repeat(grey[..., None], 3, axis=2), lesion))
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another embedded.py to run side by side")
    args = parser.parse_args(argv)
    tools = {"embedded": EmbeddedTool}
    if args.baseline:
        tools["embedded (before)"] = embedded_from_file(args.baseline)
    cases = faint_cases()
    print("| case | " + " | ".join(f"{n}: IoU / clicks" for n in tools) + " |")
    print("|---|" + "---|" * len(tools))
    totals = {n: [] for n in tools}
    for name, image, lesion in cases:
        row = []
        for n, tool in tools.items():
            steps, _ = simulate(tool().encode(image), lesion, max_clicks=10)
            totals[n].append((steps[-1].iou, len(steps)))
            row.append(f"{steps[-1].iou:.3f} / {len(steps)}")
        print(f"| {name} | " + " | ".join(row) + " |")
    means = [f"**{np.mean([t[0] for t in v]):.3f} / {np.mean([t[1] for t in v]):.2f}**" for v in totals.values()]
    print("| **mean** | " + " | ".join(means) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
