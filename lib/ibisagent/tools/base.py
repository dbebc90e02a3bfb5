"""The one interface every click-driven segmenter implements.

Set-once / query-many, as in SAM's predictor, but without hidden state on the tool: ``tool.encode(image)``
does the expensive per-image work once and returns an :class:`ImageSession`; ``session.predict(clicks,
prior_logits)`` is cheap and may be called any number of times, from any thread. A tool object holds only
weights/configuration and is shared by concurrent requests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ibisagent.clicks import Click


@dataclass(frozen=True)
class Prediction:
    """A tool's answer to one set of clicks.

    Attributes:
        mask: (H, W) bool, in the pixel grid of the encoded image.
        logits: float32 array in the tool's own layout (SAM family: (1, 256, 256) low-res mask logits;
            embedded: (H, W) foreground log-odds). Pass it back unchanged as ``prior_logits`` of the next call.
    """

    mask: np.ndarray
    logits: np.ndarray


class ImageSession(ABC):
    """The cached encoding of one image. Immutable after construction; safe to share between threads."""

    #: (H, W) of the encoded image.
    shape: tuple[int, int]

    @abstractmethod
    def predict(self, clicks: Sequence[Click], prior_logits: np.ndarray | None = None) -> Prediction:
        """Segment from all clicks so far.

        Args:
            clicks: every click of the trajectory so far, in order, pixel ``(x, y)`` in the encoded image.
            prior_logits: the previous call's ``Prediction.logits`` (or ``None`` on the first call).

        Returns:
            The new :class:`Prediction`. With no clicks and no prior the mask is empty.
        """

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """Logits in this tool's layout that encode ``mask`` ((H, W) bool), to start refinement of an existing mask.

        Passing them as ``prior_logits`` to :meth:`predict` continues from that mask as if the tool had made it.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot start from an existing mask")


class SegmentationTool(ABC):
    """A click-driven segmenter. Subclasses hold weights/config only, never per-image state."""

    #: Short name used in specs, trajectories and reports, e.g. ``"embedded"`` or ``"medsam2"``.
    name: str

    @abstractmethod
    def encode(self, image: np.ndarray) -> ImageSession:
        """Run the expensive per-image work once.

        Args:
            image: (H, W, 3) uint8 RGB, already windowed for display (see :mod:`ibisagent.imaging`).
        """


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate a tool input image: (H, W, 3) uint8. Raises ``ValueError`` naming the problem."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"tool images must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"tool images must be uint8, got dtype {image.dtype}")
    return image


def check_clicks(clicks: Sequence[Click], shape: tuple[int, int]) -> None:
    """Raise ``ValueError`` for a click outside an image of ``shape`` = (H, W)."""
    h, w = shape
    for click in clicks:
        if not (0 <= click.x < w and 0 <= click.y < h):
            raise ValueError(f"click (x={click.x}, y={click.y}) is outside the {w}x{h} image")
