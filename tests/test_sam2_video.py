"""SAM 2 video propagation (:mod:`ibisagent.tools.sam2_video`) with random weights on CPU.

Random weights give meaningless masks off the key frame, so only plumbing is checked: shapes, dtypes, frame order
and coverage in both directions, the key frame keeping its key mask, weights shared with the tool, input errors.
MedSAM2 (512 px) and SAM 2.1-tiny at 256 px keep this fast (~2 s a propagation); SAM 2.1-tiny at its own 1024 px
(~30 s a target on two cores) is ``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ibisagent.tools.sam2 import Sam2Tool
from ibisagent.tools.sam2_video import build_video_model, iter_propagation, propagate_masks

SAM2_T = "configs/sam2.1/sam2.1_hiera_t.yaml"
Z, H, W = 6, 96, 128


def _frames(z: int = Z, h: int = H, w: int = W) -> list[np.ndarray]:
    """A bright disc drifting across dark noise, one (H, W, 3) uint8 frame per slice."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    frames = []
    for k in range(z):
        frame = rng.integers(0, 50, (h, w, 3), dtype=np.uint8)
        frame[(yy - h / 2) ** 2 + (xx - w / 3 - 3 * k) ** 2 < (h / 5) ** 2] += 180
        frames.append(frame)
    return frames


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


KEY_MASKS = {"lesion": _box(30, 66, 25, 60), "organ": _box(5, 25, 80, 120)}


@pytest.fixture(scope="module")
def medsam2() -> tuple[Sam2Tool, torch.nn.Module]:
    tool = Sam2Tool.medsam2(None)
    return tool, build_video_model(tool)


@pytest.fixture(scope="module")
def sam2_t256() -> tuple[Sam2Tool, torch.nn.Module]:
    tool = Sam2Tool(SAM2_T, None, image_size=256)
    return tool, build_video_model(tool)


def _check_volume(out: dict[str, np.ndarray], key: int, key_masks: dict[str, np.ndarray], z: int = Z) -> None:
    assert set(out) == set(key_masks)
    for name, volume in out.items():
        assert volume.shape == (z, H, W)
        assert volume.dtype == bool
        mask = key_masks[name]
        if not mask.any():
            assert not volume.any()  # an empty key mask is not tracked
            continue
        got = volume[key]
        assert got.any()
        # the key frame is the key mask as SAM 2 holds it (S/4 logits, resized back): the same region
        assert (got & mask).sum() / (got | mask).sum() > 0.9


def _run(tool, model, frames, key, masks):
    """``iter_propagation`` → ((frame, reverse) order, the volumes it fills, whether inference mode leaked)."""
    order, leaked = [], False
    volumes = {name: np.zeros((len(frames), H, W), dtype=bool) for name in masks}
    for frame_idx, reverse, frame_masks in iter_propagation(tool, frames, key, masks, video_model=model):
        leaked |= torch.is_inference_mode_enabled()
        assert all(m.shape == (H, W) and m.dtype == bool for m in frame_masks.values())
        assert set(frame_masks) == {n for n, m in masks.items() if m.any()}
        order.append((frame_idx, reverse))
        for name, mask in frame_masks.items():
            volumes[name][frame_idx] = mask
    return order, volumes, leaked


KEY = 2


@pytest.fixture(scope="module")
def medsam2_run(medsam2):
    """One MedSAM2 propagation of two targets from frame 2 of 6, shared by the tests below."""
    tool, model = medsam2
    return _run(tool, model, _frames(), KEY, KEY_MASKS)


