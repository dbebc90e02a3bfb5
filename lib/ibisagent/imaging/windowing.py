"""Display conversion: any 2D slice -> ``(H, W, 3)`` uint8 RGB, the picture the policy and the tool see."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

CT_WINDOWS: MappingProxyType[str, tuple[float, float]] = MappingProxyType(
    {
        "soft_tissue": (400.0, 40.0),
        "abdomen": (350.0, 50.0),
        "liver": (150.0, 30.0),
        "lung": (1500.0, -600.0),
        "bone": (1800.0, 400.0),
        "brain": (80.0, 40.0),
        "mediastinum": (350.0, 50.0),
    }
)
"""CT window presets, name -> ``(width, level)`` in Hounsfield units."""

DEFAULT_CT_WINDOW = "soft_tissue"
PERCENTILES: tuple[float, float] = (0.5, 99.5)


def window_to_uint8(values: np.ndarray, width: float, level: float) -> np.ndarray:
    """Linear window: ``level - width/2`` -> 0, ``level + width/2`` -> 255, clipped; returns uint8 of same shape."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = level - width / 2.0
    scaled = (values.astype(np.float64) - low) / float(width)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def percentile_to_uint8(values: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """Robust min-max: the ``percentiles`` (default 0.5 and 99.5) of the finite values map to 0 and 255.

    A constant image maps to 0 everywhere; NaNs map to 0.
    """
    data = values.astype(np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = np.percentile(finite, percentiles)
    if high <= low:
        high = low + 1.0 if finite.max() <= low else float(finite.max())
    scaled = np.clip((np.nan_to_num(data, nan=low) - low) / (high - low), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def resolve_window(window: tuple[float, float] | str | None) -> tuple[float, float]:
    """``(width, level)`` from a preset name, an explicit pair, or ``None`` (the soft-tissue default)."""
    if window is None:
        return CT_WINDOWS[DEFAULT_CT_WINDOW]
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(f"unknown CT window preset {window!r}; known: {sorted(CT_WINDOWS)}")
        return CT_WINDOWS[window]
    width, level = window
    return float(width), float(level)


def to_display_rgb(
    slice2d: np.ndarray, modality: str = "", window: tuple[float, float] | str | None = None
) -> np.ndarray:
    """Convert a 2D slice to an ``(H, W, 3)`` uint8 RGB display image.

    Rules, in order:

    * colour ``(H, W, 3|4)``: uint8 passes through (alpha dropped); other dtypes are percentile-scaled.
    * an explicit ``window`` (``(width, level)`` or a preset name from :data:`CT_WINDOWS`) is always applied.
    * ``modality == "CT"`` with signed-integer or float values (Hounsfield units, as loaded from DICOM/NIfTI/NRRD):
      the soft-tissue window W400/L40.
    * uint8 grey passes through (pictures such as PNG ultrasound are already display-ready).
    * anything else (MR, 16-bit PNG, float): robust 0.5-99.5 percentile normalisation.

    Args:
        slice2d: ``(H, W)`` grey or ``(H, W, C)`` colour, indexed ``[y, x]``.
        modality: "CT", "MR", ... (case-insensitive); "" when unknown.
        window: optional CT-style window override.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    arr = np.asarray(slice2d)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if rgb.dtype == np.uint8:
            return np.ascontiguousarray(rgb)
        return percentile_to_uint8(rgb)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"expected a 2D slice (H, W) or colour (H, W, 3), got shape {arr.shape}")
    if window is not None:
        grey = window_to_uint8(arr, *resolve_window(window))
    elif modality.upper() == "CT" and arr.dtype.kind in "if":
        grey = window_to_uint8(arr, *resolve_window(None))
    elif arr.dtype == np.uint8:
        grey = arr
    elif arr.dtype == bool:
        grey = arr.astype(np.uint8) * 255
    else:
        grey = percentile_to_uint8(arr)
    return np.repeat(grey[..., None], 3, axis=-1)
