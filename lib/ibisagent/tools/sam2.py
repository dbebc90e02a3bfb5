"""SAM 2 / SAM 2.1 and MedSAM2 behind the :class:`SegmentationTool` interface, on the ``sam2`` package.

Set once, query many: :meth:`Sam2Tool.encode` runs the Hiera backbone and the feature preparation of
``SAM2ImagePredictor.set_image`` once and returns a :class:`Sam2Session` holding the image embedding and the
high-resolution features; :meth:`Sam2Session.predict` calls the prompt encoder and the mask decoder directly with
those cached tensors. No ``SAM2ImagePredictor`` (whose ``_features`` is shared mutable state) is involved, so two
threads may predict on two sessions — or on one — at the same time.

Building does not touch Hydra's global state: the config YAML is read with OmegaConf, overrides are applied to it
and ``hydra.utils.instantiate`` builds ``cfg.model`` — the same model ``sam2.build_sam.build_sam2`` builds (with its
post-processing overrides), but safe to repeat, from several threads, next to any other Hydra user.

Sizes, for an input side ``S`` (SAM 2: 1024, MedSAM2: 512):

- image input: (1, 3, S, S), resized without keeping the aspect ratio, ImageNet mean/std (``SAM2Transforms``);
- features: image embedding (1, 256, S/16, S/16), high-res (1, 32, S/4, S/4) and (1, 64, S/8, S/8);
- low-res logits: (1, S/4, S/4) float32 in [-32, 32] (SAM 2: 256, MedSAM2: 128).

Clicks are pixel ``(x, y)`` = (column, row) of the original (H, W) image and reach the prompt encoder as
``(x · S / W, y · S / H)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ibisagent.clicks import Click
from ibisagent.tools.base import ImageSession, Prediction, SegmentationTool, check_clicks, check_image
from ibisagent.tools.sam import (
    EMPTY_LOGIT,
    MAX_LOGIT,
    check_prior,
    click_arrays,
    mask_to_low_res_logits,
    empty_prediction,
    load_weights,
    select_mask,
)

#: MedSAM2 (bowang-lab/MedSAM2, ``sam2.1_hiera_t512.yaml``): SAM 2.1 Hiera-tiny at 512 px.
MEDSAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
MEDSAM2_IMAGE_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: What ``sam2.build_sam.build_sam2(..., apply_postprocessing=True)`` adds: fall back to the best of the multimask
#: outputs when the single-mask output is unstable.
POSTPROCESSING_OVERRIDES: Mapping[str, Any] = {
    "model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability": True,
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta": 0.05,
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh": 0.98,
}


def resolve_config(config: str | Path) -> Path:
    """Find a SAM 2 config: an existing YAML file, or a name inside the ``sam2`` package (as ``build_sam2`` takes it).

    Raises:
        FileNotFoundError: naming the config and listing the packaged ones.
    """
    path = Path(config).expanduser()
    if path.is_file():
        return path
    package = Path(str(resources.files("sam2")))
    for candidate in (package / str(config), package / f"{config}.yaml", package / "configs" / str(config)):
        if candidate.is_file():
            return candidate
    known = sorted(str(p.relative_to(package)) for p in (package / "configs").rglob("*.yaml"))
    raise FileNotFoundError(f"SAM 2 config not found: {config!r}; packaged configs: {', '.join(known)}")


def size_overrides(image_size: int) -> dict[str, Any]:
    """Config overrides for a SAM 2 model at input side ``image_size`` (a multiple of 32).

    ``model.image_size`` sets the prompt encoder's input/embedding sizes and the decoder's; the memory attention's
    RoPE grids (used by video tracking only) follow the S/16 embedding, as in MedSAM2's 512-px config.
    """
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"SAM 2 image size must be a positive multiple of 32, got {image_size}")
    grid = [image_size // 16, image_size // 16]
    return {
        "model.image_size": image_size,
        "model.memory_attention.layer.self_attention.feat_sizes": grid,
        "model.memory_attention.layer.cross_attention.feat_sizes": grid,
    }


def build_sam2_model(
    config: str | Path,
    checkpoint: Path | None = None,
    device: str = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Build a ``sam2.modeling.sam2_base.SAM2Base`` in eval mode, without Hydra's global state.

    Args:
        config: a YAML path or a packaged name such as ``configs/sam2.1/sam2.1_hiera_t.yaml``.
        checkpoint: local checkpoint (``{"model": state_dict}`` or a bare state dict), or ``None`` for random weights.
        device: torch device string.
        overrides: dotted config keys → values, applied after :data:`POSTPROCESSING_OVERRIDES` (like Hydra's ``++``).
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(resolve_config(config))
    if "model" not in cfg:
        raise ValueError(f"SAM 2 config {config!r} has no top-level 'model' section")
    for key, value in {**POSTPROCESSING_OVERRIDES, **(overrides or {})}.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    model_cfg = cfg.model
    OmegaConf.resolve(model_cfg)
    model = instantiate(model_cfg, _recursive_=True)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.to(device).eval()


class Sam2Tool(SegmentationTool):
    """SAM 2 / SAM 2.1 (any packaged config or YAML path) or MedSAM2. Holds weights only.

    Args:
        config: config YAML path or packaged name, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``.
        checkpoint: local checkpoint path, or ``None`` for random weights (shape tests, latency).
        device: torch device string.
        image_size: input side override (``None`` keeps the config's, 1024 for every SAM 2 release).
        name: short name for reports.
    """

    def __init__(
        self,
        config: str = MEDSAM2_CONFIG,
        checkpoint: Path | None = None,
        device: str = "cpu",
        *,
        image_size: int | None = None,
        name: str = "sam2",
    ) -> None:
        self.name = name
        self.config = str(config)
        self.device = torch.device(device)
        overrides = size_overrides(image_size) if image_size is not None else {}
        self.model = build_sam2_model(config, checkpoint, device, overrides)
        #: Side S of the square model input.
        self.image_size: int = int(self.model.image_size)
        #: Side of the low-res logits (S/4).
        self.low_res_size: int = 4 * int(self.model.sam_image_embedding_size)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 → (1, 3, S, S) float on the device: ``SAM2Transforms`` (resize to S×S, bilinear with
        antialiasing, ImageNet mean/std) without its TorchScript module."""
        from torchvision.transforms.functional import normalize, resize

        x = torch.as_tensor(image, device=self.device).permute(2, 0, 1).float().div_(255.0)
        x = resize(x, [self.image_size, self.image_size], antialias=True)
        return normalize(x, IMAGENET_MEAN, IMAGENET_STD)[None]

    @classmethod
    def medsam2(cls, checkpoint: Path | None = None, device: str = "cpu") -> Sam2Tool:
        """MedSAM2: SAM 2.1 Hiera-tiny at 512 px (low-res logits 128×128)."""
        return cls(MEDSAM2_CONFIG, checkpoint, device, image_size=MEDSAM2_IMAGE_SIZE, name="medsam2")

    def encode(self, image: np.ndarray) -> Sam2Session:
        """Run the backbone once (``SAM2ImagePredictor.set_image`` without its mutable state).

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            A :class:`Sam2Session` with the (1, 256, S/16, S/16) embedding and the S/4, S/8 high-res features.
        """
        image = check_image(image)
        shape = (int(image.shape[0]), int(image.shape[1]))
        model = self.model
        with torch.inference_mode():
            x = self.preprocess(image)  # (1, 3, S, S)
            backbone_out = model.forward_image(x)
            _, vision_feats, _, feat_sizes = model._prepare_backbone_features(backbone_out)
            if model.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
            # (HW, 1, C) → (1, C, H, W), sizes taken from the features themselves (S/4, S/8, S/16)
            feats = [f.permute(1, 2, 0).reshape(1, -1, h, w) for f, (h, w) in zip(vision_feats, feat_sizes)]
        expected = self.image_size // 16
        if feats[-1].shape[-2:] != (expected, expected):
            raise RuntimeError(
                f"image embedding {tuple(feats[-1].shape)} does not match the model's {expected}×{expected} grid "
                f"for {self.image_size}-px input"
            )
        return Sam2Session(self, feats[-1], tuple(feats[:-1]), shape)


class Sam2Session(ImageSession):
    """One image encoded by a :class:`Sam2Tool`. Immutable; ``predict`` is safe to call from several threads.

    Attributes:
        shape: (H, W) of the encoded image.
        image_embed: (1, 256, S/16, S/16) (read only).
        high_res_feats: ((1, 32, S/4, S/4), (1, 64, S/8, S/8)) (read only).
    """

    def __init__(
        self,
        tool: Sam2Tool,
        image_embed: torch.Tensor,
        high_res_feats: tuple[torch.Tensor, ...],
        shape: tuple[int, int],
    ) -> None:
        self._tool = tool
        self.image_embed = image_embed
        self.high_res_feats = high_res_feats
        self.shape = shape

    def point_prompts(self, clicks: Sequence[Click]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clicks in the model frame.

        Returns:
            ``(coords, labels)``: (1, N, 2) float32 ``(x · S / W, y · S / H)`` and (1, N) int32 labels (1/0).
        """
        coords, labels = click_arrays(clicks)
        h, w = self.shape
        s = self._tool.image_size
        coords = coords * np.array([s / w, s / h], dtype=np.float32)
        device = self._tool.device
        return torch.as_tensor(coords, device=device)[None], torch.as_tensor(labels, device=device)[None]

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """(1, S/4, S/4) logits encoding an existing (H, W) mask (see :func:`mask_to_low_res_logits`)."""
        s = self._tool.image_size
        return mask_to_low_res_logits(mask, self.shape, (s, s), s, self._tool.low_res_size)

    def predict(self, clicks: Sequence[Click], prior_logits: np.ndarray | None = None) -> Prediction:
        """Segment from all clicks so far (see :meth:`ImageSession.predict`).

        Several masks are requested for a single click (the best by predicted IoU is kept), one otherwise.

        Returns:
            ``Prediction(mask (H, W) bool, logits (1, S/4, S/4) float32 in [-32, 32])``.
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
            sparse, dense = model.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
            low_res, scores, _, _ = model.sam_mask_decoder(
                image_embeddings=self.image_embed,
                image_pe=model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=len(clicks) == 1,
                repeat_image=False,
                high_res_features=list(self.high_res_feats),
            )
            low_res = select_mask(low_res, scores).float().clamp(EMPTY_LOGIT, MAX_LOGIT)
            full = F.interpolate(low_res, self.shape, mode="bilinear", align_corners=False)
            mask = (full[0, 0] > 0.0).cpu().numpy()
            logits = low_res[0].cpu().numpy()
        return Prediction(mask=mask, logits=logits)
