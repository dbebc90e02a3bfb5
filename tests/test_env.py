"""The segmentation environment with real components (the embedded tool, the oracle policy): one code path for what
the policy sees, the stop rules, the ground-truth record the rewards read, and tool failures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from ibisagent.agent import AgentConfig, AgentJob, run_agent, run_agents
from ibisagent.clicks import Click
from ibisagent.env import EnvConfig, EnvObservation, SegmentationEnv, StepResult, replay_records
from ibisagent.metrics import iou
from ibisagent.observation import observation_image, resize_image, resize_mask
from ibisagent.policies.base import Generation, GenerationOptions, Policy, PolicyRequest
from ibisagent.policies.oracle import OraclePolicy
from ibisagent.prompts import load_prompts
from ibisagent.protocol import Action, Response, format_response, is_strict_format
from ibisagent.tools import load_tool
from ibisagent.tools.base import ImageSession, Prediction

H, W = 96, 128
LIB = Path(__file__).resolve().parents[1] / "lib"


def _scene() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - 40) ** 2 + (xx - 50) ** 2 < 20**2
    grey = np.clip(60 + 120 * disc + rng.normal(0, 8, disc.shape), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), disc


IMAGE, DISC = _scene()


@pytest.fixture(scope="module")
def session() -> ImageSession:
    return load_tool("embedded").encode(IMAGE)


def turn(*actions: Action, answer: str | None = None) -> str:
    return format_response(Response(think="I look at the overlay.", actions=actions, answer=answer))


def click(x_px: int, y_px: int, positive: bool = True, target: str | None = None) -> Action:
    return Action("positive" if positive else "negative", round((x_px + 0.5) / W, 4), round((y_px + 0.5) / H, 4),
                  target)


UNDO, RESET = Action("undo"), Action("reset")
TERMINATE = turn(Action("terminate"), answer="disc")


def env_for(session: ImageSession, **kwargs: object) -> SegmentationEnv:
    return SegmentationEnv(IMAGE, "Segment the disc.", ["disc"], session, **kwargs)  # type: ignore[arg-type]


class Recording(Policy):
    """Wraps a real policy; keeps every request it was sent and every text it returned, in order."""

    def __init__(self, inner: Policy, size: tuple[int, int] | None = None) -> None:
        self.inner, self.size, self.name = inner, size, f"recording:{inner.name}"
        self.requests: list[PolicyRequest] = []
        self.texts: list[str] = []

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        return self.size or self.inner.image_size(height, width)

    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        out = self.inner.generate(requests, options)
        self.requests += list(requests)
        self.texts += [g.text for g in out]
        return out


class Script(Policy):
    """Replays fixed texts (the last repeats)."""

    name = "script"

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts, self.i = list(texts), 0

    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        out = []
        for _ in requests:
            out.append(Generation(text=self.texts[min(self.i, len(self.texts) - 1)]))
            self.i += 1
        return out


def same_messages(a: list[dict], b: list[dict]) -> bool:
    """Deep equality of two conversations, images compared pixel for pixel."""
    if len(a) != len(b):
        return False
    for ma, mb in zip(a, b):
        if ma["role"] != mb["role"] or len(ma["content"]) != len(mb["content"]):
            return False
        for pa, pb in zip(ma["content"], mb["content"]):
            if pa["type"] != pb["type"]:
                return False
            if pa["type"] == "image":
                if pa["image"].shape != pb["image"].shape or not np.array_equal(pa["image"], pb["image"]):
                    return False
            elif pa["text"] != pb["text"]:
                return False
    return True


def same_observation(obs: EnvObservation, request: PolicyRequest) -> bool:
    state = request.observation
    assert state is not None
    return (same_messages(obs.messages, request.messages) and obs.state.step == state.step
            and obs.state.targets == state.targets and np.array_equal(obs.state.image, state.image)
            and obs.state.clicks == state.clicks
            and all(np.array_equal(obs.state.masks[n], state.masks[n]) for n in state.targets))


# ---------------------------------------------------------------------------------------------- one code path


@pytest.mark.parametrize("history", ["off", "full"])
@pytest.mark.parametrize("size", [None, (48, 64)])
def test_env_observation_is_what_run_agent_sent_the_policy(session: ImageSession, history: str,
                                                          size: tuple[int, int] | None) -> None:
    # a malformed turn (repair), a wrong click and a right one, an Undo, then the oracle clicks and terminates
    head = ["no tags at all", turn(click(110, 80)), turn(click(50, 40)), turn(UNDO)]

    class ScriptThenOracle(Policy):
        name = "script-then-oracle"

        def __init__(self) -> None:
            self.oracle, self.i = OraclePolicy({"disc": DISC}), 0

        def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
            out = []
            for request in requests:
                text = head[self.i] if self.i < len(head) else self.oracle.respond(request)
                self.i += 1
                out.append(Generation(text=text))
            return out

    recording = Recording(ScriptThenOracle(), size)
    config = AgentConfig(max_steps=16, history=history)  # type: ignore[arg-type]
    trajectory = run_agent(recording, session, IMAGE, "Segment the disc.", ["disc"], config=config,
                           ground_truth={"disc": DISC})
    assert trajectory.stop_reason == "terminate" and len(recording.requests) >= 6
    assert sum(bool(s.clicks) for s in trajectory.steps[4:]) >= 1  # the oracle clicked too

    env = SegmentationEnv(IMAGE, "Segment the disc.", ["disc"], session, policy_grid=size,
                          ground_truth={"disc": DISC}, config=config.env)
    obs = env.reset()
    for request, text, recorded in zip(recording.requests, recording.texts, trajectory.steps, strict=True):
        assert same_observation(obs, request)
        assert same_observation(env.observation, request)
        result = env.step(text)
        assert result.raw == recorded.raw and result.clicks == recorded.clicks
        assert all(np.array_equal(result.masks[n], recorded.masks[n]) for n in result.masks)
        if result.observation is not None:
            obs = result.observation
    assert env.done and env.stop_reason == trajectory.stop_reason
    # the images of an observation are its placeholders, in order, in the policy grid
    first = recording.requests[0]
    grid = size or (H, W)
    assert np.array_equal(first.messages[1]["content"][0]["image"], resize_image(IMAGE, grid))


def test_observation_image_is_the_overlay_of_the_current_masks(session: ImageSession) -> None:
    env = env_for(session, policy_grid=(48, 64))
    env.reset()
    result = env.step(turn(click(50, 40)))
    assert result.observation is not None
    image = result.observation.image
    assert image.shape == (48, 64, 3)
    expected = observation_image(resize_image(IMAGE, (48, 64)), [result.masks["disc"]])
    assert np.array_equal(image, expected)
    assert np.array_equal(np.asarray(env.overlay_image()), expected) and env.overlay_image().size == (64, 48)
    # masks in results stay in the image grid; the state shown to state-reading policies is in the policy grid
    assert result.masks["disc"].shape == (H, W)
    assert np.array_equal(result.observation.state.masks["disc"], resize_mask(result.masks["disc"], (48, 64)))
    assert result.clicks[0].click == Click(50, 40, True) and result.clicks[0].policy_click == Click(25, 20, True)
    assert result.observation.state.clicks == {"disc": (Click(25, 20, True),)}


@pytest.mark.parametrize("history", ["off", "full"])
def test_history_modes(session: ImageSession, history: str) -> None:
    env = env_for(session, config=EnvConfig(history=history))  # type: ignore[arg-type]
    prompts = load_prompts()
    first = env.reset()
    assert [m["role"] for m in first.messages] == ["system", "user"] and len(first.images) == 1
    assert first.messages[0]["content"][0]["text"] == prompts.system
    assert first.messages[1]["content"][1]["text"] == prompts.first_turn("Segment the disc.", ("disc",))
    t1, t2 = turn(click(50, 40)), turn(click(35, 40))
    env.step(t1)
    obs = env.step(t2).observation
    assert obs is not None
    refine = prompts.refine_turn("Segment the disc.", ("disc",))
    if history == "off":
        assert [m["role"] for m in obs.messages] == ["system", "user"] and len(obs.images) == 1
        assert obs.messages[1]["content"][1]["text"] == refine
    else:
        assert [m["role"] for m in obs.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert [m["content"][0]["text"] for m in obs.messages if m["role"] == "assistant"] == [t1, t2]
        assert len(obs.images) == 3 and np.array_equal(obs.images[0], IMAGE)
    assert np.array_equal(obs.image, observation_image(IMAGE, [env.masks["disc"]]))


def test_refinement_turns_list_the_points_of_the_current_state_when_asked(session: ImageSession) -> None:
    prompts = load_prompts()
    refine = prompts.refine_turn("Segment the disc.", ("disc",))
    env = env_for(session, config=EnvConfig(show_points=True))
    first = env.reset()
    assert "Points so far" not in first.turn["content"][1]["text"]  # the first turn has no mask and no points
    one = env.step(turn(click(50, 40), click(90, 80, positive=False))).observation
    assert one is not None
    assert one.turn["content"][1]["text"] == (f"{refine}\nPoints so far: Positive Point ({50.5 / W:.4f}, "
                                              f"{40.5 / H:.4f}); Negative Point ({90.5 / W:.4f}, {80.5 / H:.4f}).")
    two = env.step(turn(click(35, 40))).observation
    assert two is not None and two.turn["content"][1]["text"].count("Point (") == 3
    # the list is the state's: Undo takes the last step's point back, Reset all of them
    undone = env.step(turn(UNDO)).observation
    assert undone is not None and undone.turn["content"][1]["text"] == one.turn["content"][1]["text"]
    emptied = env.step(turn(RESET)).observation
    assert emptied is not None and emptied.turn["content"][1]["text"] == f"{refine}\n{prompts.no_points}"
    # off by default: the released checkpoint's turns
    plain = env_for(session)
    plain.reset()
    after = plain.step(turn(click(50, 40))).observation
    assert after is not None and after.turn["content"][1]["text"] == refine


def test_listed_points_name_their_target_when_there_are_several(session: ImageSession) -> None:
    env = SegmentationEnv(IMAGE, "Segment the disc and the ring.", ["disc", "ring"], session,
                          config=EnvConfig(show_points=True))
    env.reset()
    obs = env.step(turn(click(50, 40, target="disc"), click(10, 10, target="ring"),
                        click(52, 42, positive=False, target="disc"))).observation
    assert obs is not None
    listed = obs.turn["content"][1]["text"].splitlines()[-1]
    assert listed == (f"Points so far: Positive Point ({50.5 / W:.4f}, {40.5 / H:.4f}) [disc]; "
                      f"Negative Point ({52.5 / W:.4f}, {42.5 / H:.4f}) [disc]; "
                      f"Positive Point ({10.5 / W:.4f}, {10.5 / H:.4f}) [ring].")


def test_observation_settings_round_trip_and_bad_records_are_refused(tmp_path: Path) -> None:
    from ibisagent.env import OBSERVATION_FILE, read_observation, write_observation

    assert read_observation(tmp_path) == {}  # a checkpoint trained elsewhere records nothing
    write_observation(tmp_path, {"show_points": True, "history": "full"})  # only observation fields are kept
    assert read_observation(tmp_path) == {"show_points": True}
    write_observation(tmp_path, {})
    assert read_observation(tmp_path) == {"show_points": False}
    for text, message in (("{", "not a readable JSON"), ('{"show_points": true}', "'observation' object"),
                          ('{"observation": {"show_points": "yes"}}', "true or false"),
                          ('{"observation": {"history": "full"}}', "unknown observation setting")):
        (tmp_path / OBSERVATION_FILE).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_observation(tmp_path)


def test_a_malformed_turn_gets_a_repair_turn_at_the_same_step(session: ImageSession) -> None:
    env = env_for(session)
    env.reset()
    bad = env.step("Positive Point (0.5, 0.5)")
    assert bad.error and bad.response is None and not bad.done and bad.index == 0 and bad.attempt == 0
    assert bad.observation is not None and bad.observation.step == 0 and bad.observation.attempt == 1
    assert [m["role"] for m in bad.observation.messages] == ["system", "user", "assistant", "user"]
    good = env.step(turn(click(50, 40)))
    assert good.index == 0 and good.attempt == 1 and good.observation is not None
    assert good.observation.step == 1 and good.observation.attempt == 0
    assert [m["role"] for m in good.observation.messages] == ["system", "user"]
    env.step("still bad")
    last = env.step("bad again")
    assert last.stop_reason == "unparseable" and env.done and last.observation is None


# ---------------------------------------------------------------------------------------------- actions and stops


def test_undo_reset_terminate(session: ImageSession) -> None:
    env = env_for(session)
    env.reset()
    a = env.step(turn(click(50, 40))).masks["disc"]
    b = env.step(turn(click(30, 40))).masks["disc"]
    assert a.any() and not np.array_equal(a, b)
    assert np.array_equal(env.step(turn(UNDO)).masks["disc"], a)
    assert not env.step(turn(RESET)).masks["disc"].any()
    assert np.array_equal(env.step(turn(UNDO)).masks["disc"], a)
    end = env.step(TERMINATE)
    assert end.done and end.stop_reason == "terminate" and end.answer == "disc" and end.observation is None
    assert np.array_equal(end.masks["disc"], a) and env.trajectory().answer == "disc"
    with pytest.raises(RuntimeError, match="over"):
        env.step(TERMINATE)
    # reset() restarts the episode from scratch
    again = env.reset()
    assert not env.done and again.step == 0 and not env.masks["disc"].any() and env.steps == ()


def test_three_consecutive_identical_clicks_stop(session: ImageSession) -> None:
    env = env_for(session)
    env.reset()
    same = turn(click(50, 40))
    assert not env.step(same).done and not env.step(same).done
    third = env.step(same)
    assert third.stop_reason == "repeated_click" and third.clicks == () and "3 times in a row" in (third.error or "")
    assert env.total_clicks == 2


def test_undo_then_the_same_click_is_allowed(session: ImageSession) -> None:
    env = env_for(session)
    env.reset()
    same = turn(click(50, 40))
    env.step(same)
    env.step(same)
    env.step(turn(UNDO))
    after = env.step(same)  # the third time overall, but not three in a row
    assert not after.done and len(after.clicks) == 1
    # a different click in between also breaks the run
    env.step(turn(click(45, 40)))
    assert not env.step(same).done and not env.step(same).done
    assert env.step(same).stop_reason == "repeated_click"


def test_repeats_inside_one_turn_count(session: ImageSession) -> None:
    env = env_for(session)
    env.reset()
    result = env.step(turn(click(50, 40), click(50, 40), click(50, 40)))
    assert result.stop_reason == "repeated_click" and env.total_clicks == 0


def test_noc_counts_clicks_not_turns(session: ImageSession) -> None:
    env = env_for(session)
    env.reset()
    r = env.step(turn(click(50, 40), click(35, 40)))
    assert len(r.clicks) == 2 and r.total_clicks == 2
    env.step(turn(UNDO))
    env.step(turn(click(60, 40)))
    env.step(TERMINATE)
    assert env.total_clicks == 3 and env.trajectory().clicks == 3


def test_max_steps(session: ImageSession) -> None:
    env = env_for(session, config=EnvConfig(max_steps=2))
    env.reset()
    assert not env.step(turn(click(50, 40))).done
    last = env.step(turn(click(35, 40)))
    assert last.stop_reason == "max_steps" and last.observation is None and last.masks["disc"].any()


def test_apply_parsed_actions_for_framework_adapters(session: ImageSession) -> None:
    env = env_for(session, ground_truth={"disc": DISC})
    env.reset()
    result = env.apply([click(50, 40)])
    assert is_strict_format(result.raw) and result.strict_format and len(result.clicks) == 1
    assert result.clicks[0].in_error_region is True and result.scores is not None and result.scores[0].improved
    # what an adapter returns as the tool's result: the newest user turn, its image = the current overlay
    assert result.observation is not None and result.observation.turn["role"] == "user"
    assert np.array_equal(result.observation.turn["content"][0]["image"], np.asarray(env.overlay_image()))
    unknown = env.apply([click(50, 40, target="liver")])
    assert unknown.error and "unknown target" in unknown.error and not unknown.done
    end = env.apply([Action("terminate")])
    assert end.stop_reason == "terminate" and end.answer is None


# ---------------------------------------------------------------------------------------------- ground truth


class Painter(ImageSession):
    """A real session stand-in whose masks are known exactly: each positive click paints a 5x5 square, each negative
    click erases one, starting from the prior (logits = the mask as float)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape

    def predict(self, clicks: Sequence[Click], prior_logits: np.ndarray | None = None) -> Prediction:
        mask = np.zeros(self.shape, bool) if prior_logits is None else prior_logits > 0
        for c in clicks[-1:]:  # the newest click edits the prior
            mask[max(c.y - 2, 0):c.y + 3, max(c.x - 2, 0):c.x + 3] = c.positive
        return Prediction(mask=mask, logits=mask.astype(np.float32))

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        return np.asarray(mask, np.float32)


