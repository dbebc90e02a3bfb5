"""SAM-family tools (SAM 2 / MedSAM2 on ``sam2``, SAM / MedSAM on ``segment_anything``) with random weights on CPU.

Random weights give meaningless masks but real shapes, real coordinate plumbing and real latency. Each tool is
built once per module and encodes two non-square images once; the ViT-B encodes (~8 s each on two cores) dominate.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ibisagent.clicks import Click
from ibisagent.tools import load_tool
from ibisagent.tools.sam import EMPTY_LOGIT, SamTool
from ibisagent.tools.sam2 import Sam2Tool

SAM2_T = "configs/sam2.1/sam2.1_hiera_t.yaml"
SPECS = [f"sam2:{SAM2_T}@random", "medsam2:random", "sam:vit_b@random", "medsam:random"]
LOW_RES = {"sam2": 256, "medsam2": 128, "sam": 256, "medsam": 256}

CLICKS_A = [Click(250, 40, True), Click(30, 150, False), Click(120, 100, True)]  # inside 200 x 300 (H x W)
CLICKS_B = [Click(40, 250, True), Click(150, 20, True), Click(100, 60, False)]  # inside 300 x 200


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    image[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2] += 150
    return image


def _encoder(tool) -> torch.nn.Module:
    return tool.model.image_encoder


class _Counter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


class _RecordingPromptEncoder(torch.nn.Module):
    """Wraps the real prompt encoder and records what reaches it (a spy, not a mock: it runs the real module)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[dict] = []

    def forward(self, points, boxes, masks):
        self.calls.append({"points": points, "boxes": boxes, "masks": masks})
        return self.inner(points=points, boxes=boxes, masks=masks)

    def get_dense_pe(self):
        return self.inner.get_dense_pe()


def _prompt_encoder_attr(tool) -> str:
    return "sam_prompt_encoder" if isinstance(tool, Sam2Tool) else "prompt_encoder"


@pytest.fixture(scope="module", params=SPECS)
def encoded(request):
    """(tool, session of a 200x300 image, session of a 300x200 image, image-encoder forwards while encoding)."""
    tool = load_tool(request.param)
    counter = _Counter(_encoder(tool))
    try:
        first = tool.encode(_image(200, 300, 0))
        second = tool.encode(_image(300, 200, 1))
    finally:
        counter.remove()
    return tool, first, second, counter.calls


def test_shapes_on_non_square_images(encoded):
    tool, first, second, _ = encoded
    size = LOW_RES[tool.name]
    for session, clicks, shape in ((first, CLICKS_A, (200, 300)), (second, CLICKS_B, (300, 200))):
        assert session.shape == shape
        one = session.predict(clicks[:1])
        many = session.predict(clicks, one.logits)
        for prediction in (one, many):
            assert prediction.mask.shape == shape and prediction.mask.dtype == np.bool_
            assert prediction.logits.shape == (1, size, size) and prediction.logits.dtype == np.float32
            assert np.abs(prediction.logits).max() <= 32.0


def test_medsam2_is_hiera_tiny_at_512():
    tool = load_tool("medsam2:random")
    assert tool.image_size == 512 and tool.low_res_size == 128
    prompt_encoder = tool.model.sam_prompt_encoder
    assert tuple(prompt_encoder.input_image_size) == (512, 512)
    assert tuple(prompt_encoder.image_embedding_size) == (32, 32)
    session = tool.encode(_image(200, 300, 0))
    assert tuple(session.image_embed.shape) == (1, 256, 32, 32)
    assert [tuple(f.shape) for f in session.high_res_feats] == [(1, 32, 128, 128), (1, 64, 64, 64)]
    prediction = session.predict(CLICKS_A)
    assert prediction.logits.shape == (1, 128, 128) and prediction.mask.shape == (200, 300)


