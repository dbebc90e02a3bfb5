"""The MDP loop with real components: the embedded tool, the oracle policy and a scripted policy that replays texts."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from ibisagent.agent import (
    AgentConfig,
    AgentJob,
    AgentTrajectory,
    absent_targets,
    resize_mask,
    run_agent,
    run_agents,
)
from ibisagent.data.trajectory import rle_decode
from ibisagent.metrics import iou
from ibisagent.policies.base import Generation, GenerationOptions, Policy, PolicyError, PolicyRequest
from ibisagent.policies.oracle import OraclePolicy
from ibisagent.prompts import load_prompts
from ibisagent.protocol import Action, Response, format_response, is_strict_format
from ibisagent.render import TARGET_COLOURS
from ibisagent.tools import load_tool
from ibisagent.tools.base import ImageSession

H, W = 96, 128
DISC_CENTRE = (50, 40)  # (x, y) pixels
SQUARE_CENTRE = (100, 60)


# ---------------------------------------------------------------------------------------------------- fixtures


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image of a bright disc and a brighter square on noise; their (H, W) bool masks."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - DISC_CENTRE[1]) ** 2 + (xx - DISC_CENTRE[0]) ** 2 < 20**2
    square = (abs(yy - SQUARE_CENTRE[1]) < 12) & (abs(xx - SQUARE_CENTRE[0]) < 12)
    grey = np.clip(60 + 120 * disc + 80 * square + rng.normal(0, 8, disc.shape), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), disc, square


IMAGE, DISC, SQUARE = _scene()


@pytest.fixture(scope="module")
def session() -> ImageSession:
    return load_tool("embedded").encode(IMAGE)


def rel(x_px: int, y_px: int, width: int = W, height: int = H) -> tuple[float, float]:
    return round((x_px + 0.5) / width, 4), round((y_px + 0.5) / height, 4)


def click_text(*points: tuple[int, int, bool, str | None], think: str = "I click.") -> str:
    """A turn with clicks at pixel (x, y) of the original grid, polarity, optional target."""
    actions = tuple(Action("positive" if pos else "negative", *rel(x, y), target) for x, y, pos, target in points)
    return format_response(Response(think=think, actions=actions))


def word_text(word: str, answer: str | None = None) -> str:
    return format_response(Response(think="Deciding.", actions=(Action(word),), answer=answer))


DISC_CLICK = click_text((*DISC_CENTRE, True, None))
TERMINATE = word_text("terminate", "disc")


class ScriptedPolicy(Policy):
    """Replays fixed texts, one list per instruction (key ``"*"`` = any); records every batch it is given."""

    name = "scripted"

    def __init__(self, scripts: Mapping[str, Sequence[str]] | Sequence[str], delay: float = 0.0,
                 size: tuple[int, int] | None = None) -> None:
        named = scripts if isinstance(scripts, Mapping) else {"*": scripts}
        self.scripts = {key: list(texts) for key, texts in named.items()}
        self.position = {key: 0 for key in self.scripts}
        self.delay = delay
        self.size = size
        self.batches: list[list[PolicyRequest]] = []

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        return self.size or (height, width)

    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        self.batches.append(list(requests))
        time.sleep(self.delay)
        out = []
        for request in requests:
            key = self._key(request)
            texts = self.scripts[key]
            index = min(self.position[key], len(texts) - 1)  # the last text repeats
            self.position[key] += 1
            out.append(Generation(text=texts[index], prefill_seconds=0.001, decode_seconds=0.002))
        return out

    def _key(self, request: PolicyRequest) -> str:
        first_user = next(m for m in request.messages if m["role"] == "user")
        text = " ".join(p["text"] for p in first_user["content"] if p["type"] == "text")
        return next((k for k in self.scripts if k != "*" and k in text), "*")

    @property
    def requests(self) -> list[PolicyRequest]:
        return [r for batch in self.batches for r in batch]


class FailingPolicy(Policy):
    name = "failing"

    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        raise PolicyError("failing: backend unreachable")


def structure(request: PolicyRequest) -> list[str]:
    """Compact summary of a conversation: role, then one letter per content part (I = image, T = text)."""
    return [m["role"] + ":" + "".join("I" if p["type"] == "image" else "T" for p in m["content"])
            for m in request.messages]


def run(policy: Policy, session: ImageSession, targets: Sequence[str] | str = "disc", *,
        config: AgentConfig | None = None, initial_masks: Mapping[str, np.ndarray] | None = None) -> AgentTrajectory:
    return run_agent(policy, session, IMAGE, "Segment the disc.", targets, config=config, initial_masks=initial_masks)


# ---------------------------------------------------------------------------------------------------- oracle runs


@pytest.mark.parametrize("history", ["off", "full"])
def test_oracle_segments_the_disc_and_terminates(session: ImageSession, history: str) -> None:
    traj = run(OraclePolicy({"disc": DISC}), session, config=AgentConfig(history=history))  # type: ignore[arg-type]
    assert traj.stop_reason == "terminate" and traj.answer == "disc"
    assert iou(traj.masks["disc"], DISC) >= 0.9
    assert traj.masks["disc"].shape == (H, W)
    assert all(is_strict_format(step.raw) for step in traj.steps)
    first = traj.steps[0].clicks[0].click
    assert first.positive and DISC[first.y, first.x]
    assert traj.seconds["total"] >= traj.seconds["tool"] > 0


@pytest.mark.parametrize("anchor_clicks", ["first", "all"])
def test_an_anchored_expert_clicks_near_the_anchor(session: ImageSession, anchor_clicks: str) -> None:
    from ibisagent.clicks import next_click

    # anchor at the disc's upper-left: the first click goes there (well inside), not to the disc's centre
    anchor = (0.2, 0.15)
    anchor_px = (anchor[0] * W, anchor[1] * H)
    policy = OraclePolicy({"disc": DISC}, anchors={"Disc": anchor}, iou_stop=0.99,  # type: ignore[arg-type]
                          anchor_clicks=anchor_clicks)
    traj = run(policy, session, config=AgentConfig(max_steps=3))
    plain = run(OraclePolicy({"disc": DISC}), session, config=AgentConfig(max_steps=1))
    clicks = [step.clicks[0].click for step in traj.steps if step.clicks]
    first, centre = clicks[0], plain.steps[0].clicks[0].click
    assert DISC[first.y, first.x] and first.positive
    assert np.hypot(first.x - anchor_px[0], first.y - anchor_px[1]) < np.hypot(centre.x - anchor_px[0],
                                                                                 centre.y - anchor_px[1]) - 5
    assert iou(traj.masks["disc"], DISC) >= 0.8
    # the second click: the plain rule again ("first"), or anchored too ("all")
    assert len(clicks) >= 2
    second = next_click(DISC, traj.steps[0].masks["disc"], [first],
                        anchor=anchor_px if anchor_clicks == "all" else None)
    assert clicks[1] == second


def test_an_expert_with_anchor_modes_clicks_at_the_anchor_of_the_mode_the_image_is_nearest(
        session: ImageSession) -> None:
    from ibisagent.clicks import AnchorMode, image_layout

    # two appearance modes: this image's (anchor at the disc's upper left) and its negative's (anchor lower right)
    here = AnchorMode(anchor=(0.2, 0.15), prototype=image_layout(IMAGE))
    other = AnchorMode(anchor=(0.95, 0.85), prototype=image_layout(255 - IMAGE))
    policy = OraclePolicy({"disc": DISC}, anchors={"disc": [other, here]}, iou_stop=0.99)
    first = run(policy, session, config=AgentConfig(max_steps=1)).steps[0].clicks[0].click
    clicks = {}
    for mode in (here, other):
        anchored = OraclePolicy({"disc": DISC}, anchors={"disc": mode.anchor}, iou_stop=0.99)
        clicks[mode.anchor] = run(anchored, session, config=AgentConfig(max_steps=1)).steps[0].clicks[0].click
    # the same click as an expert given this image's mode's anchor alone, not the other's
    assert first == clicks[here.anchor] != clicks[other.anchor]
    assert DISC[first.y, first.x]
    with pytest.raises(ValueError, match="anchor of 'disc'"):
        OraclePolicy({"disc": DISC}, anchors={"disc": [1, 2, 3]})  # type: ignore[dict-item]


def test_absent_target_answers_not_present_with_an_empty_mask(session: ImageSession) -> None:
    traj = run(OraclePolicy({"tumour": None}), session, "tumour")
    assert traj.stop_reason == "terminate" and traj.answer == "not present"
    assert not traj.masks["tumour"].any() and len(traj.steps) == 1
    # a model that drew something and then says the target is absent ends with an empty mask
    scripted = ScriptedPolicy([DISC_CLICK, word_text("terminate", "No tumour is visible in this slice.")])
    traj = run(scripted, session, "tumour")
    assert traj.steps[0].masks["tumour"].any() and not traj.masks["tumour"].any()


def test_two_targets_with_suffixes_and_an_absent_third(session: ImageSession) -> None:
    policy = OraclePolicy({"disc": DISC, "square": SQUARE, "tumour": None})
    traj = run(policy, session, ["disc", "square", "tumour"])
    assert traj.stop_reason == "terminate"
    assert iou(traj.masks["disc"], DISC) >= 0.9 and iou(traj.masks["square"], SQUARE) >= 0.9
    assert not traj.masks["tumour"].any() and "tumour: not present" in (traj.answer or "")
    first = traj.steps[0]
    assert {c.target for c in first.clicks} == {"disc", "square"}
    assert "[disc]" in first.raw and "[square]" in first.raw
    # the refinement prompt lists one colour per target, and the overlay uses them
    scripted = ScriptedPolicy([click_text((*DISC_CENTRE, True, "disc"), (*SQUARE_CENTRE, True, "Square")), TERMINATE])
    run(scripted, session, ["disc", "square"])
    text = next(p["text"] for p in scripted.requests[1].messages[-1]["content"] if p["type"] == "text")
    assert "green for disc" in text and "yellow for square" in text


def test_undo_reverts_the_previous_step(session: ImageSession) -> None:
    scripted = ScriptedPolicy([DISC_CLICK, click_text((*DISC_CENTRE, False, None)), word_text("undo"), TERMINATE])
    traj = run(scripted, session)
    after_click, after_negative, after_undo = (s.masks["disc"] for s in traj.steps[:3])
    assert not np.array_equal(after_click, after_negative)
    assert np.array_equal(after_undo, after_click) and np.array_equal(traj.masks["disc"], after_click)
    assert [a.kind for a in traj.steps[2].actions] == ["undo"]


def test_reset_empties_and_undo_restores(session: ImageSession) -> None:
    scripted = ScriptedPolicy([DISC_CLICK, word_text("reset"), word_text("undo"), word_text("reset"), TERMINATE])
    traj = run(scripted, session)
    masks = [s.masks["disc"] for s in traj.steps]
    assert masks[0].any() and not masks[1].any() and np.array_equal(masks[2], masks[0]) and not masks[3].any()
    assert traj.stop_reason == "terminate" and not traj.masks["disc"].any()


def test_undo_with_nothing_to_undo_changes_nothing(session: ImageSession) -> None:
    traj = run(ScriptedPolicy([word_text("undo"), TERMINATE]), session)
    assert traj.stop_reason == "terminate" and not traj.masks["disc"].any()


def test_several_clicks_in_one_step_feed_one_tool_call(session: ImageSession) -> None:
    both = click_text((*DISC_CENTRE, True, None), (*SQUARE_CENTRE, True, None))
    traj = run(ScriptedPolicy([both, TERMINATE]), session)
    step = traj.steps[0]
    assert len(step.clicks) == 2 and all(c.target == "disc" for c in step.clicks)
    mask = step.masks["disc"]
    assert mask[DISC_CENTRE[1], DISC_CENTRE[0]] and mask[SQUARE_CENTRE[1], SQUARE_CENTRE[0]]


def test_refinement_starts_from_the_initial_mask(session: ImageSession) -> None:
    half = DISC & (np.arange(W)[None, :] < DISC_CENTRE[0])
    scripted = ScriptedPolicy([TERMINATE])
    traj = run(scripted, session, initial_masks={"disc": half})
    assert np.array_equal(traj.masks["disc"], half)
    first_user = scripted.requests[0].messages[1]
    shown = first_user["content"][0]["image"]
    assert not np.array_equal(shown, IMAGE) and shown[DISC_CENTRE[1], DISC_CENTRE[0] - 10, 1] > IMAGE[40, 40, 1]
    assert "green region" in first_user["content"][1]["text"]
    oracle = run(OraclePolicy({"disc": DISC}), session, initial_masks={"disc": half})
    assert oracle.stop_reason == "terminate" and iou(oracle.masks["disc"], DISC) >= 0.9
    assert iou(oracle.steps[0].masks["disc"], DISC) > iou(half, DISC)


def test_initial_mask_contradicting_the_instruction_is_reset(session: ImageSession) -> None:
    traj = run(OraclePolicy({"disc": DISC}), session, initial_masks={"disc": SQUARE})
    assert [a.kind for a in traj.steps[0].actions] == ["reset"] and not traj.steps[0].masks["disc"].any()
    assert traj.stop_reason == "terminate" and iou(traj.masks["disc"], DISC) >= 0.9


# ---------------------------------------------------------------------------------------------------- stops


def test_malformed_twice_is_unparseable_after_a_repair_turn(session: ImageSession) -> None:
    scripted = ScriptedPolicy([DISC_CLICK, "I think it is round.", "<think>still no action</think>"])
    traj = run(scripted, session)
    assert traj.stop_reason == "unparseable" and "missing <think>" not in (traj.error or "")
    assert "missing <action>" in (traj.error or "")
    assert len(scripted.requests) == 3
    repair = scripted.requests[2].messages
    assert repair[-2]["role"] == "assistant" and repair[-2]["content"][0]["text"] == "I think it is round."
    assert repair[-1]["role"] == "user" and "missing <think>" in repair[-1]["content"][0]["text"]
    assert [s.error is None for s in traj.steps] == [True, False, False]
    assert [s.attempt for s in traj.steps] == [0, 0, 1] and [s.index for s in traj.steps] == [0, 1, 1]
    assert np.array_equal(traj.masks["disc"], traj.steps[0].masks["disc"]) and traj.masks["disc"].any()


def test_a_successful_repair_continues(session: ImageSession) -> None:
    scripted = ScriptedPolicy(["garbage", DISC_CLICK, TERMINATE])
    traj = run(scripted, session)
    assert traj.stop_reason == "terminate" and traj.masks["disc"].any()
    assert structure(scripted.requests[2]) == ["system:T", "user:IT"]  # the repair is not kept in history off


def test_same_click_three_times_stops(session: ImageSession) -> None:
    traj = run(ScriptedPolicy([DISC_CLICK]), session)
    assert traj.stop_reason == "repeated_click" and len(traj.steps) == 3
    assert [len(s.clicks) for s in traj.steps] == [1, 1, 0] and "3 times" in (traj.error or "")


def test_step_limit(session: ImageSession) -> None:
    texts = [click_text((DISC_CENTRE[0] + dx, DISC_CENTRE[1], True, None)) for dx in range(5)]
    traj = run(ScriptedPolicy(texts), session, config=AgentConfig(max_steps=3))
    assert traj.stop_reason == "max_steps" and len(traj.steps) == 3 and traj.masks["disc"].any()


def test_time_limit_with_a_slow_policy(session: ImageSession) -> None:
    texts = [click_text((DISC_CENTRE[0] + dx, DISC_CENTRE[1], True, None)) for dx in range(10)]
    traj = run(ScriptedPolicy(texts, delay=0.05), session, config=AgentConfig(time_limit=0.12))
    assert traj.stop_reason == "time_limit" and 1 <= len(traj.steps) <= 3
    assert traj.seconds["policy"] >= 0.05 and traj.masks["disc"].any()


def test_policy_error_stops_with_its_message(session: ImageSession) -> None:
    traj = run(FailingPolicy(), session)
    assert traj.stop_reason == "policy_error" and "unreachable" in (traj.error or "")
    assert traj.steps == () and not traj.masks["disc"].any()


HIDDEN_OUTPUTS = {
    "empty": "",
    "truncated": "<think>\nThe disc is in the upper left, so I will place a positive point at (0.39",
    "chinese": "<think>\n这是一个圆盘，我会点击它的中心。\n</think>\n<action>\n正点 (0.3945, 0.4219)\n</action>",
    "new_word": "<think>\nzoom first\n</think>\n<action>\nZoom In (0.4, 0.4)\n</action>",
    "outside": "<think>\nthere\n</think>\n<action>\nPositive Point (1.2000, -0.1000)\n</action>",
    "unknown_target": "<think>\nthere\n</think>\n<action>\nPositive Point (0.4, 0.4) [liver]\n</action>",
    "nan": "<think>\nthere\n</think>\n<action>\nPositive Point (nan, 0.4)\n</action>",
}


@pytest.mark.parametrize("name", sorted(HIDDEN_OUTPUTS))
def test_hidden_outputs_never_raise(session: ImageSession, name: str) -> None:
    traj = run(ScriptedPolicy([DISC_CLICK, HIDDEN_OUTPUTS[name]]), session)
    assert traj.stop_reason == "unparseable" and traj.error
    assert traj.masks["disc"].any() and len(traj.steps) == 3


def test_termination_and_tags_without_newlines_are_accepted(session: ImageSession) -> None:
    text = "<think>done</think><action>Termination</action><answer>disc</answer>"
    traj = run(ScriptedPolicy([DISC_CLICK, text]), session)
    assert traj.stop_reason == "terminate" and traj.answer == "disc" and traj.masks["disc"].any()


def test_pure_answer_turn_terminates(session: ImageSession) -> None:
    traj = run(ScriptedPolicy(["<think>\nno\n</think>\n<answer>\nnot present\n</answer>"]), session)
    assert traj.stop_reason == "terminate" and traj.answer == "not present"


# ---------------------------------------------------------------------------------------------------- conversations


THREE_STEPS = [DISC_CLICK, click_text((DISC_CENTRE[0] + 5, DISC_CENTRE[1], True, None)), TERMINATE]


def test_golden_conversation_history_off(session: ImageSession) -> None:
    scripted = ScriptedPolicy(THREE_STEPS)
    prompts = load_prompts()
    run(scripted, session, config=AgentConfig(history="off"))
    assert [structure(r) for r in scripted.requests] == [["system:T", "user:IT"]] * 3
    for index, request in enumerate(scripted.requests):
        assert request.messages[0]["content"][0]["text"] == prompts.system
        text = request.messages[1]["content"][1]["text"]
        assert "Segment the disc." in text
        assert ("No mask has been drawn yet" in text) == (index == 0) and ("green region" in text) == (index > 0)
        assert request.observation is not None and request.observation.step == index
    images = [r.messages[1]["content"][0]["image"] for r in scripted.requests]
    assert np.array_equal(images[0], IMAGE) and not np.array_equal(images[1], IMAGE)


def test_golden_conversation_history_full(session: ImageSession) -> None:
    scripted = ScriptedPolicy(THREE_STEPS)
    run(scripted, session, config=AgentConfig(history="full"))
    assert [structure(r) for r in scripted.requests] == [
        ["system:T", "user:IT"],
        ["system:T", "user:IT", "assistant:T", "user:IT"],
        ["system:T", "user:IT", "assistant:T", "user:IT", "assistant:T", "user:IT"],
    ]
    last = scripted.requests[-1].messages
    assert last[0]["content"][0]["text"] == load_prompts().system
    assert [m["content"][0]["text"] for m in last if m["role"] == "assistant"] == THREE_STEPS[:2]
    assert all("Segment the disc." in m["content"][1]["text"] for m in last if m["role"] == "user")
    assert np.array_equal(last[1]["content"][0]["image"], IMAGE)


# ---------------------------------------------------------------------------------------------------- concurrency


def _summary(traj: AgentTrajectory) -> tuple[object, ...]:
    return (traj.stop_reason, traj.answer, tuple(s.raw for s in traj.steps),
            tuple(m.tobytes() for m in traj.masks.values()))


def test_two_threads_share_one_policy_and_session(session: ImageSession) -> None:
    policy = OraclePolicy({"disc": DISC, "square": SQUARE})
    jobs = [("disc",), ("disc", "square")]
    sequential = [_summary(run(policy, session, list(t))) for t in jobs]
    results: dict[int, tuple[object, ...]] = {}
    barrier = threading.Barrier(len(jobs))

    def work(index: int) -> None:
        barrier.wait()
        for _ in range(5):
            results[index] = _summary(run(policy, session, list(jobs[index])))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(jobs))] == sequential


def test_run_agents_batches_unfinished_jobs_in_lockstep(session: ImageSession) -> None:
    scripted = ScriptedPolicy({
        "one": [TERMINATE],
        "two": [DISC_CLICK, TERMINATE],
        "three": [DISC_CLICK, "broken", TERMINATE],
    })
    jobs = [AgentJob(session, IMAGE, f"Segment the disc, {word}.", ("disc",)) for word in ("one", "two", "three")]
    trajs = run_agents(scripted, jobs, AgentConfig(), None)
    assert [len(b) for b in scripted.batches] == [3, 2, 1]
    assert [t.stop_reason for t in trajs] == ["terminate"] * 3
    assert [len(t.steps) for t in trajs] == [1, 2, 3]
    assert trajs[2].steps[1].error is not None and trajs[2].masks["disc"].any()
    assert run_agents(scripted, [], AgentConfig(), None) == []


# ---------------------------------------------------------------------------------------------------- grids, records


def test_policy_grid_differs_from_the_tool_grid(session: ImageSession) -> None:
    half_grid_click = format_response(Response("there", (Action("positive", *rel(25, 20, 64, 48)),)))
    scripted = ScriptedPolicy([half_grid_click, TERMINATE], size=(48, 64))
    traj = run(scripted, session)
    click = traj.steps[0].clicks[0].click
    assert click.x in (50, 51) and click.y in (40, 41)  # the half-grid pixel (25, 20) covers pixels 50-51, 40-41
    assert traj.masks["disc"].shape == (H, W) and iou(traj.masks["disc"], DISC) > 0.8
    assert scripted.requests[0].messages[1]["content"][0]["image"].shape == (48, 64, 3)
    assert scripted.requests[1].observation is not None
    assert scripted.requests[1].observation.masks["disc"].shape == (48, 64)
    oracle = run(_ResizingOracle({"disc": DISC}), session)
    assert oracle.stop_reason == "terminate" and iou(oracle.masks["disc"], DISC) >= 0.85


class _ResizingOracle(OraclePolicy):
    def image_size(self, height: int, width: int) -> tuple[int, int]:
        return height // 2, width // 2


def test_clicks_keep_full_precision_when_the_policy_sees_a_smaller_image(session: ImageSession) -> None:
    text = "<think>\nx\n</think>\n<action>\nPositive Point (0.5123, 0.4321)\n</action>"
    traj = run(ScriptedPolicy([text], size=(21, 28)), session, config=AgentConfig(max_steps=1))
    click = traj.steps[0].clicks[0].click
    assert (click.x, click.y) == (int(0.5123 * W), int(0.4321 * H))  # not quantised to the 28 x 21 grid


def test_grid_helpers() -> None:
    small = resize_mask(DISC, (48, 64))
    assert small.shape == (48, 64) and iou(resize_mask(small, (H, W)), DISC) > 0.9


def test_to_records(session: ImageSession) -> None:
    traj = run(OraclePolicy({"disc": DISC, "square": SQUARE}), session, ["disc", "square"])
    records = traj.to_records("case1", "img.png", "embedded", modality="MR", slice=3,
                              ground_truth={"disc": DISC, "square": SQUARE})
    assert [r.target for r in records] == ["disc", "square"]
    for record, truth in zip(records, (DISC, SQUARE)):
        assert record.source == "policy" and record.slice == 3 and record.stop_reason == "terminate"
        assert record.final_iou is not None and record.final_iou >= 0.9
        assert record.steps[-1].iou == record.final_iou
        assert np.array_equal(rle_decode(record.steps[-1].mask), traj.masks[record.target])
        first = record.steps[0].clicks[0]
        assert first.target == record.target and truth[first.py, first.px]
        assert first.x == pytest.approx((first.px + 0.5) / W, abs=1e-4)
        assert record.steps[0].think and record.steps[0].raw.startswith("<think>")
    assert traj.to_records("c", "i", "t")[0].final_iou is None


@pytest.mark.parametrize(("answer", "targets", "expected"), [
    ("not present", ["tumour"], {"tumour"}),
    ("No.", ["tumour"], {"tumour"}),
    ("There is no pancreatic tumour in this slice.", ["pancreatic tumour"], {"pancreatic tumour"}),
    ("disc; tumour: not present", ["disc", "tumour"], {"tumour"}),
    ("The tumour is absent.", ["disc", "tumour"], {"tumour"}),
    ("Neither is visible: not present.", ["disc", "tumour"], {"disc", "tumour"}),
    ("disc", ["disc"], set()),
    ("The left kidney is segmented; no further correction is needed.", ["left kidney"], set()),
    (None, ["disc"], set()),
])
def test_absent_targets(answer: str | None, targets: list[str], expected: set[str]) -> None:
    assert absent_targets(answer, targets) == expected


def test_bad_jobs_raise_value_errors(session: ImageSession) -> None:
    policy = ScriptedPolicy([TERMINATE])
    with pytest.raises(ValueError, match="at least one target"):
        run(policy, session, [])
    with pytest.raises(ValueError, match="distinct"):
        run(policy, session, ["disc", "Disc"])
    with pytest.raises(ValueError, match="unknown target"):
        run(policy, session, initial_masks={"liver": DISC})
    with pytest.raises(ValueError, match="shape"):
        run(policy, session, initial_masks={"disc": DISC[:10]})


# ---------------------------------------------------------------------------------------------------- prompts


def test_prompts_defaults_and_overrides(tmp_path: Path) -> None:
    prompts = load_prompts()
    assert "Positive Point (x, y)" in prompts.system and "four decimals" in prompts.system
    assert "Terminate" in prompts.system and "not present" in prompts.system and "Reset" in prompts.system
    assert "Segment it." in prompts.first_turn("Segment it.", ("a",))
    assert "a; b" in prompts.first_turn("x", ("a", "b"))
    assert len(prompts.colour_names) == len(TARGET_COLOURS)
    assert "missing" in prompts.repair_turn("Your previous reply could not be used: missing")
    user = tmp_path / "p.toml"
    user.write_text('refine = "Look again: {instruction}"\n')
    custom = load_prompts(user)
    assert custom.refine == "Look again: {instruction}" and custom.system == prompts.system
    user.write_text('refine = "no placeholder"\n')
    with pytest.raises(ValueError, match="'refine'.*instruction"):
        load_prompts(user)
    assert prompts.points_line(["Positive Point (0.5000, 0.5000)", "Undo"]).startswith("Points so far: Positive")
    assert prompts.points_line([]) == prompts.no_points
    user.write_text('points = "Clicked: {points}"\nno_points = "Nothing clicked."\n')
    assert load_prompts(user).points_line(["a", "b"]) == "Clicked: a; b"
    assert load_prompts(user).points_line([]) == "Nothing clicked."
    user.write_text('points = "Clicked."\n')
    with pytest.raises(ValueError, match="'points'.*points"):
        load_prompts(user)
    user.write_text('greeting = "hi"\n')
    with pytest.raises(ValueError, match="greeting"):
        load_prompts(user)
    user.write_text('first = "{instruction} {who}"\n')
    with pytest.raises(ValueError, match="'first'.*who"):
        load_prompts(user)
    user.write_text("not toml [")
    with pytest.raises(ValueError, match="TOML"):
        load_prompts(user)


def test_oracle_needs_observations_and_known_targets(session: ImageSession) -> None:
    with pytest.raises(PolicyError, match="observation"):
        OraclePolicy({"disc": DISC}).generate([PolicyRequest(messages=[])], GenerationOptions())
    traj = run(OraclePolicy({"disc": DISC}), session, "liver")
    assert traj.stop_reason == "policy_error" and "liver" in (traj.error or "")


@pytest.mark.parametrize(
    ("answer", "targets", "absent"),
    [
        ("The liver has been segmented. The gallbladder is not visible.", ["liver"], set()),
        ("The lesion does not contain calcification.", ["lesion"], set()),
        ("No colon tumor is present in this image.", ["target"], {"target"}),
        ("There is no kidney stone.", ["kidney stone"], {"kidney stone"}),
        ("no further correction is needed", ["x"], set()),
        ("liver; spleen not present", ["liver", "spleen"], {"spleen"}),
    ],
)
def test_absent_targets_reads_only_what_the_answer_denies(answer: str, targets: list[str], absent: set[str]) -> None:
    from ibisagent.agent import absent_targets

    assert absent_targets(answer, targets) == absent


class DeadlinePolicy(Policy):
    """Waits for the call's deadline, then fails as a remote backend cut by it does (the OpenAI-compatible policy
    raises :class:`PolicyError` at the deadline)."""

    name = "deadline"

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        return (height, width)

    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        assert options.deadline is not None
        time.sleep(max(0.0, options.deadline - time.monotonic()))
        raise PolicyError("no reply by the deadline")


class SlowStartSession(ImageSession):
    """An image session whose initial-mask logits take ``delay`` seconds (a slow episode start)."""

    def __init__(self, inner: ImageSession, delay: float) -> None:
        self.inner, self.delay, self.shape = inner, delay, inner.shape

    def predict(self, clicks, prior_logits=None):  # type: ignore[no-untyped-def]
        return self.inner.predict(clicks, prior_logits)

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        return self.inner.logits_from_mask(mask)


def test_a_batch_cut_by_the_deadline_stops_every_trajectory_with_the_time_limit(session: ImageSession) -> None:
    """The deadline of a batched call is the earliest-started trajectory's; one started later (its episode start took
    longer) must stop with ``time_limit`` too, not ``policy_error`` (a volume request failed instead of stopping)."""
    slow = SlowStartSession(session, 0.08)
    jobs = [AgentJob(slow, IMAGE, "Segment the disc.", ("disc",), initial_masks={"disc": DISC}),
            AgentJob(session, IMAGE, "Segment the disc.", ("disc",))]
    trajs = run_agents(DeadlinePolicy(), jobs, AgentConfig(time_limit=0.3), None)
    assert [t.stop_reason for t in trajs] == ["time_limit", "time_limit"], [t.error for t in trajs]