def test_iou_before_after_and_click_placement_on_hand_made_masks() -> None:
    truth = np.zeros((H, W), bool)
    truth[10:30, 10:30] = True  # 400 px
    start = np.zeros((H, W), bool)
    start[20:40, 10:30] = True  # 400 px, 200 shared → IoU 1/3
    env = SegmentationEnv(IMAGE, "Segment the box.", ["box"], Painter((H, W)), initial_masks={"box": start},
                          ground_truth={"box": truth})
    env.reset()
    # positive in the missed part (FN), negative in the over-included part (FP): both right
    good = env.apply([click(20, 12, True)])
    assert good.scores is not None
    s = good.scores[0]
    assert s.present and s.iou_before == pytest.approx(1 / 3) and s.iou_after > s.iou_before and s.improved
    assert s.iou_after == pytest.approx(iou(good.masks["box"], truth))
    assert good.clicks[0].in_error_region is True
    neg = env.apply([click(20, 37, False)])
    assert neg.clicks[0].in_error_region is True and neg.scores[0].iou_before == pytest.approx(s.iou_after)  # type: ignore[index]
    # wrong placements: positive on what is already right, negative inside the target, positive far outside
    wrong = env.apply([click(20, 25, True), click(20, 12, False), click(100, 80, True)])
    assert [c.in_error_region for c in wrong.clicks] == [False, False, False]
    assert not wrong.scores[0].improved  # type: ignore[index]


