"""Display conversion: any 2D slice -> ``(H, W, 3)`` uint8 RGB, the picture the policy and the tool see."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

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

#: The automatic CT rule (:func:`looks_like_hounsfield`): the air band, the HU range of body tissue, and how much of
#: a volume must fall in each.
HU_AIR_BAND: tuple[float, float] = (-1100.0, -700.0)
HU_RANGE: tuple[float, float] = (-1100.0, 3100.0)
MIN_AIR_FRACTION = 0.005
MIN_IN_RANGE_FRACTION = 0.95


@dataclass(frozen=True)
class DisplayWindow:
    """How :func:`to_display_rgb` turns stored values into grey levels (what the policy and the tool see).

    Attributes:
        kind: ``"window"`` (linear ``width``/``level`` in stored units, e.g. the CT window in HU),
            ``"percentile"`` (robust 0.5-99.5 % stretch), ``"as_stored"`` (uint8 grey or colour shown as is),
            ``"binary"`` (bool → 0/255).
        width, level: of a ``"window"``; ``None`` otherwise.
        name: the preset name of a window (a key of :data:`CT_WINDOWS`) when it is one.
    """

    kind: Literal["window", "percentile", "as_stored", "binary"]
    width: float | None = None
    level: float | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form recorded in traces and replies, e.g. ``{"kind": "window", "width": 400.0, "level": 40.0,
        "name": "soft_tissue"}`` or ``{"kind": "percentile", "percentiles": [0.5, 99.5]}``."""
        if self.kind == "window":
            return {"kind": "window", "width": self.width, "level": self.level, "name": self.name}
        if self.kind == "percentile":
            return {"kind": "percentile", "percentiles": list(PERCENTILES)}
        return {"kind": self.kind}

    def describe(self) -> str:
        """One line for logs: ``"window W400/L40 (soft_tissue)"``, ``"percentile 0.5-99.5"``, ``"as stored"``."""
        if self.kind == "window":
            return f"window W{self.width:g}/L{self.level:g}" + (f" ({self.name})" if self.name else "")
        if self.kind == "percentile":
            return f"percentile {PERCENTILES[0]:g}-{PERCENTILES[1]:g}"
        return self.kind.replace("_", " ")


def looks_like_hounsfield(values: np.ndarray) -> bool:
    """The automatic rule for images without a modality: do the values look like CT in Hounsfield units?

    True when the values are signed integers or floats and, ignoring voxels equal to the minimum (padding outside the
    scanner's field of view, e.g. -1024, -2048, -3024), at least :data:`MIN_AIR_FRACTION` (0.5 %) of them lie in the
    air band :data:`HU_AIR_BAND` (-1100..-700 HU: air is -1000 HU, aerated lung -700..-900; a smoothed or
    downsampled CT's air reads above -900) and at least :data:`MIN_IN_RANGE_FRACTION` (95 %)
    lie in :data:`HU_RANGE` (-1100..3100 HU, air to dense bone). MR, PET and pictures (non-negative, or
    intensity-normalised to a few units) fail the air test; wide symmetric ranges such as MR phase fail the range test.
    A CT crop without any air is not recognised: give the modality explicitly.

    Args:
        values: any array (a whole volume, a slice); NaN and inf are ignored.
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in "if" or arr.size == 0:
        return False
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr.ravel()
    if finite.size == 0:
        return False
    body = finite[finite != finite.min()]
    if body.size == 0:
        return False
    air = np.count_nonzero((body >= HU_AIR_BAND[0]) & (body <= HU_AIR_BAND[1])) / body.size
    in_range = np.count_nonzero((body >= HU_RANGE[0]) & (body <= HU_RANGE[1])) / body.size
    return bool(air >= MIN_AIR_FRACTION and in_range >= MIN_IN_RANGE_FRACTION)


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


def display_window(
    slice2d: np.ndarray, modality: str = "", window: tuple[float, float] | str | None = None
) -> DisplayWindow:
    """The rule :func:`to_display_rgb` applies to ``slice2d`` (same arguments); see there for the order of rules."""
    arr = np.asarray(slice2d)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return DisplayWindow("as_stored") if arr.dtype == np.uint8 else DisplayWindow("percentile")
    if window is not None or (modality.upper() == "CT" and arr.dtype.kind in "if"):
        width, level = resolve_window(window)
        name = window if isinstance(window, str) else (DEFAULT_CT_WINDOW if window is None else None)
        return DisplayWindow("window", width, level, name)
    if arr.dtype == np.uint8:
        return DisplayWindow("as_stored")
    if arr.dtype == bool:
        return DisplayWindow("binary")
    return DisplayWindow("percentile")


def to_display_rgb(
    slice2d: np.ndarray, modality: str = "", window: tuple[float, float] | str | None = None
) -> np.ndarray:
    """Convert a 2D slice to an ``(H, W, 3)`` uint8 RGB display image.

    Rules, in order (:func:`display_window` names the one applied):

    * colour ``(H, W, 3|4)``: uint8 passes through (alpha dropped); other dtypes are percentile-scaled.
    * an explicit ``window`` (``(width, level)`` or a preset name from :data:`CT_WINDOWS`) is always applied.
    * ``modality == "CT"`` with signed-integer or float values (Hounsfield units, as loaded from DICOM/NIfTI/NRRD):
      the soft-tissue window W400/L40. :func:`ibisagent.imaging.load_image` sets ``"CT"`` from DICOM tags, from
      its ``modality`` argument, or for volumes without one by :func:`looks_like_hounsfield`.
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
    rule = display_window(arr, modality, window)
    if rule.kind == "window":
        grey = window_to_uint8(arr, rule.width, rule.level)  # type: ignore[arg-type]
    elif rule.kind == "as_stored":
        grey = arr
    elif rule.kind == "binary":
        grey = arr.astype(np.uint8) * 255
    else:
        grey = percentile_to_uint8(arr)
    return np.repeat(grey[..., None], 3, axis=-1)
