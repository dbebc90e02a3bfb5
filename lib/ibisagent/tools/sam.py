"""Segment Anything (SAM ViT-B/L/H) and MedSAM behind the :class:`SegmentationTool` interface.

Set once, query many: :meth:`SamTool.encode` runs the ViT image encoder once and returns a :class:`SamSession`
holding the (1, 256, 64, 64) image embedding; :meth:`SamSession.predict` runs only the prompt encoder and the mask
decoder against that cached embedding. Sessions never write to the tool or the model, so any number of threads
may predict on any number of sessions at the same time.

Two input pipelines:

- ``"sam"`` (SAM, as ``segment_anything.SamPredictor``): resize the longest side to 1024 (``ResizeLongestSide``),
  normalise with SAM's pixel mean/std, zero-pad to 1024×1024; masks are cropped back out of the padded frame.
- ``"medsam"`` (MedSAM's released inference): resize to 1024×1024 (aspect not kept), min–max normalise to [0, 1]
  per image, no mean/std; low-res logits are resized straight to the original (H, W). Grayscale images come in as
  (H, W, 3) RGB with three equal channels.

Coordinates: clicks are pixel ``(x, y)`` = (column, row) of the original image and reach the prompt encoder as
``(x, y)`` in the 1024-px model frame (scaled per axis). Low-res logits are (1, 256, 256) float32 and go back in as
``mask_input`` when passed as the next call's ``prior_logits``.

The helpers at the top (click arrays, prior checking, best-mask selection, the empty prediction) are shared with
:mod:`ibisagent.tools.sam2`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ibisagent.clicks import Click
from ibisagent.tools.base import ImageSession, Prediction, SegmentationTool, check_clicks, check_image

#: The floor of the SAM family's low-res logits (SAM 2 clamps to [-32, 32]; so do these tools). The logits of an
#: empty prediction (no clicks, no prior) are all ``EMPTY_LOGIT``, and a prior whose values are all ``<= EMPTY_LOGIT``
#: is treated as no prior, so that "empty → first click" behaves exactly like a first click without a prior.
EMPTY_LOGIT = -32.0
MAX_LOGIT = 32.0

SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
Preprocess = Literal["sam", "medsam"]


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by the SAM family (also used by ibisagent.tools.sam2)
# ---------------------------------------------------------------------------------------------------------------


def click_arrays(clicks: Sequence[Click]) -> tuple[np.ndarray, np.ndarray]:
    """Clicks as SAM point prompts.

    Returns:
        ``(coords, labels)``: (N, 2) float32 pixel ``(x, y)`` and (N,) int32 labels (1 positive, 0 negative).
    """
    coords = np.array([[c.x, c.y] for c in clicks], dtype=np.float32).reshape(-1, 2)
    labels = np.array([1 if c.positive else 0 for c in clicks], dtype=np.int32)
    return coords, labels


def check_prior(prior_logits: np.ndarray | None, size: int) -> np.ndarray | None:
    """Validate a prior and shape it as a ``mask_input``.

    Args:
        prior_logits: ``None``, or low-res logits (size, size), (1, size, size) or (1, 1, size, size).
        size: the model's low-res mask side (SAM and SAM 2 at 1024 px: 256; MedSAM2 at 512 px: 128).

    Returns:
        ``None`` (no prior, or an empty prior: every value ``<= EMPTY_LOGIT``), else (1, 1, size, size) float32.
    """
    if prior_logits is None:
        return None
    prior = np.asarray(prior_logits, dtype=np.float32)
    if prior.shape not in ((size, size), (1, size, size), (1, 1, size, size)):
        raise ValueError(
            f"prior_logits must be the previous prediction's (1, {size}, {size}) low-res logits, "
            f"got shape {prior.shape}"
        )
    if not np.isfinite(prior).all():
        raise ValueError("prior_logits contain NaN or infinite values")
    if prior.max() <= EMPTY_LOGIT:
        return None
    return prior.reshape(1, 1, size, size)


def empty_prediction(shape: tuple[int, int], size: int) -> Prediction:
    """The answer to no clicks and no prior: an empty (H, W) mask and (1, size, size) logits all ``EMPTY_LOGIT``."""
    return Prediction(
        mask=np.zeros(shape, dtype=bool),
        logits=np.full((1, size, size), EMPTY_LOGIT, dtype=np.float32),
    )


#: Magnitude of the logits that encode an existing mask (a confident mask, well inside the clamp range).
MASK_PRIOR_LOGIT = 10.0


def mask_to_low_res_logits(
    mask: np.ndarray, shape: tuple[int, int], input_size: tuple[int, int], image_size: int, low_res_size: int
) -> np.ndarray:
    """Encode an (H, W) bool mask as the model's low-res logits, to start refinement from it.

    The mask follows the image's path into the model frame (resized to ``input_size`` = (h, w), zero-padded to
    ``image_size`` square) and is area-averaged down to ``low_res_size``; a fraction f of foreground becomes the
    logit ``(2f - 1) · MASK_PRIOR_LOGIT``.

    Returns:
        (1, low_res_size, low_res_size) float32.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(shape):
        raise ValueError(f"mask shape {mask.shape} != image shape {tuple(shape)}")
    h, w = input_size
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    m = F.interpolate(m, (h, w), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, image_size - w, 0, image_size - h))
    m = F.interpolate(m, (low_res_size, low_res_size), mode="area")
    return ((2.0 * m[0] - 1.0) * MASK_PRIOR_LOGIT).numpy().astype(np.float32)


