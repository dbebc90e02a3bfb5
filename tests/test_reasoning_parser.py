"""Model servers with a reasoning parser (vLLM / SGLang ``--reasoning-parser``): the ``<think>`` part comes back in
``reasoning_content`` (or ``reasoning`` / ``thinking``), streamed or not, and the turn is rebuilt from both fields.

The field case (``sample_data``-free: built here as in ``../shared/field-cases/reasoning-parser``): a 48 × 120 image
with a bright disc A at the bottom left and a decoy at the top right; the model clicks disc A, then terminates. The
replies are served by a real HTTP server (:mod:`chat_server`) in each shape such servers produce, because
``transformers serve`` has no reasoning parser; ``tests/test_policies_models.py`` runs the same server in front of a
real ``transformers serve``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from chat_server import SHAPES, ChatServer, split_turn
from ibisagent.agent import AgentConfig, run_agent
from ibisagent.cli import main
from ibisagent.data.trajectory import read_trajectories
from ibisagent.metrics import iou
from ibisagent.policies.base import GenerationOptions, PolicyRequest
from ibisagent.policies.openai import OpenAIPolicy, rebuild_turn
from ibisagent.protocol import parse_response
from ibisagent.tools import load_tool

CLICK = ("<think>\nThe lesion is the round spot at the bottom left.\n</think>\n"
         "<action>\nPositive Point (0.2188, 0.8375)\n</action>")
DONE = ("<think>\nThe mask covers the spot.\n</think>\n<action>\nTerminate\n</action>\n"
        "<answer>\nThe lesion at the bottom left is segmented.\n</answer>")
FIELDS = ("reasoning_content", "reasoning", "thinking")


def _portrait() -> tuple[np.ndarray, np.ndarray]:
    """(120, 48) grey image: disc A (radius 6) at column 10, row 100, a decoy disc at the top right; disc A's mask."""
    yy, xx = np.mgrid[:120, :48]
    disc_a = (yy - 100) ** 2 + (xx - 10) ** 2 <= 36
    decoy = (yy - 15) ** 2 + (xx - 38) ** 2 <= 36
    rng = np.random.default_rng(0)
    img = np.clip(40 + 170 * (disc_a | decoy) + rng.normal(0, 6, disc_a.shape), 0, 255).astype(np.uint8)
    return img, disc_a


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("turn", [CLICK, DONE])
def test_every_reply_shape_rebuilds_the_same_turn(shape: str, turn: str) -> None:
    content, reasoning = split_turn(turn, shape)
    assert parse_response(rebuild_turn(content, reasoning)) == parse_response(turn)


def test_rebuild_turn_edge_cases() -> None:
    action = "<action>\nUndo\n</action>"
    # a template that opened <think> in the prompt: the reply starts inside the reasoning
    assert parse_response(rebuild_turn("Wrong side.</think>\n" + action, None)).think == "Wrong side."
    # reasoning given with its tags, and more reasoning before a lone </think> in the content
    rebuilt = rebuild_turn("and too low.</think>" + action, "<think>Wrong side</think>")
    assert parse_response(rebuilt).think == "Wrong side\nand too low."
    # no reasoning at all: the content as it came
    assert rebuild_turn(action, "") == action and rebuild_turn(None, None) == ""


@pytest.fixture(scope="module")
def portrait(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    img, disc_a = _portrait()
    path = tmp_path_factory.mktemp("portrait") / "portrait.png"
    PILImage.fromarray(img).save(path)
    return path, disc_a


def _run(url: str, stream: bool) -> tuple[np.ndarray, str]:
    img, _ = _portrait()
    rgb = np.repeat(img[..., None], 3, axis=2)
    with OpenAIPolicy(url, "served-model", timeout=30, stream=stream) as policy:
        trajectory = run_agent(policy, load_tool("embedded").encode(rgb), rgb, "Segment the lesion.", ["lesion"],
                               config=AgentConfig(max_steps=4))
    return trajectory.masks["lesion"], trajectory.stop_reason


@pytest.fixture(scope="module")
def unsplit_mask() -> np.ndarray:
    with ChatServer("plain", turns=[CLICK, DONE]) as server:
        mask, stop = _run(server.url, stream=False)
    assert stop == "terminate"
    return mask


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("shape", ["split", "all-in-reasoning", "both"])
def test_split_replies_segment_as_the_unsplit_reply(shape: str, field: str, stream: bool,
                                                    unsplit_mask: np.ndarray) -> None:
    _, disc_a = _portrait()
    with ChatServer(shape, field, turns=[CLICK, DONE]) as server:
        mask, stop = _run(server.url, stream)
        assert len(server.requests) == 2 and bool(server.requests[0].get("stream")) == stream
    assert stop == "terminate"
    assert np.array_equal(mask, unsplit_mask)
    assert iou(mask, disc_a) > 0.7


def test_segment_command_on_a_split_reply_server(portrait: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    src, disc_a = portrait
    out, trace = tmp_path / "mask.png", tmp_path / "trace.jsonl"
    with ChatServer("split", "reasoning_content", turns=[CLICK, DONE]) as server:
        code = main(["segment", str(src), "--prompt", "Segment the lesion.", "--policy", f"openai:{server.url}#m",
                     "--out", str(out), "--trace", str(trace)])
    assert code == 0
    mask = np.asarray(PILImage.open(out)) > 0
    assert iou(mask, disc_a) > 0.7
    record = next(read_trajectories(trace))
    assert record.stop_reason == "terminate"
    assert record.steps[0].think == "The lesion is the round spot at the bottom left."


def test_a_policy_on_a_server_returning_only_reasoning_text_in_a_batch() -> None:
    requests = [PolicyRequest(messages=[{"role": "user", "content": [{"type": "text", "text": f"q{i}"}]}])
                for i in range(3)]
    with ChatServer("all-in-reasoning", "reasoning", turns=[CLICK]) as server, \
            OpenAIPolicy(server.url, "m", concurrency=3) as policy:
        out = policy.generate(requests, GenerationOptions(max_new_tokens=16))
    assert [parse_response(g.text) for g in out] == [parse_response(CLICK)] * 3
