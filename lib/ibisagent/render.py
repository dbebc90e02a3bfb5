"""Figures: trajectory strips and evaluation plots.

The overlay the policy sees lives in :mod:`ibisagent.observation` (no matplotlib there). Figures are written with matplotlib's Agg backend (no display
needed) through :func:`ibisagent.fileio.atomic_path`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ibisagent.data.trajectory import TrajectoryRecord, rle_decode  # noqa: E402
from ibisagent.fileio import atomic_path  # noqa: E402
from ibisagent.observation import OVERLAY_ALPHA, TARGET_COLOURS, overlay  # noqa: E402,F401 - re-exported

if TYPE_CHECKING:
    from ibisagent.evaluate import CaseResult

POSITIVE_COLOUR = "#00d000"
NEGATIVE_COLOUR = "#ff2020"
STRIP_COLUMNS = 6


def render_trajectory(rgb: np.ndarray, record: TrajectoryRecord, path: str | os.PathLike[str],
                      target: np.ndarray | None = None) -> None:
    """Draw a trajectory strip: the image, then the mask after each step with every click so far as stars
    (green positive, red negative) and the step's IoU; the ground truth as a contour when given."""
    panels = 1 + len(record.steps)
    cols = min(STRIP_COLUMNS, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("image", fontsize=9)
    if target is not None and target.any():
        axes[0, 0].contour(target, levels=[0.5], colors="yellow", linewidths=0.8)
    xs: list[int] = []
    ys: list[int] = []
    colours: list[str] = []
    for index, step in enumerate(record.steps, start=1):
        ax = axes.ravel()[index]
        ax.imshow(overlay(rgb, [rle_decode(step.mask)]))
        for click in step.clicks:
            xs.append(click.px)
            ys.append(click.py)
            colours.append(POSITIVE_COLOUR if click.positive else NEGATIVE_COLOUR)
        ax.scatter(xs, ys, marker="*", s=90, c=colours, edgecolors="white", linewidths=0.6)
        label = f"step {index}" + (f"  IoU {step.iou:.3f}" if step.iou is not None else "")
        ax.set_title(label, fontsize=9)
    final = f"final IoU {record.final_iou:.3f}" if record.final_iou is not None else ""
    fig.suptitle(f"{record.id} · {record.target} · {record.tool} · {final} · {record.stop_reason}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_eval(results: Sequence[CaseResult], out_dir: str | os.PathLike[str], budget: int) -> None:
    """Write ``iou_per_click.png`` (mean IoU after k clicks, final IoU carried forward) and ``iou_per_case.png``."""
    ok = [r for r in results if r.scored]
    curves = []
    for r in ok:
        for t in r.targets:
            start = t.iou if not t.ious else 0.0
            curve = [start] + t.ious
            curve += [curve[-1]] * (budget + 1 - len(curve))
            curves.append(curve[: budget + 1])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if curves:
        ax.plot(range(budget + 1), np.mean(curves, axis=0), marker="o", markersize=3)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title("IoU per click")
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "iou_per_click.png"))

    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(ok)), 3.5))
    ax.bar(range(len(ok)), [float(r.iou) for r in ok], color="#4a90d9")  # type: ignore[arg-type]
    ax.set_xticks(range(len(ok)), [r.id for r in ok], rotation=70, fontsize=7)
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.set_title("final IoU per case")
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "iou_per_case.png"))


def _save(fig: plt.Figure, path: str | os.PathLike[str]) -> None:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
