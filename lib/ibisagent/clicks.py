"""Click simulator: where an expert annotator would click next, and the number-of-clicks metric (NoC).

The rule is the paper's (and RITM's): compute the false-negative region (target pixels the mask misses) and the
false-positive region (mask pixels outside the target); take the Euclidean distance transform of each, with the
image border counted as boundary; click at the deepest point of whichever region has the larger peak — a
*positive* click for a false negative, a *negative* click for a false positive. The alternative rule
``"area"`` picks the region with the larger pixel count instead of the larger peak.

**Anchored clicks** (:func:`click_anchor`, ``anchor=`` of :func:`next_click`): the deepest point of a ribbon-like or
scattered target (cortex, sulci, vessels) lies anywhere along it, so a policy learning to imitate it sees the same
picture answered at points far apart and learns their mean, often outside the target. With an anchor — where the
target name is most often found over a training set — the click goes, within the chosen error region, to the pixel
nearest the anchor among those at least :data:`ANCHOR_DEPTH` of the region's peak depth from its edge: still well
inside, and where an annotator who knows the anatomy would look first.

**Appearance modes** (:func:`anchor_modes`, :func:`nearest_mode`): where a target lies differently in different
kinds of image (axial, coronal or sagittal slices; one scanner's field of view or another's), one anchor per name is
inside only in some; the training images are grouped by their look, each group with its own anchor, and the anchor
of the group an image is nearest is used for it.

Coordinates are pixels, named ``x`` (column) and ``y`` (row) everywhere; arrays are indexed ``mask[y, x]``.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import cv2
import numpy as np

from ibisagent.metrics import iou

if TYPE_CHECKING:
    from ibisagent.tools.base import ImageSession, Prediction

ErrorRule = Literal["peak", "area"]
#: Which of a target's expert clicks are anchored (:class:`ibisagent.policies.oracle.OraclePolicy`): the first only,
#: or every one.
AnchorClicks = Literal["first", "all"]
ANCHOR_CLICK_CHOICES: tuple[str, ...] = get_args(AnchorClicks)

#: Anchored clicks go to pixels at least this share of the chosen region's peak depth from its edge.
ANCHOR_DEPTH = 0.5
#: Grids: an image's thumbnail (:func:`image_layout`, what :func:`anchor_modes` clusters and :func:`nearest_mode`
#: compares) and a mask's occupancy, on which anchors are found (:func:`click_anchor`).
LAYOUT_GRID = 16
ANCHOR_GRID = 64
#: :func:`anchor_modes`: the most appearance modes per target, the fewest masks per mode on each side of the
#: cross-validation, and the held-out gain a larger number of modes must bring.
MAX_ANCHOR_MODES = 4
MIN_MASKS_PER_MODE = 10
MODE_GAIN = 0.02


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

    Computed on the region's bounding box with a one-pixel ring (exact: the ring holds the nearest non-region pixel
    of every box pixel, or stands for the image border), so the cost follows the error region, not the image.
    :func:`distance_transform` (OpenCV, several times faster than ``scipy.ndimage.distance_transform_edt``, the
    same distances).

    Args:
        region: (H, W) bool.

    Returns:
        (H, W) float64 distances in pixels; 0 outside the region.
    """
    region = np.asarray(region, dtype=bool)
    out = np.zeros(region.shape, dtype=np.float64)
    found = _box_distance(region)
    if found is not None:
        box, dist = found
        out[box] = dist
    return out


