"""What the policy sees: the image resized to the policy grid and the current masks overlaid on it (DESIGN §2).

One definition of each, used by the environment (:mod:`ibisagent.env`), the SFT/RL data builders and the figures of
:mod:`ibisagent.render`:

* :func:`resize_image` — the image to the *policy grid* (Lanczos), the only image resize in the project;
* :func:`resize_mask` — a mask between grids (nearest neighbour at pixel centres);
* :func:`overlay` — masks blended over the image, one colour per target (:data:`TARGET_COLOURS`, green first, as
  the released checkpoint was trained to read);
* :func:`observation_image` — the three together: the overlay exactly as the policy sees it at a step.

numpy and PIL only: importing this module imports no plotting library and changes no global state.
Arrays are (H, W, 3) uint8 RGB images and (H, W) bool masks; sizes are ``(height, width)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image as PILImage

#: Overlay colours per target index (RGB): green first, as the released checkpoint was trained to read.
TARGET_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 255, 0), (255, 200, 0), (0, 160, 255), (255, 0, 255), (255, 96, 0), (0, 255, 255),
)
#: Opacity of the mask over the image.
OVERLAY_ALPHA = 0.4
#: Interpolation for resizing the image to the policy grid (masks use nearest-neighbour).
IMAGE_RESAMPLING = PILImage.Resampling.LANCZOS


def resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an image to the policy grid.

    Args:
        rgb: (H, W, 3) uint8.
        size: ``(h, w)`` of the result.

    Returns:
        (h, w, 3) uint8, Lanczos (:data:`IMAGE_RESAMPLING`); the input itself when the size already matches.
    """
    if rgb.shape[:2] == tuple(size):
        return rgb
    h, w = size
    return np.asarray(PILImage.fromarray(rgb).resize((w, h), IMAGE_RESAMPLING))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a mask between grids: (H, W) bool → (h, w) bool for ``size`` = ``(h, w)``, nearest neighbour at pixel
    centres (source pixel ``floor((i + 0.5) · H / h)``); the input itself when the size already matches."""
    if mask.shape == tuple(size):
        return mask
    rows = _centre_index(size[0], mask.shape[0])
    cols = _centre_index(size[1], mask.shape[1])
    return mask[np.ix_(rows, cols)]


def _centre_index(n_out: int, n_in: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def overlay(rgb: np.ndarray, masks: Sequence[np.ndarray], alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend masks over an image, one colour per mask (:data:`TARGET_COLOURS`, cycling).

    Args:
        rgb: (H, W, 3) uint8 image.
        masks: (H, W) bool masks, in target order.
        alpha: opacity in [0, 1].

    Returns:
        (H, W, 3) uint8; the input is not modified.

    Raises:
        ValueError: a mask whose shape is not the image's (H, W).
    """
    out = np.asarray(rgb, dtype=np.float32).copy()
    for index, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != out.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} != image shape {out.shape[:2]}")
        colour = np.asarray(TARGET_COLOURS[index % len(TARGET_COLOURS)], dtype=np.float32)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def observation_image(policy_image: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """The overlay the policy sees: ``masks`` (any grid, target order) resized to the grid of ``policy_image``
    ((h, w, 3) uint8, already :func:`resize_image`-d) and blended over it. Returns (h, w, 3) uint8."""
    grid = (int(policy_image.shape[0]), int(policy_image.shape[1]))
    return overlay(policy_image, [resize_mask(np.asarray(m, dtype=bool), grid) for m in masks])


def to_pil(rgb: np.ndarray) -> PILImage.Image:
    """(H, W, 3) uint8 → an RGB ``PIL.Image`` (for processors and trl's image content blocks)."""
    return PILImage.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB")


#: Qwen2.5-VL's patch (14) × merge (2): policy-grid sides are multiples of this.
GRID_FACTOR = 28
#: The authors' image budget for the policy (Qwen2.5-VL smart resize), pixels.
DEFAULT_MAX_PIXELS = 262144
#: Qwen2.5-VL's smallest image, pixels.
DEFAULT_MIN_PIXELS = 56 * 56


def qwen_grid(height: int, width: int, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
              factor: int = GRID_FACTOR) -> tuple[int, int]:
    """The policy grid ``(h, w)`` a Qwen2.5-VL processor gives an ``height`` × ``width`` image: multiples of
    ``factor`` (patch × merge, 28) with ``min_pixels ≤ h·w ≤ max_pixels``, the aspect ratio kept as closely as
    possible. The one definition of the policy grid, used by the ``hf:`` and ``vllm:`` policies, the data builders
    and training.

    This is transformers' ``smart_resize`` (``models/qwen2_vl/image_processing_qwen2_vl.py``) line for line: importing
    that module costs seconds per data worker (it pulls in torchvision), and ``tests/test_data_text.py`` checks the two
    agree on every size up to 600 × 600 pixels.

    Raises:
        ValueError: an aspect ratio above 200 (as transformers).
    """
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MIN_PIXELS", "GRID_FACTOR", "IMAGE_RESAMPLING", "OVERLAY_ALPHA", "TARGET_COLOURS", "observation_image", "overlay", "qwen_grid", "resize_image",
           "resize_mask", "to_pil"]