def test_click_reaches_prompt_encoder_as_scaled_x_y(encoded):
    tool, first, _, _ = encoded
    h, w = first.shape  # 200, 300
    if isinstance(tool, Sam2Tool):
        sx, sy = tool.image_size / w, tool.image_size / h  # squashed to S x S
    elif tool.preprocess == "medsam":
        sx, sy = 1024 / w, 1024 / h  # squashed to 1024 x 1024
    else:
        sx, sy = 1024 / w, 683 / h  # longest side to 1024: 200 x 300 -> 683 x 1024 (then padded)
    attr = _prompt_encoder_attr(tool)
    real = getattr(tool.model, attr)
    spy = _RecordingPromptEncoder(real)
    setattr(tool.model, attr, spy)
    try:
        first.predict(CLICKS_A[:2])
    finally:
        setattr(tool.model, attr, real)
    (call,) = spy.calls
    coords, labels = call["points"]
    expected = np.array([[[250 * sx, 40 * sy], [30 * sx, 150 * sy]]], dtype=np.float32)
    np.testing.assert_allclose(coords.cpu().numpy(), expected, rtol=1e-5)
    assert labels.tolist() == [[1, 0]]
    assert call["boxes"] is None and call["masks"] is None


def test_prior_logits_are_chained_as_mask_input(encoded):
    tool, first, _, _ = encoded
    start = first.predict(CLICKS_A[:1])
    attr = _prompt_encoder_attr(tool)
    real = getattr(tool.model, attr)
    spy = _RecordingPromptEncoder(real)
    setattr(tool.model, attr, spy)
    try:
        chained = first.predict(CLICKS_A[:2], start.logits)
        fresh = first.predict(CLICKS_A[:2])
    finally:
        setattr(tool.model, attr, real)
    np.testing.assert_array_equal(spy.calls[0]["masks"].cpu().numpy(), start.logits[None])
    assert spy.calls[1]["masks"] is None
    assert not np.allclose(chained.logits, fresh.logits)


def test_empty_prediction_and_empty_prior(encoded):
    tool, first, _, _ = encoded
    empty = first.predict([])
    assert not empty.mask.any() and empty.mask.shape == first.shape
    assert np.all(empty.logits == EMPTY_LOGIT)
    # an empty prior is no prior: "no clicks, then the first click" equals "the first click"
    np.testing.assert_array_equal(first.predict(CLICKS_A[:1], empty.logits).logits, first.predict(CLICKS_A[:1]).logits)
    # a prior alone (no clicks) is a valid query
    start = first.predict(CLICKS_A[:1])
    assert first.predict([], start.logits).mask.shape == first.shape


def test_one_image_encoder_forward_per_image(encoded):
    tool, first, _, encode_calls = encoded
    assert encode_calls == 2  # two images, one forward each
    counter = _Counter(_encoder(tool))
    try:
        prior = None
        clicks = [Click(20 + 25 * i, 10 + 17 * i, i % 3 != 1) for i in range(10)]
        for k in range(1, 11):
            prior = first.predict(clicks[:k], prior).logits
    finally:
        counter.remove()
    assert counter.calls == 0