def select_mask(low_res: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The highest-scoring mask: (1, C, L, L) logits and (1, C) scores → (1, 1, L, L)."""
    best = int(torch.argmax(scores[0]).item())
    return low_res[:, best : best + 1]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a local checkpoint's state dict on the CPU (``weights_only``: no code is unpickled).

    Accepts a bare state dict or one wrapped under ``"model"`` (SAM 2, MedSAM2) or ``"state_dict"``.
    """
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict):
        raise RuntimeError(f"checkpoint {path} does not hold a state dict (got {type(checkpoint).__name__})")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load ``path`` into ``model`` strictly; a key mismatch raises ``RuntimeError`` naming the first keys."""
    state = load_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {path} does not fit the model: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:5]}, {len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}"
        )


# ---------------------------------------------------------------------------------------------------------------
# SAM / MedSAM
# ---------------------------------------------------------------------------------------------------------------


def build_sam_model(model_type: str, checkpoint: Path | None, device: str = "cpu") -> torch.nn.Module:
    """Build a ``segment_anything.modeling.Sam`` in eval mode on ``device``.

    Args:
        model_type: ``vit_b``, ``vit_l`` or ``vit_h``.
        checkpoint: a local state-dict file, or ``None`` for random weights.
    """
    if model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {', '.join(SAM_MODEL_TYPES)}")
    from segment_anything import sam_model_registry

    model = sam_model_registry[model_type](checkpoint=None)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.to(device).eval()


class SamTool(SegmentationTool):
    """SAM (ViT-B/L/H) or MedSAM (ViT-B fine-tune, MedSAM preprocessing). Holds weights only.

    Args:
        model_type: ``vit_b``, ``vit_l`` or ``vit_h``.
        checkpoint: local checkpoint path, or ``None`` for random weights (shape tests, latency).
        device: torch device string, e.g. ``"cpu"`` or ``"cuda:0"``.
        preprocess: ``"sam"`` (longest side 1024, mean/std, pad) or ``"medsam"`` (1024×1024, min–max to [0, 1]).
        name: short name for reports.
    """

    def __init__(
        self,
        model_type: str = "vit_b",
        checkpoint: Path | None = None,
        device: str = "cpu",
        *,
        preprocess: Preprocess = "sam",
        name: str = "sam",
    ) -> None:
        if preprocess not in ("sam", "medsam"):
            raise ValueError(f"unknown SAM preprocessing {preprocess!r}; expected 'sam' or 'medsam'")
        self.name = name
        self.model_type = model_type
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.model = build_sam_model(model_type, checkpoint, device)
        #: Side of the square model input (1024 for every released SAM / MedSAM).
        self.image_size: int = int(self.model.image_encoder.img_size)
        #: Side of the low-res logits: 4 × the image-embedding side (256 at 1024 px).
        self.low_res_size: int = 4 * int(self.model.prompt_encoder.image_embedding_size[0])

    @classmethod
    def medsam(cls, checkpoint: Path | None = None, device: str = "cpu") -> SamTool:
        """MedSAM: SAM ViT-B fine-tuned on medical images, with MedSAM's own preprocessing."""
        return cls(model_type="vit_b", checkpoint=checkpoint, device=device, preprocess="medsam", name="medsam")

    def input_size(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of an (H, W) image inside the model's 1024-px input frame (before padding)."""
        if self.preprocess == "medsam":
            return (self.image_size, self.image_size)
        from segment_anything.utils.transforms import ResizeLongestSide

        return ResizeLongestSide.get_preprocess_shape(shape[0], shape[1], self.image_size)

    def encode(self, image: np.ndarray) -> SamSession:
        """Run the image encoder once.

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            A :class:`SamSession` holding the (1, 256, 64, 64) embedding.
        """
        image = check_image(image)
        shape = (int(image.shape[0]), int(image.shape[1]))
        input_size = self.input_size(shape)
        with torch.inference_mode():
            x = self._preprocess(image, input_size)
            embedding = self.model.image_encoder(x)
        return SamSession(self, embedding, shape, input_size)

    def _preprocess(self, image: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
        """(H, W, 3) uint8 → (1, 3, 1024, 1024) float on the model's device."""
        if self.preprocess == "medsam":
            x = torch.as_tensor(image, device=self.device).permute(2, 0, 1)[None].float()
            x = F.interpolate(x, input_size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)
            lo, hi = x.min(), x.max()
            return (x - lo) / torch.clamp(hi - lo, min=1e-8)
        from segment_anything.utils.transforms import ResizeLongestSide

        resized = ResizeLongestSide(self.image_size).apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None].float()
        return self.model.preprocess(x)  # (x - mean) / std, zero-pad to image_size × image_size


class SamSession(ImageSession):
    """One image encoded by a :class:`SamTool`. Immutable; ``predict`` is safe to call from several threads.

    Attributes:
        shape: (H, W) of the encoded image.
        input_size: (h, w) of the image inside the model's 1024-px frame.
        embedding: (1, 256, 64, 64) image embedding (read only).
    """

    def __init__(self, tool: SamTool, embedding: torch.Tensor, shape: tuple[int, int], input_size: tuple[int, int]):
        self._tool = tool
        self.embedding = embedding
        self.shape = shape
        self.input_size = input_size

    def point_prompts(self, clicks: Sequence[Click]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clicks in the model frame.

        Returns:
            ``(coords, labels)``: (1, N, 2) float32 ``(x, y)`` in model-input pixels (x scaled by w/W, y by h/H),
            and (1, N) int32 labels.
        """
        coords, labels = click_arrays(clicks)
        (h, w), (oh, ow) = self.input_size, self.shape
        coords = coords * np.array([w / ow, h / oh], dtype=np.float32)
        device = self._tool.device
        return torch.as_tensor(coords, device=device)[None], torch.as_tensor(labels, device=device)[None]

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """(1, 256, 256) logits encoding an existing (H, W) mask (see :func:`mask_to_low_res_logits`)."""
        tool = self._tool
        return mask_to_low_res_logits(mask, self.shape, self.input_size, tool.image_size, tool.low_res_size)

    def predict(self, clicks: Sequence[Click], prior_logits: np.ndarray | None = None) -> Prediction:
        """Segment from all clicks so far (see :meth:`ImageSession.predict`).

        Several masks are requested for a single click (the best by predicted IoU is kept), one otherwise.

        Returns:
            ``Prediction(mask (H, W) bool, logits (1, 256, 256) float32 in [-32, 32])``.
        """
        clicks = list(clicks)
        check_clicks(clicks, self.shape)
        tool = self._tool
        prior = check_prior(prior_logits, tool.low_res_size)
        if not clicks and prior is None:
            return empty_prediction(self.shape, tool.low_res_size)
        model = tool.model
        with torch.inference_mode():
            points = self.point_prompts(clicks) if clicks else None
            mask_input = torch.as_tensor(prior, device=tool.device) if prior is not None else None
            sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=mask_input)
            low_res, scores = model.mask_decoder(
                image_embeddings=self.embedding,
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=len(clicks) == 1,
            )
            low_res = select_mask(low_res, scores).clamp(EMPTY_LOGIT, MAX_LOGIT)
            if tool.preprocess == "medsam":
                full = F.interpolate(low_res, self.shape, mode="bilinear", align_corners=False)
            else:
                full = model.postprocess_masks(low_res, self.input_size, self.shape)
            mask = (full[0, 0] > model.mask_threshold).cpu().numpy()
            logits = low_res[0].float().cpu().numpy()
        return Prediction(mask=mask, logits=logits)