def test_absent_target_answer_scores_the_empty_mask(session: ImageSession) -> None:
    env = SegmentationEnv(IMAGE, "Segment the tumour.", ["tumour"], session, ground_truth={"tumour": None})
    env.reset()
    clicked = env.step(turn(click(50, 40)))
    assert clicked.clicks[0].in_error_region is False and clicked.scores[0].iou_after == 0.0  # type: ignore[index]
    end = env.step(turn(Action("terminate"), answer="The tumour is not present."))
    score = end.scores[0]  # type: ignore[index]
    assert end.absent == frozenset({"tumour"}) and not end.masks["tumour"].any()
    assert not score.present and score.iou_before == 0.0 and score.iou_after == 1.0


def test_without_ground_truth_there_are_no_scores(session: ImageSession) -> None:
    env = env_for(session)
    env.reset()
    r = env.step(turn(click(50, 40)))
    assert r.scores is None and r.clicks[0].in_error_region is None


# ---------------------------------------------------------------------------------------------- tool failures


class BrokenSession(ImageSession):
    """A real session that raises on every prediction (a tool crash on one image)."""

    def __init__(self, inner: ImageSession) -> None:
        self.inner, self.shape = inner, inner.shape

    def predict(self, clicks: Sequence[Click], prior_logits: np.ndarray | None = None) -> Prediction:
        raise RuntimeError("CUDA error: device-side assert triggered")

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        return self.inner.logits_from_mask(mask)