def test_concurrent_predicts_match_sequential(encoded):
    _, first, second, _ = encoded

    def trajectory(session, clicks):
        out, prior = [], None
        for k in range(1, len(clicks) + 1):
            prediction = session.predict(clicks[:k], prior)
            prior = prediction.logits
            out.append(prediction)
        return out

    expected = [trajectory(first, CLICKS_A), trajectory(second, CLICKS_B)]
    results: list = [None, None]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(i, session, clicks):
        try:
            barrier.wait()
            results[i] = [trajectory(session, clicks) for _ in range(2)]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(0, first, CLICKS_A)),
        threading.Thread(target=run, args=(1, second, CLICKS_B)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for got_runs, want in zip(results, expected):
        for got in got_runs:
            for g, e in zip(got, want):
                np.testing.assert_allclose(g.logits, e.logits, atol=1e-4)
                assert (g.mask != e.mask).mean() < 1e-3


def test_invalid_inputs_raise_value_error(encoded):
    tool, first, _, _ = encoded
    with pytest.raises(ValueError, match="outside"):
        first.predict([Click(300, 10, True)])  # x == W
    with pytest.raises(ValueError, match="prior_logits"):
        first.predict(CLICKS_A[:1], np.zeros((1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        tool.encode(np.zeros((20, 30, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        tool.encode(np.zeros((20, 30), np.uint8))


def test_load_tool_specs_build_the_right_tools():
    sam2 = load_tool(f"sam2:{SAM2_T}@random")
    assert isinstance(sam2, Sam2Tool) and sam2.name == "sam2" and sam2.image_size == 1024
    medsam2 = load_tool("medsam2:random")
    assert isinstance(medsam2, Sam2Tool) and medsam2.name == "medsam2" and medsam2.image_size == 512
    sam = load_tool("sam:vit_b@random")
    assert isinstance(sam, SamTool) and sam.name == "sam" and sam.preprocess == "sam"
    medsam = load_tool("medsam:random")
    assert isinstance(medsam, SamTool) and medsam.name == "medsam" and medsam.preprocess == "medsam"


@pytest.mark.parametrize(
    "spec",
    [f"sam2:{SAM2_T}@/nonexistent/sam2.pt", "medsam2:/nonexistent/MedSAM2_latest.pt", "sam:vit_b@/nonexistent/sam.pth",
     "medsam:/nonexistent/medsam_vit_b.pth"],
)
def test_missing_checkpoint_is_file_not_found(spec):
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        load_tool(spec)


@pytest.mark.parametrize("spec", ["sam3:x@random", "sam2:random", "sam:vit_b", "medsam2:", "", "embedded:extra"])
def test_unknown_spec_is_value_error(spec):
    with pytest.raises(ValueError, match="unknown tool spec"):
        load_tool(spec)


def test_unknown_model_type_and_config():
    with pytest.raises(ValueError, match="vit_x"):
        load_tool("sam:vit_x@random")
    with pytest.raises(FileNotFoundError, match="no_such_config"):
        load_tool("sam2:configs/no_such_config.yaml@random")


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    source = Sam2Tool.medsam2()
    path = tmp_path / "medsam2.pt"
    torch.save({"model": source.model.state_dict()}, path)
    loaded = load_tool(f"medsam2:{path}")
    image = _image(200, 300, 0)
    np.testing.assert_array_equal(
        loaded.encode(image).predict(CLICKS_A).logits, source.encode(image).predict(CLICKS_A).logits
    )
    state = source.model.state_dict()
    state.pop(next(iter(state)))
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)  # a bare state dict is accepted too, but a key is missing
    with pytest.raises(RuntimeError, match="missing keys"):
        load_tool(f"medsam2:{bad}")


def test_building_leaves_hydra_global_state_alone():
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import sam2  # noqa: F401 - importing sam2 initialises Hydra for its configs (sam2's doing, not ours)

    was_initialized = GlobalHydra.instance().is_initialized()
    GlobalHydra.instance().clear()  # as if another Hydra user had reset it
    try:
        first = Sam2Tool(SAM2_T)
        second = Sam2Tool.medsam2()  # a second, differently sized tool in the same process
        assert not GlobalHydra.instance().is_initialized()
        assert (first.image_size, second.image_size) == (1024, 512)
    finally:
        if was_initialized and not GlobalHydra.instance().is_initialized():
            initialize_config_module("sam2", version_base="1.2")


# --- ibisagent.bench ----------------------------------------------------------------------------------------------


class _DiskSession:
    """A stand-in tool answer: disks of radius 6 around positive clicks, minus those around negative ones."""

    def __init__(self, shape):
        self.shape = shape

    def predict(self, clicks, prior_logits=None):
        from ibisagent.tools import Prediction

        yy, xx = np.mgrid[: self.shape[0], : self.shape[1]]
        mask = np.zeros(self.shape, dtype=bool)
        for c in clicks:
            disk = (yy - c.y) ** 2 + (xx - c.x) ** 2 <= 36
            mask = mask | disk if c.positive else mask & ~disk
        return Prediction(mask=mask, logits=mask.astype(np.float32))


class _DiskTool:
    name = "disk"

    def encode(self, image):
        return _DiskSession(image.shape[:2])


def test_bench_synthetic_case_and_simulated_clicks_hit_the_blob():
    from ibisagent.bench import simulate_clicks, synthetic_case

    image, target = synthetic_case(128, seed=3)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8 and target.shape == (128, 128)
    assert 0.02 < target.mean() < 0.5
    clicks = simulate_clicks(_DiskSession((128, 128)), target, 5)
    assert len(clicks) == 5 and clicks[0].positive and target[clicks[0].y, clicks[0].x]


def test_bench_cases_per_second_runs_single_threaded():
    from ibisagent.bench import cases_per_second, single_thread

    before = torch.get_num_threads()
    with single_thread():
        assert torch.get_num_threads() == 1
        result = cases_per_second(_DiskTool(), 64, cases=2, max_clicks=20)
    assert torch.get_num_threads() == before
    assert result["cases_per_s"] > 0 and 1 <= result["mean_clicks"] <= 20 and 0 <= result["mean_iou"] <= 1


def test_bench_tools_rows_and_table(monkeypatch):
    import ibisagent.tools
    from ibisagent.bench import bench_tools, format_tool_bench

    real = ibisagent.tools.load_tool

    def load(spec, device="cpu"):
        if spec == "embedded":
            raise ImportError("No module named 'ibisagent.tools.embedded'")
        return real(spec, device)

    monkeypatch.setattr(ibisagent.tools, "load_tool", load)
    rows = bench_tools(["embedded", "medsam2:random"], sizes=(96,), clicks=3, repeats=1)
    assert rows[0]["note"].startswith("skipped") and "embedded" in rows[0]["note"]
    row = rows[1]
    assert row["name"] == "medsam2" and row["size"] == 96 and row["clicks"] == 3
    assert row["encode_s"] > 0 and row["click_s"] > 0
    expected = (row["encode_s"] + 3 * row["click_s"]) / (3 * (row["encode_s"] + row["click_s"]))
    assert row["cached_over_reencode"] == pytest.approx(expected)
    table = format_tool_bench(rows)
    assert "medsam2:random" in table and "skipped" in table and "Machine:" in table


def test_same_model_as_sam2_build_sam2():
    from sam2.build_sam import build_sam2

    from ibisagent.tools.sam2 import build_sam2_model

    torch.manual_seed(0)
    reference = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu")
    torch.manual_seed(0)
    ours = build_sam2_model(SAM2_T)
    want, got = reference.state_dict(), ours.state_dict()
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert ours.sam_mask_decoder.dynamic_multimask_via_stability
    assert reference.sam_mask_decoder.dynamic_multimask_via_stability


@pytest.mark.parametrize("spec", ["medsam2:random", "sam:vit_b@random", "medsam:random"])
def test_logits_from_mask_round_trips_a_mask_through_the_model_frame(spec: str) -> None:
    """An existing mask becomes prior logits that decode (as the tools upsample logits) back to the same region."""
    tool = load_tool(spec)
    session = tool.encode(np.zeros((200, 300, 3), np.uint8))
    mask = np.zeros((200, 300), dtype=bool)
    mask[40:120, 60:200] = True
    logits = session.logits_from_mask(mask)
    size = tool.low_res_size
    assert logits.shape == (1, size, size) and logits.dtype == np.float32
    assert logits.max() > 0 > logits.min()
    frame = torch.nn.functional.interpolate(torch.as_tensor(logits)[None], (tool.image_size, tool.image_size),
                                            mode="bilinear", align_corners=False)
    h, w = getattr(session, "input_size", (tool.image_size, tool.image_size))
    back = torch.nn.functional.interpolate(frame[..., :h, :w], (200, 300), mode="bilinear", align_corners=False)
    decoded = back[0, 0].numpy() > 0
    assert (decoded & mask).sum() / (decoded | mask).sum() > 0.9
    # a click-free predict with that prior is accepted as mask input
    assert session.predict([], logits).mask.shape == (200, 300)
    with pytest.raises(ValueError, match="shape"):
        session.logits_from_mask(np.zeros((10, 10), bool))
