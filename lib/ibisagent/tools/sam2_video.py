"""SAM 2 video propagation through a volume: the key slice's masks carried slice by slice by SAM 2's memory.

The alternative to per-slice agent propagation (:mod:`ibisagent.volume`) when the tool is a :class:`Sam2Tool`:
the agent segments the key slice, then SAM 2's video predictor (memory attention over the frames already tracked)
propagates each target's key mask forward (increasing index) and backward through the slices.

- The video model is ``sam2.sam2_video_predictor.SAM2VideoPredictor`` built from the tool's config exactly as
  ``sam2.build_sam.build_sam2_video_predictor`` builds it (``model._target_`` and its post-processing overrides), at
  the tool's input size (memory-attention RoPE grids S/16, so MedSAM2's 512 px works), without Hydra's global state
  (:func:`ibisagent.tools.sam2.build_sam2_model`). It holds no weights of its own: its parameters and buffers *are*
  the tool's tensors (``load_state_dict(..., assign=True)``), so a checkpointed tool gives a checkpointed video model,
  a random-weight tool a random one, and no memory is doubled.
- Frames come from memory: the inference state that ``SAM2VideoPredictor.init_state`` builds from a JPEG folder is
  built here around a lazy sequence that runs :meth:`Sam2Tool.preprocess` on a slice when the predictor asks for it
  (the predictor caches one frame's features at a time), so nothing is written to disk and a long volume is never
  held as (Z, 3, S, S) floats.
- Each target is one SAM 2 object (``add_new_mask`` on the key frame); targets are tracked independently (SAM 2 runs
  one object at a time with its own memory). A target whose key mask is empty is not tracked: all-False.

Nothing here is global: two propagations (even on one video model) keep their state in their own dicts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ibisagent.tools.base import check_image
from ibisagent.tools.sam2 import Sam2Tool, build_sam2_model, size_overrides

#: What ``sam2.build_sam.build_sam2_video_predictor`` sets on top of the image model's post-processing overrides
#: (which :func:`build_sam2_model` applies itself).
VIDEO_OVERRIDES: Mapping[str, Any] = {
    "model._target_": "sam2.sam2_video_predictor.SAM2VideoPredictor",
    # encode the interacted frame's mask binarized, as the user sees it
    "model.binarize_mask_from_pts_for_mem_enc": True,
    # fill holes up to 8 px in the low-res masks (needs sam2's CUDA extension; switched off where it is missing)
    "model.fill_hole_area": 8,
}


def _can_fill_holes(device: torch.device) -> bool:
    """``fill_holes_in_mask_scores`` needs sam2's compiled ``_C`` and a CUDA tensor; elsewhere it warns every frame."""
    if device.type != "cuda":
        return False
    import importlib.util

    return importlib.util.find_spec("sam2._C") is not None


def build_video_model(tool: Sam2Tool) -> torch.nn.Module:
    """The ``SAM2VideoPredictor`` for ``tool``: same config, input size and (shared, not copied) weights.

    Build once and pass it to :func:`propagate_masks` / :func:`iter_propagation` to avoid rebuilding per volume.
    """
    overrides = {**VIDEO_OVERRIDES, **size_overrides(tool.image_size)}
    if not _can_fill_holes(tool.device):
        overrides["model.fill_hole_area"] = 0
    model = build_sam2_model(tool.config, None, "cpu", overrides)
    # strict: the video predictor adds no parameters to SAM2Base; assign: share the tool's tensors
    model.load_state_dict(tool.model.state_dict(), strict=True, assign=True)
    return model.to(tool.device).eval()


class _Frames:
    """The predictor's ``inference_state["images"]``: ``frames[i]`` → (3, S, S) float, preprocessed on demand."""

    def __init__(self, tool: Sam2Tool, frames: Sequence[np.ndarray]) -> None:
        self._tool = tool
        self._frames = frames

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._tool.preprocess(self._frames[index])[0]