def test_a_tool_error_stops_only_its_own_episode(session: ImageSession) -> None:
    jobs = [AgentJob(session=BrokenSession(session), image=IMAGE, instruction="Segment the disc.", targets=("disc",)),
            AgentJob(session=session, image=IMAGE, instruction="Segment the disc.", targets=("disc",))]
    broken, fine = run_agents(OraclePolicy({"disc": DISC}), jobs, AgentConfig(max_steps=10))
    assert broken.stop_reason == "tool_error" and "device-side assert" in (broken.error or "")
    assert len(broken.steps) == 1 and broken.steps[0].clicks == () and not broken.masks["disc"].any()
    assert fine.stop_reason == "terminate" and iou(fine.masks["disc"], DISC) >= 0.9


def test_a_tool_error_on_the_initial_mask_ends_the_episode_at_reset(session: ImageSession) -> None:
    class NoLogits(BrokenSession):
        def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
            raise MemoryError("out of memory")

    env = env_for(NoLogits(session), initial_masks={"disc": DISC})
    obs = env.reset()
    assert env.done and env.stop_reason == "tool_error" and "out of memory" in (env.error or "")
    assert len(obs.images) == 1 and np.array_equal(env.masks["disc"], DISC)


# ---------------------------------------------------------------------------------------------- construction


