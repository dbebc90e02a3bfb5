"""The ``embedded`` tool: a click-driven segmenter with no weights that runs on any CPU.

Method (histogram likelihood + geodesic veto of negative clicks + contrast-sensitive graph cut):

1. ``encode`` (once per image): grey level in [0, 1] lightly smoothed (``scipy.ndimage.gaussian_filter``) and
   quantised into 64 bins, the noise level (MAD), the whole-image histogram, a gradient-magnitude cost
   (``skimage.filters.sobel``, max-pooled to a <=128-cell grid) and each pixel's distance to the nearest edge
   (``skimage.feature.canny`` + ``scipy.ndimage.distance_transform_edt``).
2. Each click becomes a seed disk whose radius is half its distance to the nearest edge (0-5 px), so seeds
   never cross a boundary.
3. Intensity unary (MONAI Label's scribbles recipe, ``monailabel.scribbles``): log-ratio of the positive-seed
   histogram to a background model = whole-image histogram + negative-seed histogram, both smoothed with a
   Laplace kernel as wide as the noise, so an intermediate grey level goes to the nearer mode.
4. Negative clicks veto geodesically: where the geodesic distance (``skimage.graph.MCP_Geometric`` on the
   gradient cost) to a negative seed is shorter than to a positive one, the unary is pushed to background, so a
   negative click removes only the wrongly included part it sits in.
5. The previous call's logits enter as a weak soft unary (chaining); seeds are hard constraints; a 4-connected
   contrast-sensitive graph cut (``numpymaxflow.maxflow``) gives the mask; components without a positive click
   are dropped. Logits = unary magnitude with the mask's sign.

Why this one: see ``docs/EMBEDDED_TOOL.md`` (``benchmarks/embedded_candidates.py`` compares it with plain
scribbles graph cut, geodesic distance and random walker under the oracle click loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpymaxflow
from scipy import ndimage
from skimage import feature, filters
from skimage.graph import MCP_Geometric

from ibisagent.clicks import Click
from ibisagent.tools.base import ImageSession, Prediction, SegmentationTool, check_clicks, check_image

#: Intensity bins of the histogram likelihood (grey levels in [0, 1]).
N_BINS = 64
#: Gaussian sigma (pixels) of the smoothing applied before binning and edge detection.
SMOOTH_SIGMA = 0.7
#: Histogram kernel width in noise standard deviations, and its floor in bins.
KERNEL_NOISE_SDS = 1.0
KERNEL_MIN_BINS = 1.0
#: Weight of a uniform density mixed into both histograms (keeps unseen intensities possible).
UNIFORM_MIX = 1e-6
#: Weight of the whole-image histogram in the background model (negative seeds have weight 1).
GLOBAL_BG_WEIGHT = 1.0
#: Clip of the intensity log-likelihood ratio.
LLR_CLIP = 4.0
#: Seed disk radius: fraction of the distance to the nearest edge, and its bounds (pixels).
SEED_EDGE_FRACTION = 0.5
SEED_MIN_RADIUS = 0
SEED_MAX_RADIUS = 5
#: Geodesic cost: constant term + gradient term (gradient divided by its GRAD_PERCENTILE value).
GEO_BASE_COST = 0.05
GRAD_PERCENTILE = 90.0
#: Geodesic distances are computed on a grid of at most this many cells per side (max-pooled cost) for speed.
GEO_GRID = 128
#: Weight of the geodesic log-odds (d_neg - d_pos) / GEO_SCALE, clipped at GEO_CLIP.
GEO_SCALE = 2.0
GEO_CLIP = 4.0
GEO_POS_CLIP = 0.0
#: Weight of the previous call's logits in the unary.
PRIOR_WEIGHT = 0.3
#: Graph-cut smoothness weight and intensity sigma (grey units in [0, 1]).
CUT_LAMBDA = 1.0
CUT_SIGMA_NOISE_SDS = 2.0
#: Output logits are clipped to this magnitude; pixels keep at least LOGIT_MARGIN of the mask's sign.
LOGIT_CLIP = 8.0
LOGIT_MARGIN = 0.5
#: Probability used for hard seeds.
HARD_EPS = 1e-6


@dataclass(frozen=True)
class _Features:
    """Per-image features computed once by :meth:`EmbeddedTool.encode`; all arrays (H, W) unless stated."""

    grey: np.ndarray  # float32 in [0, 1], lightly smoothed
    bins: np.ndarray  # int32 in [0, N_BINS)
    global_hist: np.ndarray  # (N_BINS,) float64, smoothed whole-image histogram, sums to 1
    kernel_bins: float  # histogram kernel sigma in bins
    cut_sigma: float  # graph-cut intensity sigma, grey units
    cost: np.ndarray  # float64 > 0, geodesic cost on a grid of at most GEO_GRID cells per side
    edge_distance: np.ndarray  # float32, pixels to the nearest strong edge


def _noise_sd(grey: np.ndarray) -> float:
    """Robust noise standard deviation of a grey image (MAD of horizontal differences / sqrt(2))."""
    diff = np.diff(grey, axis=1)
    mad = float(np.median(np.abs(diff - np.median(diff))))
    return 1.4826 * mad / np.sqrt(2.0)


def _smooth_hist(counts: np.ndarray, scale_bins: float) -> np.ndarray:
    """Convolve a histogram with a Laplace kernel exp(-|k| / scale_bins).

    Exponential tails make the likelihood ratio of two such densities linear in intensity between their modes,
    so an intermediate grey level goes to the nearer mode (the boundary lands half-way, as a threshold would).
    """
    offsets = np.arange(-(counts.size - 1), counts.size)
    kernel = np.exp(-np.abs(offsets) / scale_bins)
    full = np.convolve(counts.astype(np.float64), kernel, mode="full")
    return full[counts.size - 1 : 2 * counts.size - 1]


def _density(counts: np.ndarray, sigma_bins: float) -> np.ndarray:
    """Kernel-smoothed histogram normalised to sum 1 ((N_BINS,) float64); uniform when ``counts`` is empty."""
    smooth = _smooth_hist(counts, sigma_bins)
    total = smooth.sum()
    return smooth / total if total > 0 else np.full(counts.shape, 1.0 / counts.size)


def compute_features(image: np.ndarray) -> _Features:
    """Per-image work of the embedded tool.

    Args:
        image: (H, W, 3) uint8 RGB.
    """
    image = check_image(image)
    raw = image.astype(np.float32).mean(axis=2) / 255.0
    grey = ndimage.gaussian_filter(raw, SMOOTH_SIGMA).astype(np.float32)
    noise = max(_noise_sd(grey), 1.0 / 255.0)
    bins = np.clip((grey * N_BINS).astype(np.int32), 0, N_BINS - 1)
    kernel_bins = max(KERNEL_MIN_BINS, KERNEL_NOISE_SDS * noise * N_BINS)
    global_hist = _smooth_hist(np.bincount(bins.ravel(), minlength=N_BINS), kernel_bins)
    global_hist = global_hist / global_hist.sum()
    grad = filters.sobel(grey).astype(np.float64)
    cost = GEO_BASE_COST + grad / (np.percentile(grad, GRAD_PERCENTILE) + 1e-9)
    factor = max(1, int(np.ceil(max(grey.shape) / GEO_GRID)))
    if factor > 1:
        pad = ((0, -grey.shape[0] % factor), (0, -grey.shape[1] % factor))
        padded = np.pad(cost, pad, mode="edge")
        cost = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).max(axis=(1, 3))
    edges = feature.canny(grey, sigma=1.0)
    edge_distance = (
        ndimage.distance_transform_edt(~edges).astype(np.float32)
        if edges.any()
        else np.full(grey.shape, float(SEED_MAX_RADIUS / SEED_EDGE_FRACTION), np.float32)
    )
    return _Features(
        grey=grey,
        bins=bins,
        global_hist=global_hist,
        kernel_bins=kernel_bins,
        cut_sigma=max(CUT_SIGMA_NOISE_SDS * noise, 0.02),
        cost=cost,
        edge_distance=edge_distance,
    )


def seed_masks(
    clicks: Sequence[Click], edge_distance: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative seed disks, (H, W) bool each; radius adapts to the click's distance to an edge."""
    shape = edge_distance.shape
    pos = np.zeros(shape, dtype=bool)
    neg = np.zeros(shape, dtype=bool)
    for c in clicks:
        radius = int(np.clip(SEED_EDGE_FRACTION * edge_distance[c.y, c.x], SEED_MIN_RADIUS, SEED_MAX_RADIUS))
        y0, y1 = max(c.y - radius, 0), min(c.y + radius + 1, shape[0])
        x0, x1 = max(c.x - radius, 0), min(c.x + radius + 1, shape[1])
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disk = (yy - c.y) ** 2 + (xx - c.x) ** 2 <= radius * radius
        (pos if c.positive else neg)[y0:y1, x0:x1] |= disk
    # A later click wins where disks of opposite sign overlap.
    for c in clicks:
        (pos if c.positive else neg)[c.y, c.x] = True
        (neg if c.positive else pos)[c.y, c.x] = False
    return pos & ~neg, neg


def intensity_llr(feats: _Features, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Per-pixel foreground log-likelihood ratio from seed histograms, (H, W) float32 in [-LLR_CLIP, LLR_CLIP]."""
    uniform = np.full(N_BINS, 1.0 / N_BINS)
    fg = _density(np.bincount(feats.bins[pos], minlength=N_BINS), feats.kernel_bins)
    fg = (1.0 - UNIFORM_MIX) * fg + UNIFORM_MIX * uniform
    bg = feats.global_hist
    if neg.any():
        neg_density = _density(np.bincount(feats.bins[neg], minlength=N_BINS), feats.kernel_bins)
        bg = (GLOBAL_BG_WEIGHT * bg + neg_density) / (GLOBAL_BG_WEIGHT + 1.0)
    bg = (1.0 - UNIFORM_MIX) * bg + UNIFORM_MIX * uniform
    llr = np.clip(np.log(fg) - np.log(bg), -LLR_CLIP, LLR_CLIP).astype(np.float32)
    return llr[feats.bins]


def geodesic_distance(cost: np.ndarray, seeds: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Geodesic distance from the True pixels of ``seeds`` ((H, W) bool) on a coarse ``cost`` grid.

    ``cost`` is (ceil(H / f), ceil(W / f)) for the integer factor f = ceil(H / cost rows); distances are in
    full-resolution pixels and are returned as (H, W) float32 (nearest-neighbour upsampling).
    """
    factor = -(-shape[0] // cost.shape[0])
    starts = {(int(y) // factor, int(x) // factor) for y, x in np.argwhere(seeds)}
    dist, _ = MCP_Geometric(cost).find_costs(sorted(starts))
    dist = (dist * factor).astype(np.float32)
    return np.repeat(np.repeat(dist, factor, axis=0), factor, axis=1)[: shape[0], : shape[1]]


def keep_clicked_components(mask: np.ndarray, pos: np.ndarray, fallback: np.ndarray | None) -> np.ndarray:
    """Keep the 8-connected components of ``mask`` touching a positive seed (else those touching ``fallback``)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    anchor = pos if pos.any() else fallback
    if anchor is None or not anchor.any():
        return np.zeros_like(mask)
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(lab[anchor & mask])] = True
    keep[0] = False
    return keep[lab]


class EmbeddedSession(ImageSession):
    """Cached features of one image; :meth:`predict` is pure (no state is written)."""

    def __init__(self, feats: _Features) -> None:
        self._feats = feats
        self.shape = feats.grey.shape

    def predict(self, clicks: Sequence[Click], prior_logits: np.ndarray | None = None) -> Prediction:
        check_clicks(clicks, self.shape)
        prior = self._prior(prior_logits)
        if not clicks:
            if prior is None:
                return Prediction(np.zeros(self.shape, bool), np.full(self.shape, -LOGIT_CLIP, np.float32))
            return Prediction(prior > 0, prior.copy())
        f = self._feats
        pos, neg = seed_masks(clicks, f.edge_distance)
        prior_mask = prior > 0 if prior is not None else None
        fg_model = pos | (prior_mask & ~neg) if (prior_mask is not None and not pos.any()) else pos
        unary = intensity_llr(f, fg_model, neg)
        if neg.any() and pos.any():
            d_pos = geodesic_distance(f.cost, pos, self.shape)
            d_neg = geodesic_distance(f.cost, neg, self.shape)
            unary = unary + np.clip((d_neg - d_pos) / GEO_SCALE, -GEO_CLIP, GEO_POS_CLIP).astype(np.float32)
        if prior is not None:
            unary = unary + PRIOR_WEIGHT * np.clip(prior, -LOGIT_CLIP, LOGIT_CLIP)
        p_fg = 1.0 / (1.0 + np.exp(-unary))
        p_fg[pos] = 1.0 - HARD_EPS
        p_fg[neg] = HARD_EPS
        prob = np.stack([1.0 - p_fg, p_fg]).astype(np.float32)
        label = numpymaxflow.maxflow(f.grey[None], prob, CUT_LAMBDA, f.cut_sigma, 4)[0] > 0
        mask = keep_clicked_components(label, pos, prior_mask)
        magnitude = np.maximum(np.abs(unary), LOGIT_MARGIN)
        logits = np.clip(np.where(mask, magnitude, -magnitude), -LOGIT_CLIP, LOGIT_CLIP).astype(np.float32)
        return Prediction(mask, logits)

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) float32 log-odds of an existing mask (±:data:`LLR_CLIP`), to refine it as if the tool had made it."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape:
            raise ValueError(f"mask shape {mask.shape} != image shape {self.shape}")
        return np.where(mask, LLR_CLIP, -LLR_CLIP).astype(np.float32)

    def _prior(self, prior_logits: np.ndarray | None) -> np.ndarray | None:
        if prior_logits is None:
            return None
        prior = np.asarray(prior_logits, dtype=np.float32)
        prior = np.squeeze(prior)
        if prior.ndim != 2:
            raise ValueError(f"prior_logits must be (H, W) log-odds, got shape {np.shape(prior_logits)}")
        if prior.shape != self.shape:
            zoom = (self.shape[0] / prior.shape[0], self.shape[1] / prior.shape[1])
            prior = ndimage.zoom(prior, zoom, order=1)[: self.shape[0], : self.shape[1]]
        return prior


class EmbeddedTool(SegmentationTool):
    """CPU click segmenter without weights; ``encode`` computes features, sessions predict in milliseconds."""

    name = "embedded"

    def encode(self, image: np.ndarray) -> EmbeddedSession:
        """Compute the per-image features. ``image``: (H, W, 3) uint8 RGB (``ValueError`` otherwise)."""
        return EmbeddedSession(compute_features(image))