def _inference_state(model: torch.nn.Module, tool: Sam2Tool, frames: Sequence[np.ndarray]) -> dict[str, Any]:
    """What ``SAM2VideoPredictor.init_state`` returns (sam2 1.1.0), with in-memory frames and no warm-up."""
    height, width = frames[0].shape[:2]
    device = model.device
    return {
        "images": _Frames(tool, frames),
        "num_frames": len(frames),
        "offload_video_to_cpu": False,
        "offload_state_to_cpu": False,
        "video_height": int(height),
        "video_width": int(width),
        "device": device,
        "storage_device": device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


def check_inputs(
    frames: Sequence[np.ndarray], key_index: int, key_masks: Mapping[str, np.ndarray]
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Validate propagation inputs; returns the frames as a list and the key masks as (H, W) bool arrays.

    Raises:
        ValueError: no frames, a frame that is not (H, W, 3) uint8, frames of different sizes, ``key_index`` outside
            the frames, or a key mask whose shape is not the frames' (H, W).
    """
    frames = [check_image(f) for f in frames]
    if not frames:
        raise ValueError("no frames to propagate through")
    shape = frames[0].shape[:2]
    for i, frame in enumerate(frames):
        if frame.shape[:2] != shape:
            raise ValueError(f"frame {i} is {frame.shape[:2]}, frame 0 is {shape}: all frames must share one size")
    if isinstance(key_index, bool) or not isinstance(key_index, (int, np.integer)):
        raise ValueError(f"key index must be an int, got {key_index!r}")
    if not 0 <= key_index < len(frames):
        raise ValueError(f"key index {key_index} is outside the {len(frames)} frames")
    masks: dict[str, np.ndarray] = {}
    for name, mask in key_masks.items():
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"key mask for {name!r} is {mask.shape}, the frames are {shape}")
        masks[name] = mask.astype(bool, copy=False)
    return frames, masks


def iter_propagation(
    tool: Sam2Tool,
    frames: Sequence[np.ndarray],
    key_index: int,
    key_masks: Mapping[str, np.ndarray],
    *,
    video_model: torch.nn.Module | None = None,
) -> Iterator[tuple[int, bool, dict[str, np.ndarray]]]:
    """Propagate as :func:`propagate_masks` does, yielding each frame as it is tracked.

    Yields:
        ``(frame_index, reverse, masks)``: first forward ``key_index, key_index + 1, …, Z - 1`` (``reverse`` False),
        then backward ``key_index, key_index - 1, …, 0`` (``reverse`` True; nothing when ``key_index`` is 0);
        ``masks`` maps each *tracked* target (non-empty key mask) to its (H, W) bool mask on that frame.
        The key frame's masks are the key masks as SAM 2 holds them (resized to S/4 and back).
    """
    frames, masks = check_inputs(frames, key_index, key_masks)
    tracked = [name for name, mask in masks.items() if mask.any()]
    if not tracked:
        return
    model = video_model if video_model is not None else build_video_model(tool)
    if int(model.image_size) != tool.image_size:
        raise ValueError(f"video model input {model.image_size} px does not match the tool's {tool.image_size} px")
    # add_new_mask and propagate_in_video run under their own inference_mode (per step, so nothing leaks to the
    # caller between yields, which a ``with`` around the yields would do)
    state = _inference_state(model, tool, frames)
    for obj_id, name in enumerate(tracked):
        model.add_new_mask(state, frame_idx=int(key_index), obj_id=obj_id, mask=torch.from_numpy(masks[name]))
    for reverse in (False, True):
        for frame_idx, obj_ids, video_res_masks in model.propagate_in_video(
            state, start_frame_idx=int(key_index), reverse=reverse
        ):
            binary = (video_res_masks[:, 0] > 0.0).cpu().numpy()
            yield int(frame_idx), reverse, {tracked[obj_id]: binary[i] for i, obj_id in enumerate(obj_ids)}


def propagate_masks(
    tool: Sam2Tool,
    frames: Sequence[np.ndarray],
    key_index: int,
    key_masks: Mapping[str, np.ndarray],
    *,
    video_model: torch.nn.Module | None = None,
) -> dict[str, np.ndarray]:
    """Carry the key slice's masks through all frames with SAM 2's video predictor, forward then backward.

    Args:
        tool: the SAM 2 / MedSAM2 tool whose config, input size, device and weights to use.
        frames: (H, W, 3) uint8 slices in order (e.g. :func:`ibisagent.volume.slice_rgb` of each slice).
        key_index: the frame the key masks belong to.
        key_masks: target name → (H, W) bool mask on the key frame.
        video_model: from :func:`build_video_model` (built per call when omitted).

    Returns:
        Target name → (Z, H, W) bool, one entry per key mask (all-False for an empty key mask).

    Raises:
        ValueError: see :func:`check_inputs`; or a ``video_model`` of another input size than the tool's.
    """
    frames, masks = check_inputs(frames, key_index, key_masks)
    height, width = frames[0].shape[:2]
    out = {name: np.zeros((len(frames), height, width), dtype=bool) for name in masks}
    for frame_idx, _reverse, frame_masks in iter_propagation(tool, frames, key_index, masks, video_model=video_model):
        for name, mask in frame_masks.items():
            out[name][frame_idx] = mask
    return out