def test_bad_construction_raises_value_errors(session: ImageSession) -> None:
    with pytest.raises(ValueError, match="ground truth missing"):
        SegmentationEnv(IMAGE, "x", ["a", "b"], session, ground_truth={"a": DISC})
    with pytest.raises(ValueError, match="unknown target"):
        SegmentationEnv(IMAGE, "x", ["a"], session, initial_masks={"b": DISC})
    with pytest.raises(ValueError, match="shape"):
        SegmentationEnv(IMAGE, "x", ["a"], session, ground_truth={"a": DISC[:10]})
    with pytest.raises(ValueError, match="policy grid"):
        SegmentationEnv(IMAGE, "x", ["a"], session, policy_grid=(0, 10))
    with pytest.raises(ValueError, match="distinct"):
        SegmentationEnv(IMAGE, "x", ["Liver", "liver"], session)
    with pytest.raises(RuntimeError, match="reset"):
        env_for(session).step(TERMINATE)


def test_importing_the_agent_does_not_import_matplotlib() -> None:
    code = ("import sys, ibisagent.agent, ibisagent.env, ibisagent.observation, ibisagent.policies.oracle; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'); "
            "assert not bad, bad; print('clean')")
    env = {**os.environ, "PYTHONPATH": str(LIB)}
    env.pop("MPLBACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr


def test_step_results_are_frozen(session: ImageSession) -> None:
    env = env_for(session)
    env.reset()
    result: StepResult = env.step(turn(click(50, 40)))
    with pytest.raises(AttributeError):
        result.raw = "changed"  # type: ignore[misc]
    with pytest.raises(ValueError):
        result.masks["disc"][0, 0] = True  # read-only arrays: states are shared by the undo stack


# ---------------------------------------------------------------------------------------------- replay


@pytest.mark.parametrize("history", ["off", "full"])
def test_a_recorded_episode_replays_to_the_same_observations_without_the_tool(session: ImageSession,
                                                                              history: str) -> None:
    """SFT data is built from records: replaying them gives exactly what the policy was sent at inference."""
    square = np.zeros((H, W), bool)
    square[60:80, 90:110] = True
    truth = {"disc": DISC, "square": square}
    head = ["garbage", turn(click(100, 70, target="square"), click(50, 40, target="disc")), turn(UNDO)]

    class ScriptThenOracle(Policy):
        name = "script-then-oracle"

        def __init__(self) -> None:
            self.oracle, self.i = OraclePolicy(truth), 0

        def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
            out = [Generation(text=head[self.i + k] if self.i + k < len(head) else self.oracle.respond(r))
                   for k, r in enumerate(requests)]
            self.i += len(requests)
            return out

    recording = Recording(ScriptThenOracle(), (48, 64))
    config = AgentConfig(max_steps=10, history=history)  # type: ignore[arg-type]
    trajectory = run_agent(recording, session, IMAGE, "Segment the disc and the square.", ["disc", "square"],
                           config=config, ground_truth=truth)
    assert trajectory.stop_reason in ("terminate", "max_steps") and len(trajectory.steps) >= 4
    records = trajectory.to_records("case", "img.png", "embedded", ground_truth=truth, source="simulated")
    env, observations = replay_records(records, IMAGE, policy_grid=(48, 64), history=history)  # type: ignore[arg-type]
    assert len(observations) == len(recording.requests) == len(env.steps)
    for obs, request in zip(observations, recording.requests):
        assert same_observation(obs, request)
    assert env.stop_reason == trajectory.stop_reason and env.answer == trajectory.answer
    # an inconsistent record (a mask that changes on a turn without clicks) does not replay silently
    assert records[0].steps[0].error and not records[0].steps[0].clicks
    records[0].steps[0].mask = records[0].steps[1].mask
    with pytest.raises(ValueError, match="does not replay"):
        replay_records(records, IMAGE, policy_grid=(48, 64))


def test_a_correction_record_replays_from_its_starting_mask(session: ImageSession) -> None:
    from ibisagent.corrections import correction_record

    agent = np.zeros((H, W), bool)
    agent[30:50, 40:60] = True
    record = correction_record(IMAGE, agent, DISC, session, "Segment the disc.", "img.png", case_id="c",
                               target="disc", tool_name="embedded")
    env, observations = replay_records([record], IMAGE)
    assert len(observations) == len(record.steps) - 1 and env.stop_reason == record.stop_reason
    assert np.array_equal(observations[0].image, observation_image(IMAGE, [agent]))  # starts on the agent's mask


def test_importing_the_figures_leaves_matplotlib_global_state_alone() -> None:
    code = ("import sys, ibisagent.render; assert 'matplotlib.pyplot' not in sys.modules; "
            "import matplotlib; assert matplotlib.rcParams._get_backend_or_none() is None; print('clean')")
    env = {**os.environ, "PYTHONPATH": str(LIB)}
    env.pop("MPLBACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr
