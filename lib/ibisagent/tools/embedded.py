"""The ``embedded`` tool: a click-driven segmenter with no weights that runs on any CPU.

Method (histogram likelihood + geodesic veto of negative clicks + contrast-sensitive graph cut):

1. ``encode`` (once per image): grey level in [0, 1] lightly smoothed (Gaussian) and quantised into 64 bins, the
   noise level (MAD), the whole-image histogram, a gradient-magnitude cost (Sobel, max-pooled to a <=128-cell
   grid) and each pixel's distance to the nearest edge (``skimage.feature.canny`` + Euclidean distance
   transform). The filters are ``scipy.ndimage``'s and ``skimage.filters``' computed by OpenCV with the same
   kernels and borders (:func:`gaussian`, :func:`sobel_magnitude`, :func:`distance_to`; tested equal).
2. Each click becomes a seed disk whose radius is half its distance to the nearest edge (0-5 px), so seeds
   never cross a boundary.
3. Intensity unary (MONAI Label's scribbles recipe, ``monailabel.scribbles``): log-ratio of the positive-seed
   histogram to a background model = whole-image histogram + negative-seed histogram, both smoothed with a
   Laplace kernel as wide as the noise, so an intermediate grey level goes to the nearer mode. Targets made of
   several tissues (grey blob-like seeds): positive clicks are grouped by the grey level they fell on
   (:func:`tissue_groups`), each group has its own histogram and the unary is the maximum over groups, so clicks
   on white matter, grey matter and CSF of one brain grow one mask over all three.
   Faint targets (:func:`weak_contrast`: the first seed of a tissue group differs from the ring around it by at least
   one pooled standard deviation but by under 1.5 of the 64 bins, and a fine model finds a region at most a quarter
   of the 64-bin one): the group's unary is a Gaussian of its first seed's grey level against a 256-bin background
   histogram, pooled over a 1 px Gaussian, minus a locality prior (distance to the group's seeds / 10 px, weighted
   by the weakness), and every seed shrinks to 1 px (the edge detector cannot see the faint boundary the seeds are
   sized by). A click on a lesion 3 grey levels darker than its organ means the lesion, not every pixel of that grey.
4. Negative clicks veto geodesically: where the geodesic distance on the gradient cost (the graph of
   ``skimage.graph.MCP_Geometric``, shortest paths by ``scipy.sparse.csgraph.dijkstra``: :func:`geodesic_graph`)
   to a negative seed is shorter than to a positive one, the unary is pushed to background, so a negative click
   removes only the wrongly included part it sits in.
5. The previous call's logits enter as a weak soft unary (chaining); seeds are hard constraints; a 4-connected
   contrast-sensitive graph cut (the energy of ``numpymaxflow.maxflow``, MONAI Label's scribbles recipe, solved by
   :func:`graph_cut` on the pixels the unary does not decide) gives the mask; components without a positive click
   are dropped. Logits = unary magnitude with the mask's sign.
6. Click invariants (property-tested in ``tests/test_embedded_invariants.py``): the pixel under each click has the
   click's sign; a positive click removes at most :data:`POSITIVE_REMOVAL_BOUND` of the previous mask outside
   negative seeds; clicks given at once (no prior) are applied one at a time with chained logits, so at once and
   one by one give the same mask.

Colour, thin structures, large images, speed:

* Grey inputs (R = G = B) use the grey level, plus a signed ridge channel (:func:`fast_ridge`, Hessian eigenvalues)
  switched on only when the positive seeds sit on ridges (thin curves, rings; see ``GREY_RIDGE_WEIGHT``); with
  the gate off the result is exactly the grey-level-only one. Colour inputs get one histogram likelihood per
  principal component of RGB (decorrelated, summed naive-Bayes style and clipped) plus a signed ridge channel
  (:func:`fast_ridge` on each channel, summed), weighted ``RIDGE_WEIGHT``, so that
  vessels that show up only in the green channel are found. The graph-cut contrast then uses all three channels.
* Images above ``WORK_MAX_SIZE`` px per side are processed on a grid downsampled by an integer factor (area
  mean); logits are upsampled bilinearly and the mask is ``logits > 0`` at full resolution.
* Two work grids for large grey images (:class:`EmbeddedSession`): above ``BLOB_WORK_MAX_SIZE`` (256) px per side,
  features are computed on a grid of at most 256 px, where blob-like targets (the ridge gate off) are segmented;
  a step whose positive seeds sit on thin curves runs on the ``WORK_MAX_SIZE`` grid, whose features are computed
  the first time a step needs them. At 512 px this halves the time per case on the hard set
  (``benchmarks/embedded_candidates.py --set hard512``) and raises its mean IoU; 1-3 px curves keep the
  full-resolution answer exactly (a 256 px grid for everything lost them: thin curve 0.906 -> 0.728).
* The graph cut runs on a region of interest: the bounding box, grown by ``ROI_MARGIN``, of the
  possible-foreground components (unary > -``ROI_UNARY``) touching the positive seeds. A pixel with unary below -4 * CUT_LAMBDA can never be
  foreground, so the result is that of the whole-image cut up to rare boundary ties (on the quick comparison set
  one case of 29 changed, IoU 0.679 -> 0.681; with the per-click geodesic memo below).
* Geodesic distances are memoised per click in the session (the distance to a set of seeds is the minimum of
  the per-click distances), so each new click costs one shortest-path run instead of two full ones.
* Inside the ROI, :func:`graph_cut` fixes every pixel whose log-odds outweigh all its pairwise weights (it has that
  sign in every minimum) and runs max-flow on the others only (a quarter of the ROI's pixels on the 512 px hard
  set): numpymaxflow's masks, several times faster on large ROIs. The encode's medians and percentiles are exact
  histogram selections (:func:`order_statistics`). Together 8.0 -> 10.6 simulated cases per CPU-second on the hard
  set (``docs/EMBEDDED_TOOL.md``, fourth round), every case unchanged.

Why this one: see ``docs/EMBEDDED_TOOL.md`` (``benchmarks/embedded_candidates.py`` compares it with plain
scribbles graph cut, geodesic distance and random walker under the oracle click loop).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import maxflow
import numpy as np
from scipy import ndimage
from skimage import feature, filters
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from ibisagent.clicks import Click, distance_transform
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


#: Images larger than this (pixels per side) are segmented on a grid downsampled by an integer factor (area
#: average); logits are upsampled bilinearly and the mask is taken from them at full resolution.
WORK_MAX_SIZE = 512
#: Grey images: steps whose positive seeds are blob-like (:func:`ridge_gate` 0) run on a grid of at most this many
#: pixels per side; thin curves and rings on the WORK_MAX_SIZE grid (see :class:`EmbeddedSession`). 0 disables it.
BLOB_WORK_MAX_SIZE = 256
#: Colour images: principal components of RGB with at least this fraction of the first one's standard deviation
#: get their own histogram likelihood (summed, naive Bayes); grey images (R = G = B) use the grey level alone.
COLOUR_MIN_SD_FRACTION = 0.05
#: Colour images also get a ridge (vesselness) likelihood channel: ``skimage.filters.sato`` at these sigmas
#: (work-grid pixels). 0 disables it.
RIDGE_SIGMAS = (1.0, 2.0)
RIDGE_WEIGHT = 3.0
#: Grey images: the same signed ridge channel (:func:`fast_ridge`), weighted GREY_RIDGE_WEIGHT times a gate in
#: [0, 1] that is the fraction of positive-seed pixels whose |ridge| is above the image's RIDGE_GATE_PERCENTILE,
#: mapped linearly from RIDGE_GATE_LO (off) to RIDGE_GATE_HI (full). Blob interiors have no ridge response, so
#: blobs keep the grey-only likelihood exactly; seeds on thin curves and rings switch it on. 0 disables it.
GREY_RIDGE_WEIGHT = 1.0
RIDGE_GATE_PERCENTILE = 95.0
RIDGE_GATE_LO = 0.5
RIDGE_GATE_HI = 0.8
#: Graph cut on a region of interest: the bounding box of the possible-foreground components touching the
#: positive seeds (unary > -ROI_UNARY) grown by ROI_MARGIN pixels; everything outside stays background. A pixel
#: whose unary is below -4 * CUT_LAMBDA can never be foreground (its 4 pairwise terms cannot outweigh it).
ROI_UNARY = 3.9
ROI_MARGIN = 8
#: Above this fraction of the image, cut the whole image instead. 1: always the ROI (:func:`graph_cut` costs what
#: its undecided pixels cost, so a large ROI costs no more than the image; 0.6 while the cut cost the whole box).
ROI_MAX_FRACTION = 1.0
#: Positive clicks whose median bins (of 64) differ by more than this are different tissues of one target, each
#: with its own foreground histogram (:func:`tissue_groups`).
GROUP_MERGE_BINS = 4.0
#: A positive click may drop at most this fraction of the previous mask (outside negative seeds); beyond it, the
#: previous mask is kept whole (see :func:`_settle`).
POSITIVE_REMOVAL_BOUND = 0.05
#: Weak contrast (grey blob seeds; :func:`weak_contrast`): a tissue group whose first seed disk differs from the
#: ring RING_INNER..RING_OUTER px around it by at least WEAK_MIN_CONTRAST pooled standard deviations but by less
#: than WEAK_MAX_BINS 64-bin histogram bins in grey level, and where the fine model's region is at most WEAK_MAX_AREA_RATIO of
#: the 64-bin model's, is a faint target — a lesion a few grey levels from its organ, which 64 bins cannot separate
#: (the sample data's ``ct_liver_lesion``: about 2 grey levels between a seed and its ring, 64-bin region 28 times
#: the fine one).
WEAK_MIN_CONTRAST = 1.0
WEAK_MAX_BINS = 1.5
WEAK_MAX_AREA_RATIO = 0.25
RING_INNER = 4.0
RING_OUTER = 12.0
#: A weak group's model (:func:`_fine_llr`): a Gaussian of its first seed's grey level (standard deviation floored
#: at the noise) against the FINE_BINS-bin whole-image histogram, the log-ratio pooled over a Gaussian of
#: WEAK_POOL_SIGMA px (one pixel's evidence is too faint; its neighbours' adds up), minus a locality prior of
#: weakness * (Euclidean distance to the group's seeds) / LOCAL_SCALE. Negative seeds do not enter this model
#: (one boundary pixel's grey level would carve a hole in the fine histogram at the lesion's level); they act through
#: the hard constraints and the geodesic veto.
FINE_BINS = 256
WEAK_POOL_SIGMA = 1.0
LOCAL_SCALE = 10.0
#: With a weak group, every seed disk shrinks to this radius: the edge detector cannot see a faint boundary, so
#: disks sized by it would cross it (a boundary click would claim the other side).
WEAK_SEED_RADIUS = 1
#: Per-session memo of per-click geodesic distances (entries), cleared when full.
GEO_CACHE_SIZE = 512


@dataclass(frozen=True)
class _Features:
    """Per-image features computed once by :meth:`EmbeddedTool.encode`; arrays (h, w) on the work grid unless stated.

    The work grid is the image itself up to :data:`WORK_MAX_SIZE` pixels per side, else the image downsampled by
    the integer ``factor``.
    """

    grey: np.ndarray  # float32 in [0, 1], lightly smoothed (grey level, or colour PC1)
    cut_image: np.ndarray  # (C, h, w) float32 graph-cut contrast image (C = 1 grey, 3 colour)
    bins: np.ndarray  # (K, h, w) uint8 in [0, N_BINS): one row per likelihood channel (K = 1 for grey)
    global_hist: np.ndarray  # (K, N_BINS) float64, smoothed whole-image histograms, each sums to 1
    kernel_bins: tuple[float, ...]  # histogram kernel sigma in bins, per channel
    cut_sigma: float  # graph-cut intensity sigma, cut_image units
    cost: np.ndarray  # float64 > 0, geodesic cost on a grid of at most GEO_GRID cells per side
    edge_distance: np.ndarray  # float32, work-grid pixels to the nearest strong edge
    has_ridge: bool = False  # the last likelihood channel is the ridge feature
    fine_bins: np.ndarray | None = None  # (h, w) uint8 in [0, FINE_BINS): grey level, grey images only
    fine_hist: np.ndarray | None = None  # (FINE_BINS,) float64 smoothed whole-image histogram of fine_bins
    noise: float = 0.0  # noise standard deviation of ``grey`` (grey units in [0, 1])
    ridge_weight: float = 0.0
    ridge_strength: np.ndarray | None = None
    factor: int = 1  # work grid = full image downsampled by this integer factor
    full_shape: tuple[int, int] = (0, 0)  # (H, W) of the encoded image


def _gaussian_kernel1d(sigma: float, order: int) -> np.ndarray:
    """The 1-D Gaussian (derivative) kernel of ``scipy.ndimage.gaussian_filter1d`` (truncate 4), float64."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 * x**2 / (sigma * sigma))
    phi /= phi.sum()
    if order == 0:
        return phi
    powers = np.arange(order + 1)
    q = np.zeros(order + 1)
    q[0] = 1.0
    step = np.diag(powers[1:].astype(np.float64), 1) + np.diag(np.full(order, -1.0 / (sigma * sigma)), -1)
    for _ in range(order):
        q = step @ q
    return (x[:, None] ** powers) @ q * phi