def test_video_model_shares_the_tools_weights(medsam2) -> None:
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    tool, model = medsam2
    assert isinstance(model, SAM2VideoPredictor)
    assert model.image_size == tool.image_size == 512
    assert not model.training
    ours, theirs = model.state_dict(), tool.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() for k in ours)
    # memory-attention RoPE grid follows the S/16 embedding (32 × 32 at 512 px)
    assert model.memory_attention.layers[0].self_attn.freqs_cis.shape[0] == (512 // 16) ** 2
    assert model.binarize_mask_from_pts_for_mem_enc


def test_medsam2_two_targets_shapes_and_key_frame(medsam2_run) -> None:
    _, volumes, _ = medsam2_run
    _check_volume(volumes, KEY, KEY_MASKS)


def test_forward_then_backward_cover_all_frames(medsam2_run) -> None:
    order, _, leaked = medsam2_run
    assert not leaked  # no inference mode leaks to the caller between frames
    forward = [f for f, r in order if not r]
    backward = [f for f, r in order if r]
    assert forward == list(range(KEY, Z))
    assert backward == list(range(KEY, -1, -1))
    assert order == [(f, False) for f in forward] + [(f, True) for f in backward]
    assert set(forward) == set(range(KEY, Z)) and set(backward) == set(range(0, KEY + 1))


def test_sam2_tiny_at_256_with_an_empty_target(sam2_t256) -> None:
    tool, model = sam2_t256
    masks = {**KEY_MASKS, "gone": np.zeros((H, W), dtype=bool)}
    out = propagate_masks(tool, _frames(), KEY, masks, video_model=model)
    _check_volume(out, KEY, masks)


@pytest.mark.parametrize("key", [0, 2])
def test_key_at_either_end(medsam2, key: int) -> None:
    tool, model = medsam2
    masks = {"lesion": KEY_MASKS["lesion"]}
    order, volumes, _ = _run(tool, model, _frames(z=3), key, masks)
    if key == 0:
        assert order == [(0, False), (1, False), (2, False)]  # SAM 2 skips the backward pass from frame 0
    else:
        assert order == [(2, False), (2, True), (1, True), (0, True)]
    _check_volume(volumes, key, masks, z=3)


def test_nothing_to_track(medsam2) -> None:
    tool, _ = medsam2
    empty = np.zeros((H, W), dtype=bool)
    # nothing to track: the video model is never touched (a sentinel would fail if it were)
    out = propagate_masks(tool, _frames(), 1, {"gone": empty}, video_model=object())  # type: ignore[arg-type]
    assert out["gone"].shape == (Z, H, W) and out["gone"].dtype == bool and not out["gone"].any()
    assert propagate_masks(tool, _frames(), 1, {}, video_model=object()) == {}  # type: ignore[arg-type]


def test_builds_its_own_video_model(medsam2) -> None:
    tool, _ = medsam2
    out = propagate_masks(tool, _frames(z=2), 0, {"lesion": KEY_MASKS["lesion"]})
    _check_volume(out, 0, {"lesion": KEY_MASKS["lesion"]}, z=2)


@pytest.mark.parametrize(
    "frames, key, masks, message",
    [
        ([], 0, KEY_MASKS, "no frames"),
        (_frames(), Z, KEY_MASKS, "outside"),
        (_frames(), -1, KEY_MASKS, "outside"),
        (_frames(), 1.0, KEY_MASKS, "int"),
        (_frames(), 0, {"lesion": np.zeros((H, W + 1), bool)}, "lesion"),
        (_frames(), 0, {"lesion": np.zeros((H, W, 1), bool)}, "lesion"),
        (_frames()[:2] + [np.zeros((H + 1, W, 3), np.uint8)], 0, KEY_MASKS, "frame 2"),
        ([np.zeros((H, W), np.uint8)], 0, KEY_MASKS, "RGB"),
        ([np.zeros((H, W, 3), np.float32)], 0, KEY_MASKS, "uint8"),
    ],
)
def test_bad_inputs(medsam2, frames, key, masks, message: str) -> None:
    tool, model = medsam2
    with pytest.raises(ValueError, match=message):
        propagate_masks(tool, frames, key, masks, video_model=model)


def test_video_model_of_another_size(medsam2, sam2_t256) -> None:
    tool, _ = medsam2
    _, other = sam2_t256
    with pytest.raises(ValueError, match="256"):
        propagate_masks(tool, _frames(), 0, KEY_MASKS, video_model=other)


@pytest.mark.slow
def test_sam2_tiny_at_1024() -> None:
    tool = Sam2Tool(SAM2_T, None)
    model = build_video_model(tool)
    assert model.image_size == 1024
    assert model.memory_attention.layers[0].self_attn.freqs_cis.shape[0] == 64 * 64
    out = propagate_masks(tool, _frames(), 2, KEY_MASKS, video_model=model)
    _check_volume(out, 2, KEY_MASKS)
