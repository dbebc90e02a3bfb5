"""Click simulator: where an expert annotator would click next, and the number-of-clicks metric (NoC).

The rule is the paper's (and RITM's): compute the false-negative region (target pixels the mask misses) and the
false-positive region (mask pixels outside the target); take the Euclidean distance transform of each, with the
image border counted as boundary; click at the deepest point of whichever region has the larger peak — a
*positive* click for a false negative, a *negative* click for a false positive. The alternative rule
``"area"`` picks the region with the larger pixel count instead of the larger peak.

Coordinates are pixels, named ``x`` (column) and ``y`` (row) everywhere; arrays are indexed ``mask[y, x]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

ErrorRule = Literal["peak", "area"]


@dataclass(frozen=True)
class Click:
    """One click in pixel coordinates: ``x`` is the column, ``y`` the row; ``positive`` marks the target."""

    x: int
    y: int
    positive: bool

    def __post_init__(self) -> None:
        if self.x < 0 or self.y < 0:
            raise ValueError(f"click coordinates must be non-negative pixels, got (x={self.x}, y={self.y})")


def error_regions(target: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-negative and false-positive regions.

    Args:
        target: (H, W) bool, the ground-truth mask.
        prediction: (H, W) bool, the current mask.

    Returns:
        ``(fn, fp)``: (H, W) bool each; ``fn = target & ~prediction``, ``fp = prediction & ~target``.
    """
    target = _as_bool_mask(target, "target")
    prediction = _as_bool_mask(prediction, "prediction")
    if target.shape != prediction.shape:
        raise ValueError(f"target shape {target.shape} != prediction shape {prediction.shape}")
    return target & ~prediction, prediction & ~target


def padded_distance(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each region pixel to the nearest non-region pixel, the image border counting as one.

    Args:
        region: (H, W) bool.

    Returns:
        (H, W) float64 distances in pixels; 0 outside the region.
    """
    padded = np.pad(region, 1, mode="constant", constant_values=False)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1]


def next_click(
    target: np.ndarray,
    prediction: np.ndarray,
    previous: Iterable[Click] = (),
    rule: ErrorRule = "peak",
) -> Click | None:
    """The next simulated expert click, or ``None`` when the mask has no error left that a new click could fix.

    Args:
        target: (H, W) bool ground truth.
        prediction: (H, W) bool current mask.
        previous: clicks already placed; the same pixel is never clicked twice.
        rule: ``"peak"`` (the paper's: region whose distance-transform peak is larger) or ``"area"`` (larger region).

    Returns:
        A :class:`Click` at the deepest pixel of the chosen error region; positive for false negatives.
    """
    if rule not in ("peak", "area"):
        raise ValueError(f"unknown click rule {rule!r}; expected 'peak' or 'area'")
    fn, fp = error_regions(target, prediction)
    taken = np.zeros(fn.shape, dtype=bool)
    for click in previous:
        if click.y < taken.shape[0] and click.x < taken.shape[1]:
            taken[click.y, click.x] = True
    candidates = []
    for region, positive in ((fn, True), (fp, False)):
        if not region.any():
            continue
        dist = padded_distance(region)
        dist[taken] = 0.0
        if dist.max() <= 0:
            continue
        score = float(dist.max()) if rule == "peak" else float(region.sum())
        candidates.append((score, positive, dist))
    if not candidates:
        return None
    _, positive, dist = max(candidates, key=lambda c: c[0])
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return Click(x=int(x), y=int(y), positive=positive)


def number_of_clicks(ious: Sequence[float], threshold: float) -> int | None:
    """NoC@threshold: clicks needed until the IoU first reaches ``threshold``.

    Args:
        ious: IoU after click 1, 2, …, in order.
        threshold: e.g. 0.85 or 0.90.

    Returns:
        The 1-based click count, or ``None`` if the threshold was never reached (callers usually count this as the
        click budget).
    """
    for i, iou in enumerate(ious, start=1):
        if iou >= threshold:
            return i
    return None


def clicks_in_region(clicks: Iterable[Click], region: np.ndarray) -> list[bool]:
    """For each click, whether it lies inside ``region`` ((H, W) bool); clicks outside the image count as outside."""
    h, w = region.shape
    return [bool(0 <= c.y < h and 0 <= c.x < w and region[c.y, c.x]) for c in clicks]


def _as_bool_mask(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2D (H, W) mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)