def gaussian(a: np.ndarray, sigma: float, order: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(a, sigma, order)`` of an (h, w) image (mode ``reflect``, truncate 4), float32,
    computed by OpenCV's separable filter (``cv2.sepFilter2D``, ``BORDER_REFLECT``: the same kernel and border,
    several times faster; equal to scipy's up to float32 rounding, tested)."""
    ky = _gaussian_kernel1d(sigma, order[0])[::-1]
    kx = _gaussian_kernel1d(sigma, order[1])[::-1]
    a = np.ascontiguousarray(a, dtype=np.float32)
    if min(a.shape) <= ky.size:  # OpenCV reflects once only: scipy handles kernels longer than the image
        return ndimage.gaussian_filter(a, sigma, order=order).astype(np.float32)
    return cv2.sepFilter2D(a, cv2.CV_32F, kx.astype(np.float32), ky.astype(np.float32), borderType=cv2.BORDER_REFLECT)


def sobel_magnitude(a: np.ndarray) -> np.ndarray:
    """``skimage.filters.sobel(a)`` of an (h, w) image (mode ``reflect``), float64, by ``cv2.sepFilter2D`` (tested
    equal up to float rounding)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if min(a.shape) < 3:
        return filters.sobel(a).astype(np.float64)
    smooth = np.array([0.25, 0.5, 0.25], np.float32)
    edge = np.array([1.0, 0.0, -1.0], np.float32)
    gy = cv2.sepFilter2D(a, cv2.CV_32F, smooth, edge, borderType=cv2.BORDER_REFLECT)
    gx = cv2.sepFilter2D(a, cv2.CV_32F, edge, smooth, borderType=cv2.BORDER_REFLECT)
    return np.sqrt(0.5 * (gx * gx + gy * gy)).astype(np.float64)


def distance_to(region: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels, float32) of every pixel to the nearest ``True`` pixel of ``region`` ((h, w)
    bool): ``scipy.ndimage.distance_transform_edt(~region)`` by :func:`ibisagent.clicks.distance_transform`
    (OpenCV, deterministic); +inf everywhere when ``region`` is empty."""
    if not region.any():
        return np.full(region.shape, np.inf, np.float32)
    return distance_transform(~region)


def label8(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components of an (h, w) bool mask by ``cv2.connectedComponentsWithStats``: (number of labels
    including the background 0, (h, w) int32 labels, (n, 5) int32 stats: x, y, width, height, area)."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return n, lab, stats


def upsample(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (h, w) float32 to ``shape`` = (H, W), pixel centres aligned and edges replicated:
    ``scipy.ndimage.zoom(a, (H / h, W / w), order=1, grid_mode=True, mode="nearest")``, by ``cv2.resize``
    (tested equal up to float rounding, several times faster)."""
    return cv2.resize(np.ascontiguousarray(a, dtype=np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def block_repeat(a: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Each pixel of (h, w) ``a`` repeated into a ``factor`` x ``factor`` block, cropped to ``shape`` (at most
    (h * factor, w * factor)): ``np.repeat(np.repeat(a, factor, 0), factor, 1)[:H, :W]`` in one copy."""
    h, w = a.shape
    full = np.broadcast_to(a[:, None, :, None], (h, factor, w, factor)).reshape(h * factor, w * factor)
    return full[: shape[0], : shape[1]]


def lookup(table: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """``table[bins]`` as float32 for a table of at most 256 values and (h, w) uint8 ``bins``, by ``cv2.LUT``
    (the same values, several times faster than numpy's gather)."""
    lut = np.zeros(256, np.float32)
    lut[: table.size] = table
    return cv2.LUT(np.ascontiguousarray(bins, dtype=np.uint8), lut)


#: :func:`order_statistics`: arrays of at least this many values are narrowed by a histogram of this many bins first.
SELECT_MIN_SIZE = 65536
SELECT_BINS = 1024


def order_statistics(values: np.ndarray, ks: Sequence[int]) -> list:
    """The ``k``-th smallest value of ``values`` (any shape, flattened) for each ``k`` in ``ks``, numpy scalars of its
    dtype: ``np.partition(values.ravel(), ks)[ks]``, exactly.

    Large arrays: a histogram (``cv2.calcHist``, SELECT_BINS bins over [min, max]) finds the bins that hold the
    ``k``-th value; the values in those bins (and one bin either side) are counted against the values below and
    partitioned alone. When the count shows the value is not there (binning at an edge), the whole array is
    partitioned: the result is exact either way, several times faster than ``np.partition`` on 512 px images.
    """
    flat = np.ravel(values)
    ks = [int(k) for k in ks]
    lo = hi = 0.0
    if flat.size >= SELECT_MIN_SIZE and flat.dtype.kind == "f":
        lo, hi = float(flat.min()), float(flat.max())
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        part = np.partition(flat, sorted(set(ks)))
        return [part[k] for k in ks]
    width = (hi - lo) / SELECT_BINS
    f32 = flat if flat.dtype == np.float32 else flat.astype(np.float32)
    cum = np.cumsum(cv2.calcHist([f32.reshape(1, -1)], [0], None, [SELECT_BINS], [lo, hi + width]).ravel())
    out = []
    for k in ks:
        b = int(np.searchsorted(cum, k + 1, side="left"))
        e_lo, e_hi = flat.dtype.type(lo + (b - 1) * width), flat.dtype.type(lo + (b + 2) * width)
        below = int(np.count_nonzero(flat < e_lo))
        chosen = flat[(flat >= e_lo) & (flat < e_hi)]
        if below <= k < below + chosen.size:
            out.append(np.partition(chosen, k - below)[k - below])
        else:
            out.append(np.partition(flat, k)[k])
    return out


def median(values: np.ndarray):
    """``np.median(values)`` (all values, no NaN), the same value and type, by :func:`order_statistics`."""
    flat = np.ravel(values)
    n = flat.size
    if n % 2:
        return order_statistics(flat, [n // 2])[0]
    return np.mean(np.array(order_statistics(flat, [n // 2 - 1, n // 2]), dtype=flat.dtype))


def percentile(values: np.ndarray, q: float | Sequence[float]):
    """``np.percentile(values, q)`` (linear interpolation, all values, no NaN), the same values and type, by
    :func:`order_statistics`."""
    flat = np.ravel(values)
    n = flat.size
    virtual = (n - 1) * (np.asarray(q, dtype=np.float64) / 100.0)
    prev = np.floor(virtual).astype(np.intp)
    nxt = np.minimum(prev + 1, n - 1)
    stats = order_statistics(flat, list(np.ravel(prev)) + list(np.ravel(nxt)))
    a = np.array(stats[: prev.size], dtype=flat.dtype).reshape(prev.shape)
    b = np.array(stats[prev.size :], dtype=flat.dtype).reshape(prev.shape)
    gamma = virtual - prev
    diff = np.subtract(b, a)
    out = np.asanyarray(np.add(a, diff * gamma))  # numpy's _lerp
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out[()] if out.ndim == 0 else out


def _noise_sd(grey: np.ndarray) -> float:
    """Robust noise standard deviation of a grey image (MAD of horizontal differences / sqrt(2))."""
    diff = np.diff(grey, axis=1)
    mad = float(median(np.abs(diff - median(diff))))
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


def _block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Area-average downsampling of (H, W[, C]) by an integer factor (edge-padded to a multiple)."""
    pad = [(0, -a.shape[0] % factor), (0, -a.shape[1] % factor)] + [(0, 0)] * (a.ndim - 2)
    p = np.pad(a, pad, mode="edge") if any(pad[0] + pad[1]) else a
    total = None
    for i in range(factor):  # a sum of strided slices: several times faster than reshape(...).mean(axis=(1, 3))
        for j in range(factor):
            part = p[i::factor, j::factor]
            total = part.astype(np.float64 if a.dtype == np.float64 else np.float32) if total is None else total + part
    return total / (factor * factor)


def _block_max(a: np.ndarray, factor: int) -> np.ndarray:
    pad = ((0, -a.shape[0] % factor), (0, -a.shape[1] % factor))
    p = np.pad(a, pad, mode="edge") if any(pad[0] + pad[1]) else a
    total = p[::factor, ::factor].copy()
    for i in range(factor):
        for j in range(factor):
            if i or j:
                np.maximum(total, p[i::factor, j::factor], out=total)
    return total


def _likelihood_channel(values: np.ndarray, noise: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Bins, smoothed global histogram and kernel width (bins) of one channel with values in [0, 1]; ``noise``: its
    noise standard deviation when already known (floored at 1 / 255)."""
    noise = max(_noise_sd(values), 1.0 / 255.0) if noise is None else noise
    bins = np.clip((values * N_BINS).astype(np.int32), 0, N_BINS - 1).astype(np.uint8)
    kernel_bins = max(KERNEL_MIN_BINS, KERNEL_NOISE_SDS * noise * N_BINS)
    hist = _smooth_hist(np.bincount(bins.ravel(), minlength=N_BINS), kernel_bins)
    return bins, hist / hist.sum(), kernel_bins


def _unit(values: np.ndarray) -> np.ndarray:
    """Map a channel to [0, 1] by its 0.5 / 99.5 percentiles (float32)."""
    lo, hi = percentile(values, (0.5, 99.5))
    return np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def ridge_feature(channels: np.ndarray) -> np.ndarray:
    """Signed curvilinear-structure response, (h, w) float32: bright ridges positive, dark ridges (vessels)
    negative. ``skimage.filters.sato`` at :data:`RIDGE_SIGMAS` on each channel scaled to unit standard deviation,
    summed over channels, so the channels where a thin structure has contrast dominate."""
    total = np.zeros(channels.shape[1:], np.float32)
    for ch in channels:
        unit = ch / max(float(ch.std()), 1e-6)
        total += filters.sato(unit, sigmas=RIDGE_SIGMAS, black_ridges=False).astype(np.float32)
        total -= filters.sato(unit, sigmas=RIDGE_SIGMAS, black_ridges=True).astype(np.float32)
    return total


def fast_ridge(grey: np.ndarray) -> np.ndarray:
    """Signed ridge response of one grey channel, (h, w) float32: bright ridges positive, dark ridges negative.

    Scale-normalised Hessian eigenvalues (Gaussian derivatives at :data:`RIDGE_SIGMAS`): bright = max over sigmas of
    sigma^2 * max(-lambda_min, 0), dark = max over sigmas of sigma^2 * max(lambda_max, 0). One Hessian per sigma
    serves both polarities (half the cost of two ``skimage.filters.sato`` calls).
    """
    unit = grey.astype(np.float32) / max(float(grey.std()), 1e-6)
    bright = np.zeros(grey.shape, np.float32)
    dark = np.zeros(grey.shape, np.float32)
    for s in RIDGE_SIGMAS:
        hyy = gaussian(unit, s, (2, 0))
        hxx = gaussian(unit, s, (0, 2))
        hxy = gaussian(unit, s, (1, 1))
        mean = 0.5 * (hyy + hxx)
        rad = np.sqrt(0.25 * (hyy - hxx) ** 2 + hxy**2)
        np.maximum(bright, s * s * np.maximum(-(mean - rad), 0.0), out=bright)
        np.maximum(dark, s * s * np.maximum(mean + rad, 0.0), out=dark)
    return bright - dark


def compute_features(image: np.ndarray, max_size: int = WORK_MAX_SIZE) -> _Features:
    """Per-image work of the embedded tool.

    Args:
        image: (H, W, 3) uint8 RGB.
        max_size: work-grid pixels per side at most (the image is downsampled by the smallest integer factor that
            fits).
    """
    image = check_image(image)
    full_shape = image.shape[:2]
    factor = max(1, int(np.ceil(max(full_shape) / max_size)))
    is_grey = bool((image[:, :, 0] == image[:, :, 1]).all() and (image[:, :, 1] == image[:, :, 2]).all())
    # Grey images: one channel carries them (the same values as the mean of three equal channels, ((r + g) + b) / 3
    # in float32, computed on one).
    rgb = (image[:, :, :1] if is_grey else image).astype(np.float32) / 255.0
    if factor > 1:
        rgb = _block_mean(rgb, factor).astype(np.float32)
    ridge_strength = None
    if is_grey:
        raw = (rgb[:, :, 0] + rgb[:, :, 0] + rgb[:, :, 0]) / np.float32(3.0)
        grey = gaussian(raw, SMOOTH_SIGMA)
        noise = max(_noise_sd(grey), 1.0 / 255.0)
        bins, hist, kernel = _likelihood_channel(grey, noise)
        all_bins, hists, kernels = bins[None], hist[None], (kernel,)
        if GREY_RIDGE_WEIGHT > 0:
            ridge = fast_ridge(grey)
            strength = np.abs(ridge)
            ridge_strength = (strength / max(float(percentile(strength, RIDGE_GATE_PERCENTILE)), 1e-6)).astype(np.float32)
            rb, rh, rk = _likelihood_channel(_unit(ridge))
            all_bins = np.stack([bins, rb]); hists = np.stack([hist, rh]); kernels = (kernel, rk)
        fine_bins = np.clip((grey * FINE_BINS).astype(np.int32), 0, FINE_BINS - 1).astype(np.uint8)
        fine_hist = _density(np.bincount(fine_bins.ravel(), minlength=FINE_BINS), max(1.0, noise * FINE_BINS))
        cut_image = grey[None]
        cut_sigma = max(CUT_SIGMA_NOISE_SDS * noise, 0.02)
    else:
        fine_bins = fine_hist = None
        noise = 0.0
        smooth = np.stack([gaussian(rgb[:, :, c], SMOOTH_SIGMA) for c in range(3)])
        flat = smooth.reshape(3, -1)
        centred = flat - flat.mean(axis=1, keepdims=True)
        evals, evecs = np.linalg.eigh(np.cov(centred[:, :: max(1, flat.shape[1] // 200_000)]))
        order = np.argsort(evals)[::-1]
        evals, evecs = np.maximum(evals[order], 0.0), evecs[:, order]
        if evecs[:, 0].sum() < 0:
            evecs[:, 0] = -evecs[:, 0]
        comps = (evecs.T @ centred).reshape(3, *smooth.shape[1:])
        channels = [_unit(comps[k]) for k in range(3) if np.sqrt(evals[k]) >= COLOUR_MIN_SD_FRACTION * np.sqrt(evals[0])]
        if RIDGE_WEIGHT > 0:
            channels.append(_unit(sum(fast_ridge(ch) for ch in smooth)))
        grey = channels[0]
        per = [_likelihood_channel(ch) for ch in channels]
        all_bins = np.stack([p[0] for p in per])
        hists = np.stack([p[1] for p in per])
        kernels = tuple(p[2] for p in per)
        cut_image = smooth
        noise = float(np.sqrt(sum(max(_noise_sd(smooth[c]), 1.0 / 255.0) ** 2 for c in range(3))))
        cut_sigma = max(CUT_SIGMA_NOISE_SDS * noise, 0.02)
    if is_grey:
        grad = sobel_magnitude(cut_image[0])
    else:
        grad = np.sqrt(sum(sobel_magnitude(ch) ** 2 for ch in cut_image))
    cost = GEO_BASE_COST + grad / (percentile(grad, GRAD_PERCENTILE) + 1e-9)
    geo_factor = max(1, int(np.ceil(max(grey.shape) / GEO_GRID)))
    if geo_factor > 1:
        cost = _block_max(cost, geo_factor)
    if is_grey:
        edges = feature.canny(grey, sigma=1.0)
    else:
        edges = np.logical_or.reduce([feature.canny(ch, sigma=1.0) for ch in cut_image])
    edge_distance = (
        distance_to(edges)
        if edges.any()
        else np.full(grey.shape, float(SEED_MAX_RADIUS / SEED_EDGE_FRACTION), np.float32)
    )
    return _Features(
        grey=grey,
        cut_image=np.ascontiguousarray(cut_image, dtype=np.float32),
        bins=all_bins,
        global_hist=hists,
        kernel_bins=kernels,
        cut_sigma=cut_sigma,
        cost=cost,
        edge_distance=edge_distance,
        has_ridge=(not is_grey and RIDGE_WEIGHT > 0) or (is_grey and GREY_RIDGE_WEIGHT > 0),
        ridge_weight=GREY_RIDGE_WEIGHT if is_grey else RIDGE_WEIGHT,
        ridge_strength=ridge_strength,
        fine_bins=fine_bins,
        fine_hist=fine_hist,
        noise=noise,
        factor=factor,
        full_shape=full_shape,
    )


def _seed_radius(click: Click, edge_distance: np.ndarray) -> int:
    return int(min(max(SEED_EDGE_FRACTION * float(edge_distance[click.y, click.x]), SEED_MIN_RADIUS), SEED_MAX_RADIUS))


def _disk(radius: int) -> np.ndarray:
    """(2r + 1, 2r + 1) bool disk of integer ``radius`` (pixels whose centre is within it)."""
    yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    disk = yy**2 + xx**2 <= radius * radius
    disk.flags.writeable = False
    return disk


#: The seed disks of every radius a click can get (read only).
_DISKS = tuple(_disk(r) for r in range(SEED_MAX_RADIUS + 1))


def click_disk(click: Click, edge_distance: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray]:
    """The seed disk of one click: its bounding box in the work grid and the (h, w) bool disk inside it
    (a read-only view: copy before writing)."""
    shape = edge_distance.shape
    radius = _seed_radius(click, edge_distance)
    y0, y1 = max(click.y - radius, 0), min(click.y + radius + 1, shape[0])
    x0, x1 = max(click.x - radius, 0), min(click.x + radius + 1, shape[1])
    oy, ox = click.y - radius, click.x - radius
    return (slice(y0, y1), slice(x0, x1)), _DISKS[radius][y0 - oy : y1 - oy, x0 - ox : x1 - ox]


def seed_masks(
    clicks: Sequence[Click], edge_distance: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative seed disks, (H, W) bool each; radius adapts to the click's distance to an edge."""
    shape = edge_distance.shape
    pos = np.zeros(shape, dtype=bool)
    neg = np.zeros(shape, dtype=bool)
    for c in clicks:
        box, disk = click_disk(c, edge_distance)
        (pos if c.positive else neg)[box] |= disk
    # A later click wins where disks of opposite sign overlap.
    for c in clicks:
        (pos if c.positive else neg)[c.y, c.x] = True
        (neg if c.positive else pos)[c.y, c.x] = False
    return pos & ~neg, neg


def intensity_llr(
    feats: _Features, pos: np.ndarray, neg: np.ndarray, groups: Sequence[TissueGroup] = ()
) -> np.ndarray:
    """Per-pixel foreground log-likelihood ratio from seed histograms, (h, w) float32 in [-LLR_CLIP, LLR_CLIP].

    One histogram ratio per likelihood channel (grey: one; colour: decorrelated principal components), summed.
    With ``groups`` ((h, w) bool seed pixels of each tissue class the positive clicks fell on, see
    :func:`tissue_groups`), each group gets its own foreground histogram and the ratio is the maximum over groups:
    a pixel is foreground when it looks like *any* clicked tissue, so a target made of several tissues grows to
    their union. Without groups (or with one), the histogram of all ``pos`` pixels.
    """
    ridge_weight = feats.ridge_weight
    if feats.ridge_strength is not None:
        ridge_weight *= ridge_gate(feats, pos)
    if not groups:
        return _pooled_llr(feats, pos, neg, ridge_weight)
    maps = []
    for g in groups:
        if g.weakness > 0:
            maps.append(_fine_llr(feats, g, neg, g.weakness))
        else:
            maps.append(_pooled_llr(feats, g.seeds, neg, ridge_weight))
    return maps[0] if len(maps) == 1 else np.max(maps, axis=0)


def weak_contrast(feats: _Features, seeds: np.ndarray) -> float:
    """How faint the boundary around a tissue group's first seed disk is: weakness in [0, 1] (0 = not faint).

    Three tests, all needed (grey images only):

    1. The seeds differ from the ring RING_INNER..RING_OUTER px around them by at least WEAK_MIN_CONTRAST pooled
       standard deviations (floored at the noise): there is a boundary nearby. A click deep inside one tissue has a
       contrast near 0 (the 64-bin model is right to grow over the whole tissue).
    2. The difference is under WEAK_MAX_BINS 64-bin histogram bins: weakness 1 up to one bin, 0 from
       WEAK_MAX_BINS, linear between. Above that the 64-bin model separates the two sides itself.
    3. The fine model (:func:`_fine_llr` without locality) finds a region around the click at most
       WEAK_MAX_AREA_RATIO of the 64-bin model's: it sees a boundary the coarse model floods across.
    """
    if feats.fine_bins is None or not seeds.any():
        return 0.0
    ys, xs = np.nonzero(seeds)
    m = int(RING_OUTER) + 1
    box = (slice(max(ys.min() - m, 0), ys.max() + m + 1), slice(max(xs.min() - m, 0), xs.max() + m + 1))
    dist = distance_to(seeds[box])
    ring = (dist > RING_INNER) & (dist <= RING_OUTER)
    if not ring.any():
        return 0.0
    a, b = feats.grey[box][seeds[box]], feats.grey[box][ring]
    diff = abs(float(a.mean()) - float(b.mean()))
    sd = max(float(np.sqrt(0.5 * (a.var() + b.var()))), feats.noise)
    weakness = float(np.clip((WEAK_MAX_BINS - diff * N_BINS) / (WEAK_MAX_BINS - 1.0), 0.0, 1.0))
    if weakness == 0.0 or diff / sd < WEAK_MIN_CONTRAST:
        return 0.0
    none = np.zeros_like(seeds)
    fine = _region_area(_fine_llr(feats, TissueGroup(seeds, seeds, 0.0), none, 0.0) > 0, seeds)
    coarse = _region_area(_pooled_llr(feats, seeds, none, 0.0) > 0, seeds)
    return weakness if fine <= WEAK_MAX_AREA_RATIO * coarse else 0.0


def _region_area(mask: np.ndarray, seeds: np.ndarray) -> int:
    """Pixels of the 8-connected components of ``mask`` that touch ``seeds``."""
    _, lab, stats = label8(mask)
    ids = np.unique(lab[seeds & mask])
    return int(stats[ids[ids > 0], cv2.CC_STAT_AREA].sum())


def _fine_llr(feats: _Features, group: TissueGroup, neg: np.ndarray, weakness: float) -> np.ndarray:
    """Weak-contrast tissue group: Gaussian seed model against the fine background histogram, minus a locality
    prior (Euclidean distance to ``seeds`` / :data:`LOCAL_SCALE`, times ``weakness`` in [0, 1]); (h, w) float32."""
    levels = feats.fine_bins[group.first].astype(np.float64)
    sd = max(float(levels.std()), feats.noise * FINE_BINS, 1.0)
    centres = np.arange(FINE_BINS, dtype=np.float64)
    fg = np.exp(-0.5 * ((centres - levels.mean()) / sd) ** 2)
    fg /= fg.sum()
    bg = feats.fine_hist
    uniform = 1.0 / FINE_BINS
    fg = (1.0 - UNIFORM_MIX) * fg + UNIFORM_MIX * uniform
    bg = (1.0 - UNIFORM_MIX) * bg + UNIFORM_MIX * uniform
    llr = lookup(np.clip(np.log(fg) - np.log(bg), -LLR_CLIP, LLR_CLIP), feats.fine_bins)
    if WEAK_POOL_SIGMA > 0:
        llr = gaussian(llr, WEAK_POOL_SIGMA)
    if weakness <= 0:
        return np.clip(llr, -LLR_CLIP, LLR_CLIP)
    dist = distance_to(group.seeds)
    return np.clip(llr - weakness * dist / LOCAL_SCALE, -LLR_CLIP, LLR_CLIP)


def ridge_gate(feats: _Features, pos: np.ndarray) -> float:
    """Grey images: the gate in [0, 1] of the ridge channel (fraction of positive-seed pixels on strong ridges,
    mapped linearly from RIDGE_GATE_LO to RIDGE_GATE_HI); 1 for colour images."""
    if feats.ridge_strength is None:
        return 1.0
    frac = float((feats.ridge_strength[pos] >= 1.0).mean()) if pos.any() else 0.0
    return float(np.clip((frac - RIDGE_GATE_LO) / (RIDGE_GATE_HI - RIDGE_GATE_LO), 0.0, 1.0))


def _pooled_llr(feats: _Features, fg_pixels: np.ndarray, neg: np.ndarray, ridge_weight: float) -> np.ndarray:
    """Log-ratio of the histogram of ``fg_pixels`` to the background model, summed over likelihood channels."""
    uniform = np.full(N_BINS, 1.0 / N_BINS)
    total = None
    for k in range(feats.bins.shape[0]):
        bins = feats.bins[k]
        fg = _density(np.bincount(bins[fg_pixels], minlength=N_BINS), feats.kernel_bins[k])
        fg = (1.0 - UNIFORM_MIX) * fg + UNIFORM_MIX * uniform
        bg = feats.global_hist[k]
        if neg.any():
            neg_density = _density(np.bincount(bins[neg], minlength=N_BINS), feats.kernel_bins[k])
            bg = (GLOBAL_BG_WEIGHT * bg + neg_density) / (GLOBAL_BG_WEIGHT + 1.0)
        bg = (1.0 - UNIFORM_MIX) * bg + UNIFORM_MIX * uniform
        llr = lookup(np.clip(np.log(fg) - np.log(bg), -LLR_CLIP, LLR_CLIP), bins)
        if feats.has_ridge and k == feats.bins.shape[0] - 1:
            if ridge_weight <= 0:
                continue
            llr = ridge_weight * llr
        total = llr if total is None else total + llr
    if feats.bins.shape[0] > 1:
        total = np.clip(total, -LLR_CLIP, LLR_CLIP)
    return total


class TissueGroup(NamedTuple):
    """Positive clicks on one tissue: ``seeds`` (h, w) bool pixels of all its clicks' seed disks, ``first`` those of
    its first click."""

    seeds: np.ndarray
    first: np.ndarray
    weakness: float = 0.0


def _median_bin(values: np.ndarray) -> float:
    """``float(np.median(values))`` of a small 1-D array of integer bins (the mean of the two middle values), without
    ``np.median``'s overhead, which dominated for seed disks of a few dozen pixels."""
    v = np.sort(values)
    n = v.size
    return (float(v[(n - 1) // 2]) + float(v[n // 2])) / 2.0


def tissue_groups(
    feats: _Features, clicks: Sequence[Click], pos: np.ndarray, memo: dict[tuple[int, int, bytes], float] | None = None
) -> list[TissueGroup]:
    """Group the positive clicks by the tissue they fell on, in click order.

    A click joins the first group whose first click's median bin (first likelihood channel: grey level or colour
    PC1) is within :data:`GROUP_MERGE_BINS` of its own, else it starts a new group. Clicks on one homogeneous target
    make one group (the pooled histogram, as before); clicks on white matter, grey matter and CSF of one brain make
    three.
    """
    heads: list[float] = []
    groups: list[np.ndarray] = []
    first: list[np.ndarray] = []
    first_keys: list[tuple[int, int, bytes]] = []
    bins = feats.bins[0]
    for c in clicks:
        if not c.positive:
            continue
        box, disk = click_disk(c, feats.edge_distance)
        seed = np.zeros(pos.shape, bool)
        seed[box] = disk
        seed &= pos
        if not seed.any():
            continue
        level = _median_bin(bins[seed])
        for i, head in enumerate(heads):
            if abs(level - head) <= GROUP_MERGE_BINS:
                groups[i] |= seed
                break
        else:
            heads.append(level)
            groups.append(seed)
            first.append(seed.copy())
            first_keys.append((c.x, c.y, seed[box].tobytes()))
    out = []
    for g, f, key in zip(groups, first, first_keys):
        weakness = memo.get(key) if memo is not None else None
        if weakness is None:
            weakness = weak_contrast(feats, f)
            if memo is not None:
                if len(memo) >= GEO_CACHE_SIZE:
                    memo.clear()
                memo[key] = weakness
        out.append(TissueGroup(g, f, weakness))
    return out


def geodesic_graph(cost: np.ndarray) -> csr_matrix:
    """The 8-connected graph of ``skimage.graph.MCP_Geometric`` on an (h, w) cost grid, as a sparse matrix over
    the h * w cells (row-major): the edge between two neighbouring cells costs the mean of their costs times the
    step length (1 or sqrt 2). Shortest distances on it (``scipy.sparse.csgraph.dijkstra``) are MCP_Geometric's
    cumulative costs (tested equal), about twice as fast, and the graph is built once per image."""
    h, w = cost.shape
    idx = np.arange(h * w).reshape(h, w)
    flat = cost.ravel()
    rows, cols, weights = [], [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = idx[: h - dy, max(0, -dx) : w - max(0, dx)].ravel()
        b = idx[dy:, max(0, dx) : w - max(0, -dx)].ravel()
        weight = 0.5 * (flat[a] + flat[b]) * float(np.hypot(dy, dx))
        rows += [a, b]
        cols += [b, a]
        weights += [weight, weight]
    return csr_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(h * w, h * w))


def _seed_cells(click: Click, edge_distance: np.ndarray, factor: int) -> list[tuple[int, int]]:
    """Geodesic-grid cells covered by the seed disk of one click."""
    radius = _seed_radius(click, edge_distance)
    yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    dy, dx = np.nonzero(yy**2 + xx**2 <= radius * radius)
    ys = np.clip(click.y + dy - radius, 0, edge_distance.shape[0] - 1) // factor
    xs = np.clip(click.x + dx - radius, 0, edge_distance.shape[1] - 1) // factor
    return sorted({(int(y), int(x)) for y, x in zip(ys, xs)})


def keep_clicked_components(mask: np.ndarray, pos: np.ndarray, fallback: np.ndarray | None) -> np.ndarray:
    """Keep the 8-connected components of ``mask`` touching a positive seed (else those touching ``fallback``)."""
    n, lab, _ = label8(mask)
    if n <= 1:
        return mask
    anchor = pos if pos.any() else fallback
    if anchor is None or not anchor.any():
        return np.zeros_like(mask)
    keep = np.zeros(n, dtype=bool)
    keep[lab[anchor & mask]] = True
    keep[0] = False
    return keep[lab]


class CutWeights(NamedTuple):
    """The contrast-sensitive pairwise weights of the graph cut on one work grid (float64):
    ``vertical[y, x]`` joins pixels (y, x) and (y + 1, x), ``horizontal[y, x]`` joins (y, x) and (y, x + 1);
    ``total[y, x]`` is the sum of the weights of pixel (y, x)'s edges (an upper bound inside any box)."""

    vertical: np.ndarray  # (h - 1, w)
    horizontal: np.ndarray  # (h, w - 1)
    total: np.ndarray  # (h, w)

    def crop(self, box: tuple[slice, slice]) -> CutWeights:
        """The weights of the edges inside ``box`` (two slices with explicit start and stop); ``total`` stays the
        whole grid's, an upper bound."""
        ys, xs = box
        return CutWeights(
            self.vertical[ys.start : ys.stop - 1, xs], self.horizontal[ys, xs.start : xs.stop - 1], self.total[box]
        )


def cut_weights(cut_image: np.ndarray, cut_sigma: float) -> CutWeights:
    """Pairwise weights of ``numpymaxflow.maxflow(cut_image, prob, CUT_LAMBDA, cut_sigma, 4)``: CUT_LAMBDA *
    exp(-|I_p - I_q|^2 / (2 sigma^2)) between 4-neighbours, |.| the Euclidean norm over the (C, h, w) channels."""
    image = cut_image.astype(np.float64)
    dv = ((image[:, 1:, :] - image[:, :-1, :]) ** 2).sum(axis=0)
    dh = ((image[:, :, 1:] - image[:, :, :-1]) ** 2).sum(axis=0)
    scale = -1.0 / (2.0 * cut_sigma * cut_sigma)
    wv, wh = CUT_LAMBDA * np.exp(dv * scale), CUT_LAMBDA * np.exp(dh * scale)
    total = np.zeros(image.shape[1:])
    total[1:] += wv
    total[:-1] += wv
    total[:, 1:] += wh
    total[:, :-1] += wh
    return CutWeights(wv, wh, total)


def graph_cut(unary: np.ndarray, weights: CutWeights) -> np.ndarray:
    """Minimum of the graph-cut energy sum_p -x_p * unary_p + sum_pq w_pq [x_p != x_q] over x in {0, 1}^(h, w), bool.

    ``unary`` (h, w) float64: the foreground log-odds of each pixel (the cost of background minus that of foreground;
    ±inf for hard seeds); ``weights``: :func:`cut_weights` of the same grid (:meth:`CutWeights.crop` for a box).
    The energy of ``numpymaxflow.maxflow`` with ``prob = sigmoid(unary)`` (the same minimum up to exact ties; equal on
    random tests), solved on fewer nodes: a pixel whose log-odds exceed the sum of its pairwise weights in magnitude
    takes its unary's sign in every minimum (flipping it alone lowers the energy), so only the other pixels enter the
    graph, each edge to a decided neighbour folded into the pixel's unary. Max-flow by PyMaxflow (Boykov-Kolmogorov);
    pixels the flow leaves undecided go to background, as in numpymaxflow.
    """
    wv, wh, total = weights
    fg = unary > total
    free = ~fg & (unary >= -total)
    out = fg.copy()
    if not free.any():
        return out
    # Work on the bounding box of the undecided pixels and their neighbours.
    x, y, bw, bh = cv2.boundingRect(free.view(np.uint8))
    y0, y1 = max(y - 1, 0), min(y + bh + 1, free.shape[0])
    x0, x1 = max(x - 1, 0), min(x + bw + 1, free.shape[1])
    box = (slice(y0, y1), slice(x0, x1))
    unary, fg, free = unary[box], fg[box], free[box]
    wv, wh = wv[y0 : y1 - 1, x0:x1], wh[y0:y1, x0 : x1 - 1]
    # An edge to a decided neighbour costs its weight when the pixel takes the other label: it adds to the pixel's
    # log-odds (+ for a foreground neighbour, - for a background one).
    net = _neighbour_sum(wv, wh, fg.astype(np.float64) - (~fg & ~free))
    net += unary
    n = int(np.count_nonzero(free))
    if n:
        nf = net[free]
        ids = np.full(free.shape, -1, np.int64)
        ids[free] = np.arange(n)
        g = maxflow.Graph[float](n, 2 * n)
        nodes = g.add_nodes(n)
        g.add_grid_tedges(nodes, np.maximum(-nf, 0.0), np.maximum(nf, 0.0))  # sink side = foreground
        both_v = free[1:] & free[:-1]
        both_h = free[:, 1:] & free[:, :-1]
        a = np.concatenate([ids[:-1][both_v], ids[:, :-1][both_h]])
        if a.size:
            cap = np.concatenate([wv[both_v], wh[both_h]])
            g.add_edges(a, np.concatenate([ids[1:][both_v], ids[:, 1:][both_h]]), cap, cap)
        g.maxflow()
        fg[free] = g.get_grid_segments(nodes)
    out[box] = fg
    return out


def _neighbour_sum(wv: np.ndarray, wh: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each pixel of an (h, w) grid, the sum over its 4-neighbours q of w_pq * values[q] (float64)."""
    out = np.zeros(values.shape)
    out[1:] += wv * values[:-1]
    out[:-1] += wv * values[1:]
    out[:, 1:] += wh * values[:, :-1]
    out[:, :-1] += wh * values[:, 1:]
    return out


def cut_roi(unary: np.ndarray, anchor: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box (grown by :data:`ROI_MARGIN`) of the possible-foreground components touching ``anchor``.

    Returns ``None`` when that box covers more than :data:`ROI_MAX_FRACTION` of the image (cut everything).
    """
    candidate = (unary > -ROI_UNARY) | anchor
    n, lab, stats = label8(candidate)
    keep = np.zeros(n, dtype=bool)
    keep[lab[anchor]] = True
    keep[0] = False
    if not keep.any():
        return None
    sel = stats[keep]
    y0 = max(int(sel[:, cv2.CC_STAT_TOP].min()) - ROI_MARGIN, 0)
    y1 = min(int((sel[:, cv2.CC_STAT_TOP] + sel[:, cv2.CC_STAT_HEIGHT]).max()) + ROI_MARGIN, unary.shape[0])
    x0 = max(int(sel[:, cv2.CC_STAT_LEFT].min()) - ROI_MARGIN, 0)
    x1 = min(int((sel[:, cv2.CC_STAT_LEFT] + sel[:, cv2.CC_STAT_WIDTH]).max()) + ROI_MARGIN, unary.shape[1])
    if (y1 - y0) * (x1 - x0) > ROI_MAX_FRACTION * unary.size:
        return None
    return slice(y0, y1), slice(x0, x1)


def _settle(
    mask: np.ndarray, logits: np.ndarray, clicks: Sequence[Click], keep: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Final (H, W) mask and logits.

    ``keep`` ((H, W) bool or None): after a positive click, the previous mask outside negative seeds. If the new
    mask drops more than :data:`POSITIVE_REMOVAL_BOUND` of it, ``keep`` is added back whole, so a positive click
    can tighten a leaked boundary but never make the mask collapse. Then the pixel under each click is set to the
    click's sign (the last click on a pixel wins) and the logits get at least :data:`LOGIT_MARGIN` of the mask's
    sign, so ``mask == logits > 0``.
    """
    mask = mask.copy()
    if keep is not None:
        removed = keep & ~mask
        if np.count_nonzero(removed) > POSITIVE_REMOVAL_BOUND * np.count_nonzero(keep):
            mask |= keep
    for c in clicks:
        mask[c.y, c.x] = c.positive
    out = np.array(logits, dtype=np.float32)
    np.maximum(out, LOGIT_MARGIN, out=out, where=mask)
    np.minimum(out, -LOGIT_MARGIN, out=out, where=~mask)
    return mask, out


class EmbeddedSession(ImageSession):
    """Cached features of one image, on one or two work grids.

    Grey images larger than :data:`BLOB_WORK_MAX_SIZE` px per side are encoded on a grid of at most that size;
    a step whose positive seeds sit on thin curves (:func:`ridge_gate` > 0 on that grid) runs on the finer grid of
    :data:`WORK_MAX_SIZE`, whose features are computed the first time a step needs them. Colour images (vessel
    trees) and small images use one grid. :meth:`predict` is a pure function of its arguments; the only state it
    writes are the finer grid's features and memos (deterministic values, safe to share between threads).
    """

    def __init__(self, blob: _GridSession, image: np.ndarray | None = None) -> None:
        self._blob = blob
        self._image = image
        self._thin: _GridSession | None = None
        self._lock = threading.Lock()
        self.shape = blob.shape

    def predict(self, clicks: Sequence[Click], prior_logits: np.ndarray | None = None) -> Prediction:
        """Segment from all clicks so far (see :meth:`ImageSession.predict`).

        Clicks given at once without a prior are applied one at a time, each step chained to the previous one's
        logits, so the answer is the same whether a caller sends all clicks at once or one by one
        (:func:`ibisagent.clicks.predict_in_order` does the latter for any tool).
        """
        check_clicks(clicks, self.shape)
        return _chained(clicks, prior_logits, lambda cs, prior: self._grid(cs)._step(cs, prior))

    def _grid(self, clicks: Sequence[Click]) -> _GridSession:
        """The work grid for a step: the finer one when the positive seeds sit on thin curves."""
        if self._image is None or not any(c.positive for c in clicks):
            return self._blob
        f = self._blob._feats
        pos, _ = seed_masks([Click(c.x // f.factor, c.y // f.factor, c.positive) for c in clicks], f.edge_distance)
        if ridge_gate(f, pos) == 0:
            return self._blob
        with self._lock:
            if self._thin is None:
                self._thin = _GridSession(compute_features(self._image, WORK_MAX_SIZE))
        return self._thin

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) float32 log-odds of an existing mask (±:data:`LLR_CLIP`), to refine it as if the tool had made it."""
        return self._blob.logits_from_mask(mask)


def _chained(clicks: Sequence[Click], prior_logits: np.ndarray | None,
             step: Callable[[Sequence[Click], np.ndarray | None], Prediction]) -> Prediction:
    """``step`` on all clicks, or — several clicks at once without a prior — on each prefix in turn, every step
    chained to the previous one's logits (the same answer as clicks sent one by one)."""
    if prior_logits is None and len(clicks) > 1:
        prediction = step(clicks[:1], None)
        for n in range(2, len(clicks) + 1):
            prediction = step(clicks[:n], prediction.logits)
        return prediction
    return step(clicks, prior_logits)


class _GridSession(ImageSession):
    """The embedded tool on one work grid. :meth:`predict` is a pure function of its arguments; the only state it
    writes are memos of per-click geodesic distances, of tissue groups' weakness (:func:`weak_contrast`) and the graph
    cut's pairwise weights: deterministic values, safe to share between threads."""

    def __init__(self, feats: _Features) -> None:
        self._feats = feats
        self.shape = feats.full_shape if feats.full_shape != (0, 0) else feats.grey.shape
        self._work_shape = feats.grey.shape
        self._geo_cache: dict[tuple[int, int], np.ndarray] = {}
        self._geo_graph: csr_matrix | None = None  # built on the first geodesic distance (deterministic)
        self._weak_memo: dict[tuple[int, int, bytes], float] = {}
        self._weights: CutWeights | None = None  # graph-cut pairwise weights, built on the first cut

    def predict(self, clicks: Sequence[Click], prior_logits: np.ndarray | None = None) -> Prediction:
        """Segment from all clicks so far (see :meth:`ImageSession.predict`).

        Clicks given at once without a prior are applied one at a time, each step chained to the previous one's
        logits, so the answer is the same whether a caller sends all clicks at once or one by one
        (:func:`ibisagent.clicks.predict_in_order` does the latter for any tool).
        """
        check_clicks(clicks, self.shape)
        return _chained(clicks, prior_logits, self._step)

    def _step(self, clicks: Sequence[Click], prior_logits: np.ndarray | None) -> Prediction:
        """One chained step: ``clicks[-1]`` is the new click, ``prior_logits`` the result of ``clicks[:-1]``."""
        f = self._feats
        prior = self._prior(prior_logits)
        if not clicks:
            if prior_logits is None:
                return Prediction(np.zeros(self.shape, bool), np.full(self.shape, -LOGIT_CLIP, np.float32))
            full = self._full_prior(prior_logits)
            return Prediction(full > 0, full)
        work_clicks = clicks if f.factor == 1 else [Click(c.x // f.factor, c.y // f.factor, c.positive) for c in clicks]
        mask, logits, neg = self._predict_work(work_clicks, prior)
        if f.factor > 1:
            logits = upsample(logits, self.shape)
            mask = logits > 0
        keep = None
        if prior_logits is not None and clicks[-1].positive:
            # A positive click is evidence for foreground only: what the previous mask held stays, except under
            # negative clicks' seeds.
            keep = self._full_prior(prior_logits) > 0
            if f.factor > 1:
                neg = block_repeat(neg, f.factor, self.shape)
            keep &= ~neg
        return Prediction(*_settle(mask, logits, clicks, keep))

    def _predict_work(
        self, clicks: Sequence[Click], prior: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mask, logits and negative seeds, (h, w) each on the work grid."""
        f = self._feats
        shape = self._work_shape
        pos, neg, groups = self._seeds(clicks)
        prior_mask = prior > 0 if prior is not None else None
        fg_model = pos | (prior_mask & ~neg) if (prior_mask is not None and not pos.any()) else pos
        unary = intensity_llr(f, fg_model, neg, groups)
        if neg.any() and pos.any():
            d_pos = self._click_distance([c for c in clicks if c.positive])
            d_neg = self._click_distance([c for c in clicks if not c.positive])
            veto = np.clip((d_neg - d_pos) / GEO_SCALE, -GEO_CLIP, GEO_POS_CLIP).astype(np.float32)
            g = -(-shape[0] // f.cost.shape[0])
            unary = unary + block_repeat(veto, g, shape)
        if prior is not None:
            unary = unary + PRIOR_WEIGHT * np.clip(prior, -LOGIT_CLIP, LOGIT_CLIP)
        anchor = pos if pos.any() else (prior_mask if prior_mask is not None else pos)
        roi = cut_roi(unary, anchor) if anchor.any() else None
        box = roi if roi is not None else (slice(0, shape[0]), slice(0, shape[1]))
        u = unary[box].astype(np.float64)
        u[pos[box]] = np.inf
        u[neg[box]] = -np.inf
        label = graph_cut(u, self._cut_weights().crop(box))
        mask = np.zeros(shape, bool)
        mask[box] = keep_clicked_components(label, pos[box], prior_mask[box] if prior_mask is not None else None)
        magnitude = np.maximum(np.abs(unary), LOGIT_MARGIN)
        logits = np.clip(np.where(mask, magnitude, -magnitude), -LOGIT_CLIP, LOGIT_CLIP).astype(np.float32)
        return mask, logits, neg

    def _cut_weights(self) -> CutWeights:
        """The graph cut's pairwise weights on this grid, computed on the first cut (deterministic)."""
        if self._weights is None:
            self._weights = cut_weights(self._feats.cut_image, self._feats.cut_sigma)
        return self._weights

    def _seeds(self, clicks: Sequence[Click]) -> tuple[np.ndarray, np.ndarray, list[TissueGroup]]:
        """Positive and negative seed pixels and the positive clicks' tissue groups, on the work grid.

        Tissue groups for grey blob-like targets only: on thin structures (ridge gate on) and colour images the
        clicks' grey levels vary along one structure, and one pooled histogram does better. When a group's contrast
        is weak (:func:`weak_contrast`), the edge detector cannot see the boundary the seed disks are sized by, so
        every seed shrinks to :data:`WEAK_SEED_RADIUS` (a click on the faint boundary must not claim the other side).
        """
        f = self._feats
        pos, neg = seed_masks(clicks, f.edge_distance)
        blob = f.ridge_strength is not None and ridge_gate(f, pos) == 0
        groups = tissue_groups(f, clicks, pos, self._weak_memo) if blob else []
        if any(g.weakness > 0 for g in groups):
            capped = np.minimum(f.edge_distance, (WEAK_SEED_RADIUS + 0.5) / SEED_EDGE_FRACTION)
            pos, neg = seed_masks(clicks, capped)
            groups = [TissueGroup(g.seeds & pos, g.first, g.weakness) for g in groups]
        return pos, neg, groups

    def _click_distance(self, clicks: Sequence[Click]) -> np.ndarray:
        """Geodesic distance (work-grid pixels, on the coarse cost grid) to the nearest of ``clicks``' seed disks.

        The distance from a union of seeds is the minimum of the per-click distances; each click's is memoised.
        """
        f = self._feats
        g = -(-self._work_shape[0] // f.cost.shape[0])
        out = None
        for c in clicks:
            key = (c.x, c.y)
            dist = self._geo_cache.get(key)
            if dist is None:
                if self._geo_graph is None:
                    self._geo_graph = geodesic_graph(f.cost)
                cells = np.ravel_multi_index(np.array(_seed_cells(c, f.edge_distance, g)).T, f.cost.shape)
                dist = dijkstra(self._geo_graph, indices=cells, min_only=True).reshape(f.cost.shape)
                dist = (dist * g).astype(np.float32)
                if len(self._geo_cache) >= GEO_CACHE_SIZE:
                    self._geo_cache.clear()
                self._geo_cache[key] = dist
            out = dist if out is None else np.minimum(out, dist)
        return out

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) float32 log-odds of an existing mask (±:data:`LLR_CLIP`), to refine it as if the tool had made it."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape:
            raise ValueError(f"mask shape {mask.shape} != image shape {self.shape}")
        return np.where(mask, LLR_CLIP, -LLR_CLIP).astype(np.float32)

    def _full_prior(self, prior_logits: np.ndarray) -> np.ndarray:
        prior = np.squeeze(np.asarray(prior_logits, dtype=np.float32))
        if prior.ndim != 2:
            raise ValueError(f"prior_logits must be (H, W) log-odds, got shape {np.shape(prior_logits)}")
        if prior.shape != self.shape:
            zoom = (self.shape[0] / prior.shape[0], self.shape[1] / prior.shape[1])
            prior = ndimage.zoom(prior, zoom, order=1)[: self.shape[0], : self.shape[1]]
        return np.ascontiguousarray(prior, dtype=np.float32).copy()

    def _prior(self, prior_logits: np.ndarray | None) -> np.ndarray | None:
        """Prior logits on the work grid (resampled when they come at another size)."""
        if prior_logits is None:
            return None
        prior = np.squeeze(np.asarray(prior_logits, dtype=np.float32))
        if prior.ndim != 2:
            raise ValueError(f"prior_logits must be (H, W) log-odds, got shape {np.shape(prior_logits)}")
        if prior.shape != self._work_shape:
            if self._feats.factor > 1 and prior.shape == tuple(self.shape):
                prior = _block_mean(prior, self._feats.factor).astype(np.float32)
            else:
                zoom = (self._work_shape[0] / prior.shape[0], self._work_shape[1] / prior.shape[1])
                prior = ndimage.zoom(prior, zoom, order=1)[: self._work_shape[0], : self._work_shape[1]]
        return prior


class EmbeddedTool(SegmentationTool):
    """CPU click segmenter without weights; ``encode`` computes features, sessions predict in milliseconds."""

    name = "embedded"

    def encode(self, image: np.ndarray) -> EmbeddedSession:
        """Compute the per-image features. ``image``: (H, W, 3) uint8 RGB (``ValueError`` otherwise).

        Grey images above :data:`BLOB_WORK_MAX_SIZE` px per side get features on a grid of at most that size now
        and on the :data:`WORK_MAX_SIZE` grid when a step first needs it (see :class:`EmbeddedSession`).
        """
        image = check_image(image)
        grey = bool((image[:, :, 0] == image[:, :, 1]).all() and (image[:, :, 1] == image[:, :, 2]).all())
        size = max(image.shape[:2])
        two_grids = grey and BLOB_WORK_MAX_SIZE > 0 and -(-size // BLOB_WORK_MAX_SIZE) > -(-size // WORK_MAX_SIZE)
        if not two_grids:
            return EmbeddedSession(_GridSession(compute_features(image, WORK_MAX_SIZE)))
        kept = image.copy()  # the finer grid's features are computed later: from this image, whatever the caller does
        kept.flags.writeable = False
        return EmbeddedSession(_GridSession(compute_features(kept, BLOB_WORK_MAX_SIZE)), kept)
