"""`ibisagent segment` on 2D images and volumes, and per-slice 3D propagation with a real policy and tool."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage

from ibisagent.cli import main
from ibisagent.data.trajectory import read_trajectories
from ibisagent.imaging import load_image, load_mask
from ibisagent.metrics import iou
from ibisagent.policies.base import GenerationOptions, Generation, Policy, PolicyRequest
from ibisagent.policies.oracle import OraclePolicy
from ibisagent.tools import load_tool
from ibisagent.volume import segment_volume, slice_rgb


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The default policy (the tiny offline model) is built once into a private cache for this module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("IBISAGENT_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


def _ellipsoid_volume(path: Path) -> np.ndarray:
    """A (X, Y, Z) = (64, 56, 24) NIfTI with a bright ellipsoid spanning slices 6..17; returns the (Z, Y, X) mask."""
    zz, yy, xx = np.mgrid[:24, :56, :64]
    inside = ((zz - 11.5) / 6.2) ** 2 + ((yy - 28) / 16) ** 2 + ((xx - 30) / 20) ** 2 < 1.0
    rng = np.random.default_rng(1)
    data = (100 + 500 * inside + rng.normal(0, 20, inside.shape)).astype(np.int16)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 30.0]
    nib.save(nib.Nifti1Image(np.transpose(data, (2, 1, 0)), affine), path)
    return inside


def _truth_in_grid(src: Path, truth: np.ndarray, tmp_path: Path, image) -> np.ndarray:  # noqa: ANN001
    """The (Z, Y, X) truth written in the source file's geometry and read back into the loader's canonical grid."""
    mask_path = tmp_path / "truth.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(truth, (2, 1, 0)).astype(np.uint8), nib.load(src).affine), mask_path)
    return load_mask(mask_path, image)


def test_segment_2d_png_with_defaults(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:90, :120]
    img = np.clip(80 + 100 * ((yy - 45) ** 2 + (xx - 60) ** 2 < 400) + rng.normal(0, 5, (90, 120)), 0, 255)
    src = tmp_path / "img.png"
    PILImage.fromarray(img.astype(np.uint8)).save(src)
    out, trace = tmp_path / "mask.png", tmp_path / "trace.jsonl"
    code = main(["segment", str(src), "--prompt", "Segment the disc.", "--out", str(out), "--trace", str(trace),
                 "--max-steps", "2"])
    assert np.asarray(PILImage.open(out)).shape == (90, 120)
    records = list(read_trajectories(trace))
    assert records and records[0].steps and records[0].stop_reason  # untrained model: any stop, but recorded
    assert records[0].steps[0].raw  # the model's raw text is kept
    assert records[0].target == "disc"  # named from the prompt
    # the command fails (and says why) when the run failed, or when the mask is empty and the agent did not declare
    # the disc absent (the small bundled policy may answer for another structure)
    from ibisagent.outcome import declared_absent

    failed = records[0].stop_reason in ("unparseable", "policy_error")
    unexplained = not np.asarray(PILImage.open(out)).any() and not declared_absent(records[0].answer, "disc")
    assert code == (1 if failed or unexplained else 0)
    assert bool(records[0].error) == failed or not failed


def test_segment_volume_with_slice_keeps_shape_and_affine(tmp_path: Path) -> None:
    src = tmp_path / "vol.nii.gz"
    _ellipsoid_volume(src)
    out, trace, viz = tmp_path / "mask.nii.gz", tmp_path / "trace.jsonl", tmp_path / "viz.png"
    # the untrained tiny policy stops on the key slice, so the trace starts there (the bundled default propagates)
    code = main(["segment", str(src), "--prompt", "Segment the ellipsoid.", "--slice", "12", "--out", str(out),
                 "--trace", str(trace), "--viz", str(viz), "--max-steps", "2", "--policy", "tiny"])
    records = list(read_trajectories(trace))
    assert code == (1 if any(r.stop_reason in ("unparseable", "policy_error") for r in records) else 0)
    written, original = nib.load(out), nib.load(src)
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine)
    records = list(read_trajectories(trace))
    assert records and records[0].slice == 12
    assert viz.stat().st_size > 0


class SliceOracle(Policy):
    """A real policy for volumes: finds which slice it is looking at and answers as the oracle would there."""

    name = "slice-oracle"

    def __init__(self, rgbs: Sequence[np.ndarray], truth: np.ndarray, target: str) -> None:
        self._keys = {rgb.tobytes(): k for k, rgb in enumerate(rgbs)}
        self._oracles = [OraclePolicy({target: truth[k] if truth[k].any() else None}) for k in range(len(rgbs))]
        self.seen: list[int] = []
        self.batches: list[int] = []

    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        self.batches.append(len(requests))
        out = []
        for request in requests:
            assert request.observation is not None
            first_image = next(part["image"] for m in request.messages for part in m["content"]
                               if part.get("type") == "image")
            k = self._keys.get(first_image.tobytes())
            if k is None:  # an overlay: find the slice from the observation's untouched image
                k = self._keys[request.observation.image.tobytes()]
            self.seen.append(k)
            out.extend(self._oracles[k].generate([request], options))
        return out


def test_volume_propagates_both_ways_and_stops_where_the_target_ends(tmp_path: Path) -> None:
    src = tmp_path / "vol.nii.gz"
    truth = _ellipsoid_volume(src)
    image = load_image(src)
    truth = _truth_in_grid(src, truth, tmp_path, image)
    rgbs = [slice_rgb(image, k) for k in range(truth.shape[0])]
    policy = SliceOracle(rgbs, truth, "ellipsoid")
    key = int(np.argmax(truth.sum(axis=(1, 2))))
    result = segment_volume(policy, load_tool("embedded"), image, "Segment the ellipsoid.", ["ellipsoid"],
                            key_slice=key)
    mask = result.masks["ellipsoid"]
    assert mask.shape == truth.shape
    assert iou(mask, truth) >= 0.8
    present = np.flatnonzero(truth.any(axis=(1, 2)))
    segmented = np.flatnonzero(mask.any(axis=(1, 2)))
    assert segmented.min() <= present.min() + 1 and segmented.max() >= present.max() - 1
    assert not mask[: max(present.min() - 1, 0)].any() and not mask[present.max() + 2:].any()
    assert set(result.stops) == {"up", "down"} and all("ended" in s or "edge" in s for s in result.stops.values())
    assert max(policy.batches) == 2  # both directions in one batched call per round
    assert all(result.slices[k].steps[0].response is not None for k in segmented)  # reasoning per slice


def test_sam2_video_propagation_fills_the_range_with_a_sam2_tool(tmp_path: Path) -> None:
    """The alternative path: the agent on the key slice, SAM 2 video memory for the rest (random weights: shapes)."""
    from ibisagent.tools.sam2 import Sam2Tool

    src = tmp_path / "vol.nii.gz"
    truth = _ellipsoid_volume(src)
    image = load_image(src)
    key = 12
    policy = OraclePolicy({"e": None})  # answers "not present" at once: exercise the early stop first
    tool = Sam2Tool.medsam2(None)
    early = segment_volume(policy, tool, image, "Segment it.", ["e"], key_slice=key, propagation="sam2-video")
    assert not early.masks["e"].any() and "absent" in early.stops["up"]
    rgbs = [slice_rgb(image, k) for k in range(image.array.shape[0])]
    result = segment_volume(SliceOracle(rgbs, _truth_in_grid(src, truth, tmp_path, image), "e"), tool, image,
                            "Segment it.", ["e"],
                            key_slice=key, slice_range=(8, 15), propagation="sam2-video")
    mask = result.masks["e"]
    assert mask.shape == image.array.shape and mask.dtype == bool
    assert mask[key].any() and not mask[:8].any() and not mask[16:].any()
    assert set(result.slices) == {key} and result.stops["up"].startswith("sam2-video")
    with pytest.raises(ValueError, match="SAM 2"):
        segment_volume(policy, load_tool("embedded"), image, "x", ["e"], propagation="sam2-video")



def test_a_policy_server_that_is_down_fails_clearly_within_the_timeout(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import socket
    import time

    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = tmp_path / "img.png"
    PILImage.fromarray(np.zeros((40, 50), np.uint8)).save(src)
    start = time.monotonic()
    code = main(["segment", str(src), "--prompt", "Segment it.", "--policy", f"openai:http://127.0.0.1:{port}/v1#m",
                 "--out", str(tmp_path / "m.png"), "--trace", str(tmp_path / "t.jsonl")])
    assert code == 1 and time.monotonic() - start < 90
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
    assert np.asarray(PILImage.open(tmp_path / "m.png")).shape == (40, 50)  # the best mask so far (empty) is kept


class KeyThenGarbage(Policy):
    """Answers the key slice as the oracle would, then writes unusable text on every other slice."""

    name = "key-then-garbage"

    def __init__(self, oracle: Policy, key_rgb: np.ndarray) -> None:
        self._oracle, self._key = oracle, key_rgb.tobytes()

    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        out = []
        for request in requests:
            assert request.observation is not None
            if request.observation.image.tobytes() == self._key:
                out.extend(self._oracle.generate([request], options))
            else:
                out.append(Generation(text="I am not sure what to do here."))
        return out


def test_propagation_does_not_copy_a_mask_the_agent_did_not_confirm(tmp_path: Path) -> None:
    src = tmp_path / "vol.nii.gz"
    truth = _ellipsoid_volume(src)
    image = load_image(src)
    truth = _truth_in_grid(src, truth, tmp_path, image)
    key = 12
    policy = KeyThenGarbage(OraclePolicy({"e": truth[key]}), slice_rgb(image, key))
    result = segment_volume(policy, load_tool("embedded"), image, "Segment it.", ["e"], key_slice=key)
    mask = result.masks["e"]
    assert mask[key].any()
    assert not np.delete(mask, key, axis=0).any()  # neighbours answered nothing usable: nothing copied onto them
    assert all("no usable answer" in why for why in result.stops.values())


def test_segment_rejects_an_impossible_output_format_before_running(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "vol.nii.gz"
    _ellipsoid_volume(src)
    code = main(["segment", str(src), "--prompt", "x", "--policy", "hf:/nowhere", "--out", str(tmp_path / "m.png"),
                 "--trace", str(tmp_path / "t.jsonl")])
    assert code == 2 and "--out" in capsys.readouterr().err  # the format is checked before the (missing) policy


def test_segment_records_the_modality_and_window_in_the_trace(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """CT stored as NIfTI gets the CT window by the automatic rule; --modality overrides it; the trace says which."""
    src = Path(__file__).parent / "data" / "ct_window_nifti" / "nifti" / "ct.nii.gz"  # the field case
    for modality, kind in ((None, "window"), ("MR", "percentile")):
        trace = tmp_path / f"{modality}.jsonl"
        args = ["segment", str(src), "--prompt", "Segment the liver lesion.", "--slice", "2", "--range", "2", "2",
                "--max-steps", "1", "--max-new-tokens", "8", "--out", str(tmp_path / "m.nii.gz"),
                "--trace", str(trace)]
        main(args + (["--modality", modality] if modality else []))
        records = list(read_trajectories(trace))
        assert records and all(r.window is not None and r.window["kind"] == kind for r in records)
        assert records[0].modality == (modality or "CT")
        assert f"modality {modality or 'CT'}" in capsys.readouterr().out
def test_unparseable_output_fails_the_command_with_the_reason_on_stderr_and_in_the_trace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from chat_server import ChatServer

    src = tmp_path / "img.png"
    PILImage.fromarray(np.full((40, 50), 90, np.uint8)).save(src)
    out, trace = tmp_path / "m.png", tmp_path / "t.jsonl"
    with ChatServer("plain", turns=["I am not sure what to do here."]) as server:
        code = main(["segment", str(src), "--prompt", "Segment the left kidney.", "--policy",
                     f"openai:{server.url}#m", "--out", str(out), "--trace", str(trace)])
        assert len(server.requests) == 2  # the turn and its one repair retry
    assert code == 1
    err = capsys.readouterr().err
    assert "unparseable" in err and "missing <think>" in err
    record = next(read_trajectories(trace))
    assert record.stop_reason == "unparseable" and "missing <think>" in record.error
    assert record.target == "left kidney"
    assert not (np.asarray(PILImage.open(out)) > 0).any()  # the mask so far (empty) is still written


def test_trace_is_optional_and_targets_given_override_the_prompt(tmp_path: Path) -> None:
    from chat_server import ChatServer

    src = tmp_path / "img.png"
    PILImage.fromarray(np.full((40, 50), 90, np.uint8)).save(src)
    done = "<think>\nNothing here.\n</think>\n<action>\nTerminate\n</action>\n<answer>\nnot present\n</answer>"
    with ChatServer("plain", turns=[done]) as server:
        code = main(["segment", str(src), "--prompt", "Segment the kidneys.", "--target", "left kidney", "--target",
                     "right kidney", "--policy", f"openai:{server.url}#m", "--out", str(tmp_path / "m.png")])
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("m_*.png")) == ["m_left_kidney.png", "m_right_kidney.png"]
    assert not list(tmp_path.glob("*.jsonl"))