def _box_distance(region: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The bounding box of an (H, W) bool region and :func:`padded_distance` inside it; ``None`` when empty."""
    u8 = region.view(np.uint8) if region.dtype == bool and region.flags.c_contiguous else region.astype(np.uint8)
    x, y, w, h = cv2.boundingRect(u8)
    if w == 0 or h == 0:
        return None
    box = (slice(y, y + h), slice(x, x + w))
    padded = np.pad(u8[box], 1, mode="constant", constant_values=0)
    return box, distance_transform(padded)[1:-1, 1:-1].astype(np.float64)


def distance_transform(inside: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels) of each nonzero pixel of an (H, W) mask to the nearest zero pixel, 0 on zeros:
    ``scipy.ndimage.distance_transform_edt``, (H, W) float32, deterministic.

    By OpenCV's exact transform (``cv2.distanceTransform``, ``DIST_MASK_PRECISE``, several times faster than
    scipy's), whose float32 output varies in its last bit from call to call. Squared distances between pixel
    centres are integers, so rounding the square recovers them exactly (below 2**22, any image up to 2048 px a
    side): each value is the float32 square root of the exact squared distance, the same on every call, and equal
    distances are equal values (ties stay ties). ``inside`` must have at least one zero pixel.
    """
    u8 = inside.view(np.uint8) if inside.dtype == bool else np.asarray(inside, dtype=np.uint8)
    dist = cv2.distanceTransform(np.ascontiguousarray(u8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    np.multiply(dist, dist, out=dist)
    np.rint(dist, out=dist)
    return np.sqrt(dist, out=dist)


def next_click(
    target: np.ndarray,
    prediction: np.ndarray,
    previous: Iterable[Click] = (),
    rule: ErrorRule = "peak",
    anchor: tuple[float, float] | None = None,
) -> Click | None:
    """The next simulated expert click, or ``None`` when the mask has no error left that a new click could fix.

    Args:
        target: (H, W) bool ground truth.
        prediction: (H, W) bool current mask.
        previous: clicks already placed; the same pixel is never clicked twice.
        rule: ``"peak"`` (the paper's: region whose distance-transform peak is larger) or ``"area"`` (larger region).
        anchor: ``(x, y)`` in pixels (may lie outside the image): click the chosen region's pixel nearest to it among
            those at least :data:`ANCHOR_DEPTH` × the region's peak depth inside (see the module docstring).

    Returns:
        A :class:`Click` at the deepest pixel of the chosen error region (ties: the most central), or the anchored
        pixel; positive for false negatives.
    """
    if rule not in ("peak", "area"):
        raise ValueError(f"unknown click rule {rule!r}; expected 'peak' or 'area'")
    fn, fp = error_regions(target, prediction)
    previous = list(previous)
    candidates = []
    for region, positive in ((fn, True), (fp, False)):
        found = _box_distance(np.ascontiguousarray(region))
        if found is None:
            continue
        box, dist = found  # the distance is 0 outside the region's bounding box: work inside it
        for click in previous:
            if box[0].start <= click.y < box[0].stop and box[1].start <= click.x < box[1].stop:
                dist[click.y - box[0].start, click.x - box[1].start] = 0.0
        if dist.max() <= 0:
            continue
        score = float(dist.max()) if rule == "peak" else float(region.sum())
        candidates.append((score, positive, box, dist))
    if not candidates:
        return None
    _, positive, box, dist = max(candidates, key=lambda c: c[0])
    if anchor is None:
        x, y = _central_peak(dist)
    else:
        x, y = _anchored_point(dist, (anchor[0] - box[1].start, anchor[1] - box[0].start))
    return Click(x=x + box[1].start, y=y + box[0].start, positive=positive)


def _anchored_point(dist: np.ndarray, anchor: tuple[float, float]) -> tuple[int, int]:
    """``(x, y)`` of the pixel nearest ``anchor`` (x, y) among those with ``dist >= ANCHOR_DEPTH * dist.max()``."""
    ys, xs = np.nonzero(dist >= ANCHOR_DEPTH * dist.max())
    nearest = int(np.argmin((xs - anchor[0]) ** 2 + (ys - anchor[1]) ** 2))
    return int(xs[nearest]), int(ys[nearest])


def click_anchor(masks: Iterable[np.ndarray], grid: int = 64, sigma: float = 1.5) -> tuple[float, float] | None:
    """Where a target is most often found: the mode of its masks' smoothed occupancy, relative ``(x, y)``.

    Each mask is resized to a ``grid`` × ``grid`` occupancy (area averaging, so images of any size and aspect
    count alike), the occupancies are averaged and smoothed (Gaussian, ``sigma`` grid cells), and the peak's cell
    centre is returned in relative coordinates (0–1, x = column). The anchor of :func:`next_click`.

    Args:
        masks: (H, W) bool masks of one target name; empty ones (absent targets) are ignored.

    Returns:
        ``(x, y)`` relative, or ``None`` when no mask has a pixel.
    """
    found = [mask_layout(m, grid) for m in masks if _as_bool_mask(m, "mask").any()]
    return _occupancy_peak(found, sigma) if found else None


def mask_layout(mask: np.ndarray, grid: int = ANCHOR_GRID) -> np.ndarray:
    """(grid, grid) float32 occupancy of a (H, W) mask: the share of each cell's pixels inside (area averaging)."""
    return cv2.resize(_as_bool_mask(mask, "mask").astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA)


def image_layout(image: np.ndarray, grid: int = LAYOUT_GRID) -> np.ndarray:
    """(grid, grid) float32 thumbnail of an (H, W) grey or (H, W, 3) RGB image: the grey level area-averaged, then
    standardised (zero mean, unit variance), so that a brighter or darker acquisition of the same view looks alike."""
    grey = np.asarray(image, dtype=np.float32)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    if grey.ndim != 2:
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {np.shape(image)}")
    thumb = cv2.resize(grey, (grid, grid), interpolation=cv2.INTER_AREA)
    return (thumb - thumb.mean()) / max(float(thumb.std()), 1e-6)


def _occupancy_peak(occupancies: Sequence[np.ndarray], sigma: float = 1.5) -> tuple[float, float]:
    """Relative ``(x, y)`` centre of the cell where the mean of (G, G) occupancies, Gaussian-smoothed, peaks."""
    mean = np.mean(np.stack(occupancies), axis=0, dtype=np.float64)
    smooth = cv2.GaussianBlur(mean, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    y, x = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    grid = mean.shape[0]
    return (x + 0.5) / grid, (y + 0.5) / grid


@dataclass(frozen=True)
class AnchorMode:
    """One appearance mode of a target's images over a training set (:func:`anchor_modes`): ``prototype``, the
    (LAYOUT_GRID, LAYOUT_GRID) mean :func:`image_layout` of its images, and ``anchor``, relative ``(x, y)`` where
    the target is most often found in them."""

    anchor: tuple[float, float]
    prototype: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"anchor": [float(v) for v in self.anchor], "prototype": np.round(self.prototype, 4).tolist()}

    @classmethod
    def from_json(cls, value: Any) -> AnchorMode:
        """Read :meth:`to_json`'s form; ``ValueError`` naming what is wrong otherwise."""
        try:
            x, y = (float(v) for v in value["anchor"])
            prototype = np.asarray(value["prototype"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an anchor mode (expected anchor [x, y] and a square prototype): {exc}") from exc
        if prototype.ndim != 2 or prototype.shape[0] != prototype.shape[1]:
            raise ValueError(f"anchor mode prototype must be square, got shape {prototype.shape}")
        return cls(anchor=(x, y), prototype=prototype)


#: An expert click anchor of one target: relative ``(x, y)`` (:func:`click_anchor`) or its appearance modes
#: (:func:`anchor_modes`).
Anchor = tuple[float, float] | Sequence[AnchorMode]


def nearest_mode(modes: Sequence[AnchorMode], image: np.ndarray) -> AnchorMode:
    """The mode whose prototype is nearest (squared difference) to ``image``'s :func:`image_layout`; ``ValueError``
    when there is none."""
    if not modes:
        raise ValueError("no anchor modes to choose from")
    return _nearest(modes, image_layout(image, modes[0].prototype.shape[0]))


def _nearest(modes: Sequence[AnchorMode], layout: np.ndarray) -> AnchorMode:
    """The mode whose prototype is nearest (squared difference) to a (G, G) thumbnail."""
    return min(modes, key=lambda m: float(((m.prototype - layout) ** 2).sum()))


def anchor_modes(images: Iterable[np.ndarray], masks: Iterable[np.ndarray], groups: Iterable[Hashable] | None = None,
                 max_modes: int = MAX_ANCHOR_MODES, seed: int = 0) -> list[AnchorMode]:
    """A target's appearance modes over a training set, each with its own click anchor.

    One anchor per target name (:func:`click_anchor`) is where the target is found most often *over all images*,
    which a policy learns without looking at the image. Where a target lies differently in different kinds of image
    (the cortex ribbon in axial, coronal and sagittal slices; the CSF in one scanner's field of view or another's) no
    single point is inside often. The images are grouped by their look (:func:`image_layout`; k-means,
    scikit-learn's ``KMeans``) into ``k`` modes, each with the anchor of its own masks; the simulated expert's
    anchored click (:class:`~ibisagent.policies.oracle.OraclePolicy`) takes the anchor of the mode the image is
    nearest (:func:`nearest_mode`), so a policy imitating it must tell the kinds of image apart. ``k`` (1 to
    ``max_modes``) is chosen by two-fold cross-validation over ``groups``: on the held-out fold, the share of masks
    containing the anchor of their image's nearest mode; the smallest ``k`` within :data:`MODE_GAIN` of the best.

    Args:
        images: (H, W) or (H, W, 3) images, one per mask (the picture the policy sees).
        masks: (H, W) bool masks of one target name; empty ones (absent targets) are ignored.
        groups: one key per mask (the source image: augmented variants of a case belong to its group), so that
            near-copies never sit on both sides of the cross-validation; default: every mask its own group.
        max_modes: the most modes (≥ 1).
        seed: k-means and fold seed.

    Returns:
        The modes (none when no mask has a pixel).
    """
    images, masks = list(images), list(masks)
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images for {len(masks)} masks")
    keys = list(groups) if groups is not None else list(range(len(masks)))
    if len(keys) != len(masks):
        raise ValueError(f"groups has {len(keys)} keys for {len(masks)} masks")
    kept = [(image_layout(i), mask_layout(m), k) for i, m, k in zip(images, masks, keys)
            if _as_bool_mask(m, "mask").any()]
    return anchor_modes_from_layouts([k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept],
                                     max_modes, seed)


def anchor_modes_from_layouts(thumbs: Sequence[np.ndarray], occupancies: Sequence[np.ndarray],
                              groups: Sequence[Hashable], max_modes: int = MAX_ANCHOR_MODES,
                              seed: int = 0) -> list[AnchorMode]:
    """:func:`anchor_modes` on precomputed layouts: (G, G) :func:`image_layout` thumbnails and (A, A)
    :func:`mask_layout` occupancies of non-empty masks, one group key each (what a manifest scan keeps in memory
    instead of the images)."""
    if max_modes < 1:
        raise ValueError(f"max_modes must be at least 1, got {max_modes}")
    if not len(thumbs) == len(occupancies) == len(groups):
        raise ValueError(f"{len(thumbs)} thumbnails, {len(occupancies)} occupancies and {len(groups)} groups")
    if not thumbs:
        return []
    layouts, fine = np.stack(thumbs), np.stack(occupancies)
    names = sorted(set(groups), key=repr)
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of = {names[i]: n % 2 for n, i in enumerate(order)}
    fold = np.array([fold_of[g] for g in groups])
    scores: dict[int, float] = {}
    for k in range(1, max_modes + 1) if max_modes > 1 else ():  # one candidate: nothing to cross-validate
        if min((fold == 0).sum(), (fold == 1).sum()) < k * MIN_MASKS_PER_MODE:
            break
        hits = []
        for held in (0, 1):
            modes = _fit_modes(layouts[fold != held], fine[fold != held], k, seed)
            for layout, occupancy in zip(layouts[fold == held], fine[fold == held]):
                x, y = _nearest(modes, layout).anchor
                grid = occupancy.shape[0]
                hits.append(occupancy[min(int(y * grid), grid - 1), min(int(x * grid), grid - 1)] >= 0.5)
        scores[k] = float(np.mean(hits))
    best = max(scores.values(), default=0.0)
    chosen = min((k for k, v in scores.items() if v >= best - MODE_GAIN), default=1)
    return _fit_modes(layouts, fine, chosen, seed)


def _fit_modes(layouts: np.ndarray, fine: np.ndarray, k: int, seed: int) -> list[AnchorMode]:
    """``k`` modes by k-means on the (N, G, G) thumbnails; each mode's anchor from its (N, A, A) occupancies."""
    if k == 1:
        labels = np.zeros(len(layouts), dtype=int)
    else:
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(layouts.reshape(len(layouts), -1)).labels_
    return [AnchorMode(anchor=_occupancy_peak(list(fine[labels == c])), prototype=layouts[labels == c].mean(axis=0))
            for c in range(k) if (labels == c).any()]


def _central_peak(dist: np.ndarray) -> tuple[int, int]:
    """``(x, y)`` of the distance peak; where the peak is a ridge or plateau (a rectangle's midline), the peak pixel
    nearest the plateau's centroid, so that the click lands in the middle as an annotator's would."""
    ys, xs = np.nonzero(dist >= dist.max() - 1e-9)
    nearest = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return int(xs[nearest]), int(ys[nearest])


def number_of_clicks(ious: Sequence[float], threshold: float) -> int | None:
    """NoC@threshold: clicks needed until the IoU first reaches ``threshold``.

    Args:
        ious: IoU after click 1, 2, …, in order.
        threshold: e.g. 0.85 or 0.90.

    Returns:
        The 1-based click count, or ``None`` if the threshold was never reached (callers usually count this as the
        click budget).
    """
    for i, value in enumerate(ious, start=1):
        if value >= threshold:
            return i
    return None


def _as_bool_mask(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2D (H, W) mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)



@dataclass(frozen=True)
class SimulatedStep:
    """One simulated click and what the tool made of it: ``mask`` (H, W) bool, its ``iou`` and tool ``seconds``."""

    click: Click
    mask: np.ndarray
    iou: float
    seconds: float


def predict_in_order(
    session: ImageSession, clicks: Sequence[Click], prior_logits: np.ndarray | None = None
) -> Prediction:
    """The mask of a click sequence, the clicks applied one at a time: call ``n`` gets ``clicks[:n]`` and call
    ``n - 1``'s logits, the same chaining as :func:`simulate` and the agent. Use it wherever a known list of clicks
    becomes a mask (the app's ``ibisagent`` and ``ibisagent_clicks`` infer tasks), so the same clicks give the
    same mask on every path and for every tool.

    Args:
        session: the tool's encoding of the image.
        clicks: at least one click, pixel ``(x, y)`` in the encoded image, in the order they were made.
        prior_logits: logits to start from (e.g. ``session.logits_from_mask(existing_mask)``), else ``None``.

    Returns:
        The last call's :class:`~ibisagent.tools.base.Prediction`.

    Raises:
        ValueError: for an empty ``clicks`` (and whatever the tool raises for a click outside the image).
    """
    if not clicks:
        raise ValueError("predict_in_order needs at least one click")
    logits = prior_logits
    prediction = None
    for n in range(1, len(clicks) + 1):
        prediction = session.predict(list(clicks[:n]), logits)
        logits = prediction.logits
    return prediction


#: Default stopping rule of simulation and evaluation (the issue's NoC protocol): IoU ≥ 0.90 or 20 clicks.
DEFAULT_IOU_STOP = 0.90
DEFAULT_MAX_CLICKS = 20


def simulate(
    session: ImageSession,
    target: np.ndarray,
    *,
    initial_mask: np.ndarray | None = None,
    iou_stop: float = DEFAULT_IOU_STOP,
    max_clicks: int = DEFAULT_MAX_CLICKS,
    rule: ErrorRule = "peak",
) -> tuple[list[SimulatedStep], str]:
    """Simulate an expert annotating ``target`` with a tool: click, observe, click again.

    Each tool call gets *all* clicks so far and the previous call's logits. An absent target (all-False ``target``)
    needs no click: the empty starting mask is already right.

    Args:
        session: the tool's encoding of the image (:meth:`SegmentationTool.encode`).
        target: (H, W) bool ground truth.
        initial_mask: (H, W) bool mask to refine (refinement mode); ``None`` starts empty.
        iou_stop: stop once the IoU reaches this.
        max_clicks: click budget.
        rule: error-region rule of :func:`next_click`.

    Returns:
        ``(steps, stop_reason)`` with ``stop_reason`` in ``iou_reached | max_clicks | no_error_left``.
    """
    target = _as_bool_mask(target, "target")
    if target.shape != tuple(session.shape):
        raise ValueError(f"target shape {target.shape} != image shape {tuple(session.shape)}")
    prediction = np.zeros_like(target) if initial_mask is None else _as_bool_mask(initial_mask, "initial_mask")
    logits = None if initial_mask is None else session.logits_from_mask(prediction)
    if iou(prediction, target) >= iou_stop:
        return [], "iou_reached"
    clicks: list[Click] = []
    steps: list[SimulatedStep] = []
    while len(clicks) < max_clicks:
        click = next_click(target, prediction, clicks, rule)
        if click is None:
            return steps, "no_error_left"
        clicks.append(click)
        start = time.perf_counter()
        result = session.predict(clicks, logits)
        seconds = time.perf_counter() - start
        prediction, logits = result.mask, result.logits
        score = iou(prediction, target)
        steps.append(SimulatedStep(click=click, mask=prediction, iou=score, seconds=seconds))
        if score >= iou_stop:
            return steps, "iou_reached"
    return steps, "max_clicks"
