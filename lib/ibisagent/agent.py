"""The segmentation MDP loop (DESIGN §2): the policy writes actions, the tool turns clicks into masks, the overlay of
the new masks is the next observation.

One step::

    conversation ──policy.generate──▶ "<think>…</think><action>Positive Point (0.51, 0.30)</action>"
        ──parse──▶ actions ──route to targets──▶ clicks (pixels) ──session.predict(all clicks, prior logits)──▶ masks
        ──render.overlay──▶ next user turn (overlay image + refinement prompt)

* **State** is immutable (:class:`AgentState`): per target the mask, the tool logits and the clicks so far, plus a
  link to the previous state, which is the undo stack. ``Undo`` returns to the state before the last change (one
  step's clicks, or a ``Reset``); ``Undo`` with nothing to undo changes nothing. ``Reset`` empties every target
  (mask, logits and clicks).
* **Clicks**: several lines = several clicks in one step. A click's `` [target]`` suffix routes it to that target
  (matched case-insensitively); without a suffix it goes to the first target. An unknown target name is malformed
  output. For each target that got clicks the tool sees *all* clicks so far of that target and that target's
  previous logits.
* **Grids**: the policy sees the image resized once to :meth:`Policy.image_size` (the *policy grid*, (ph, pw)); the
  tool session and every returned mask are in the *original grid* (H, W). A click's relative coordinates are converted
  straight to the original grid with :meth:`Action.to_click` (its policy-grid pixel is used only to detect repeats).
  Masks shown to the policy are resized to the policy grid with nearest-neighbour sampling of pixel centres.
* **History** (:attr:`AgentConfig.history`): ``off`` sends system prompt + current observation each step (as the
  released checkpoint was run); ``full`` sends system prompt, first image turn, then every assistant turn and
  observation in order. Failed attempts and their repair turns are sent only while repairing that step.
* **Stops** (:data:`StopReason`): ``terminate``, ``max_steps``, ``repeated_click`` (the same click — target, policy
  pixel, polarity — requested :attr:`AgentConfig.repeat_limit` times in the trajectory; the repeating step is not
  applied), ``time_limit``, ``unparseable`` (still malformed after :attr:`AgentConfig.repair_retries` repair turns)
  and ``policy_error`` (the backend raised :class:`PolicyError`). Bad model output never raises: the trajectory
  keeps the last valid masks.
* **Batching**: :func:`run_agents` steps several trajectories in lockstep, one ``policy.generate`` call per round
  for every unfinished trajectory. Nothing in the loop is shared between calls or threads: one policy and one tool
  session may serve many agents at once.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from PIL import Image as PILImage

from ibisagent.clicks import Click
from ibisagent.data.trajectory import ClickRecord, StepRecord, TrajectoryRecord, rle_encode
from ibisagent.metrics import dice, iou
from ibisagent.policies.base import (
    Generation,
    GenerationOptions,
    Message,
    Observation,
    Policy,
    PolicyError,
    PolicyRequest,
)
from ibisagent.prompts import Prompts, load_prompts
from ibisagent.protocol import Action, ProtocolError, Response, format_action, parse_response, repair_message
from ibisagent.render import overlay
from ibisagent.tools.base import ImageSession, check_image

HistoryMode = Literal["off", "full"]
StopReason = Literal["terminate", "max_steps", "repeated_click", "time_limit", "unparseable", "policy_error"]

#: Interpolation for resizing the image to the policy grid (masks use nearest-neighbour).
IMAGE_RESAMPLING = PILImage.Resampling.LANCZOS
#: Phrases in a final answer that declare a target absent (per clause; see :func:`absent_targets`).
_ABSENT_PHRASE = re.compile(
    r"\b(?:not\s+(?:be\s+)?(?:present|visible|seen|found|detected|identified|shown|depicted|included)|absent"
    r"|cannot\s+be\s+(?:seen|found|identified|located)|there\s+is\s+no|there\s+are\s+no)\b"
    r"|^\s*no\b.*\b(?:is|are)\s+(?:present|visible|seen|identified|detected)\b",
    re.IGNORECASE,
)
#: An answer clause that is a bare denial: "No.", "None", "No, …" (not "no further correction is needed").
_DENIAL = re.compile(r"^\s*(?:no|none)\s*(?:[,:!]|$)", re.IGNORECASE)
#: Clause boundaries of an answer: semicolons, newlines and sentence ends.
_CLAUSE_SPLIT = re.compile(r"[;\n]|\.(?:\s|$)")


@dataclass(frozen=True)
class AgentConfig:
    """Settings of the loop.

    Attributes:
        max_steps: most policy steps per trajectory (a step's repair retries do not count as steps).
        history: ``"off"``: each step sees the system prompt + the current overlay + the refinement prompt (how the
            released checkpoint was run). ``"full"``: the whole interleaved history — first image, every assistant
            turn, every observation overlay.
        repeat_limit: stop with ``repeated_click`` when the same click (same target, pixel and polarity) is
            requested this many times in one trajectory.
        time_limit: wall-clock seconds per trajectory (checked before each policy call); ``None`` = no limit.
        repair_retries: repair turns (the error and the expected format, :func:`protocol.repair_message`) after
            malformed output before stopping with ``unparseable``.
        options: decoding settings passed to the policy.
    """

    max_steps: int = 10
    history: HistoryMode = "off"
    repeat_limit: int = 3
    time_limit: float | None = None
    repair_retries: int = 1
    options: GenerationOptions = field(default_factory=GenerationOptions)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.history not in ("off", "full"):
            raise ValueError(f"history must be 'off' or 'full', got {self.history!r}")
        if self.repeat_limit < 1:
            raise ValueError(f"repeat_limit must be >= 1, got {self.repeat_limit}")
        if self.time_limit is not None and not (self.time_limit >= 0 and math.isfinite(self.time_limit)):
            raise ValueError(f"time_limit must be a non-negative number of seconds or None, got {self.time_limit}")
        if self.repair_retries < 0:
            raise ValueError(f"repair_retries must be >= 0, got {self.repair_retries}")


@dataclass(frozen=True)
class AgentJob:
    """One trajectory to run.

    Attributes:
        session: the tool's encoding of ``image`` (may be shared with other jobs and threads).
        image: (H, W, 3) uint8 RGB, the original image (the grid of the session and of all returned masks).
        instruction: the user's request, e.g. "Segment the left kidney."
        targets: target names in request order (one colour each in the overlay).
        initial_masks: target name → (H, W) bool mask to refine (refinement mode); targets left out start empty.
    """

    session: ImageSession
    image: np.ndarray
    instruction: str
    targets: tuple[str, ...]
    initial_masks: Mapping[str, np.ndarray] | None = None


@dataclass(frozen=True)
class TargetState:
    """One target's state: (H, W) bool ``mask`` and the tool's ``logits`` (``None`` = no prior) in the original grid,
    and every ``click`` so far in original-grid pixels, in order."""

    mask: np.ndarray
    logits: np.ndarray | None
    clicks: tuple[Click, ...] = ()


@dataclass(frozen=True)
class AgentState:
    """All targets' states (in target order) and the state before the last change (the undo stack)."""

    targets: tuple[TargetState, ...]
    previous: AgentState | None = None

    def push(self, targets: tuple[TargetState, ...]) -> AgentState:
        """A new state with ``targets``, undoable back to this one."""
        return AgentState(targets=targets, previous=self)

    def undo(self) -> AgentState:
        """The state before the last change (this one when there is nothing to undo)."""
        return self.previous if self.previous is not None else self


@dataclass(frozen=True)
class AgentClick:
    """A click the agent applied: its ``target``, the policy's ``action`` (relative coordinates) and the ``click`` in
    original-grid pixels."""

    target: str
    action: Action
    click: Click


@dataclass(frozen=True)
class StepTimings:
    """Seconds spent in one step: ``policy`` (wall time of the batched generate call this step was part of),
    ``prefill`` / ``decode`` (as the policy reported them for this request), ``tool`` and ``render``."""

    policy: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    tool: float = 0.0
    render: float = 0.0

    @property
    def total(self) -> float:
        return self.policy + self.tool + self.render


@dataclass(frozen=True)
class AgentStep:
    """One policy turn.

    Attributes:
        index: 0-based step number (repair attempts of a step share its index).
        attempt: 0 for the first try, 1… for repair retries.
        raw: the model's text as generated.
        response: the parsed turn, or ``None`` when it was malformed.
        error: what was wrong with it (``None`` when it was used).
        actions: the actions applied (empty for malformed output or a step stopped by ``repeated_click``).
        clicks: the clicks added, with target and both coordinate systems.
        masks: target name → (H, W) bool mask after the step, original grid.
        timings: where the step's time went.
    """

    index: int
    attempt: int
    raw: str
    response: Response | None
    error: str | None
    actions: tuple[Action, ...]
    clicks: tuple[AgentClick, ...]
    masks: Mapping[str, np.ndarray]
    timings: StepTimings


@dataclass(frozen=True)
class AgentTrajectory:
    """The outcome of one run.

    Attributes:
        instruction: the request.
        targets: target names in order.
        steps: every policy turn, including malformed ones.
        masks: target name → final (H, W) bool mask in the original grid (the last valid state).
        answer: the final ``<answer>`` text (``None`` unless the policy terminated with one).
        stop_reason: why the loop stopped (:data:`StopReason`).
        seconds: totals by category: ``policy``, ``prefill``, ``decode``, ``tool``, ``render``, ``total`` (wall).
        error: the last malformed-output or policy error message, if any.
    """

    instruction: str
    targets: tuple[str, ...]
    steps: tuple[AgentStep, ...]
    masks: Mapping[str, np.ndarray]
    answer: str | None
    stop_reason: StopReason
    seconds: Mapping[str, float]
    error: str | None = None

    def to_records(
        self,
        case_id: str,
        image_ref: str,
        tool_name: str,
        modality: str = "",
        slice: int | None = None,  # noqa: A002 - the manifest's field name
        ground_truth: Mapping[str, np.ndarray | None] | None = None,
        window: Mapping[str, Any] | None = None,
    ) -> list[TrajectoryRecord]:
        """One :class:`TrajectoryRecord` per target (source ``"policy"``): per step the target's clicks, its mask
        (RLE), IoU when ``ground_truth`` (name → (H, W) bool, ``None`` = absent) is given, think and raw text;
        ``window`` is the display rule of the picture (:meth:`ibisagent.imaging.DisplayWindow.to_dict`)."""
        records = []
        share = self.seconds.get("total", 0.0) / max(len(self.targets), 1)
        for name in self.targets:
            truth = _truth_for(ground_truth, name, self.masks[name].shape)
            steps = [_step_record(step, name, truth, len(self.targets) > 1) for step in self.steps]
            final = self.masks[name]
            records.append(TrajectoryRecord(
                id=case_id, instruction=self.instruction, image=image_ref, target=name, tool=tool_name,
                source="policy", modality=modality, slice=slice,
                window=dict(window) if window is not None else None, steps=steps,
                final_iou=None if truth is None else round(iou(final, truth), 6),
                final_dice=None if truth is None else round(dice(final, truth), 6),
                stop_reason=self.stop_reason, answer=self.answer, seconds=round(share, 6),
            ))
        return records


def run_agent(
    policy: Policy,
    session: ImageSession,
    image: np.ndarray,
    instruction: str,
    targets: Sequence[str] | str,
    *,
    config: AgentConfig | None = None,
    prompts: Prompts | None = None,
    initial_masks: Mapping[str, np.ndarray] | None = None,
) -> AgentTrajectory:
    """Run one trajectory: :func:`run_agents` with a single job.

    Args:
        policy: any :class:`Policy`.
        session: the tool's encoding of ``image``.
        image: (H, W, 3) uint8 RGB.
        instruction: the request text.
        targets: target name(s) in order.
        config: loop settings (default :class:`AgentConfig`).
        prompts: wording (default :func:`load_prompts`).
        initial_masks: target name → (H, W) bool to refine; ``None`` starts empty.
    """
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    job = AgentJob(session=session, image=image, instruction=instruction, targets=names, initial_masks=initial_masks)
    return run_agents(policy, [job], config, prompts)[0]


def run_agents(
    policy: Policy,
    jobs: Sequence[AgentJob],
    config: AgentConfig | None = None,
    prompts: Prompts | None = None,
) -> list[AgentTrajectory]:
    """Run several independent trajectories in lockstep: each round makes one batched ``policy.generate`` call for
    every unfinished trajectory (including those retrying after malformed output). Returns one trajectory per job,
    in order. Raises ``ValueError`` only for bad jobs (image, targets, initial masks), never for model output."""
    config = config or AgentConfig()
    prompts = prompts or load_prompts()
    runs = [_Run(policy, job, config, prompts) for job in jobs]
    while active := [run for run in runs if not run.finished()]:
        requests = [run.request() for run in active]
        start = time.perf_counter()
        try:
            generations = policy.generate(requests, _call_options(config, active))
            if len(generations) != len(requests):
                raise PolicyError(f"policy {getattr(policy, 'name', type(policy).__name__)} returned "
                                  f"{len(generations)} replies for {len(requests)} requests")
        except PolicyError as exc:
            for run in active:
                run.stop("policy_error", str(exc))
            continue
        wall = time.perf_counter() - start
        for run, generation in zip(active, generations, strict=True):
            run.consume(generation, wall)
    return [run.result() for run in runs]


def _call_options(config: AgentConfig, active: Sequence[_Run]) -> GenerationOptions:
    """``config.options`` with a deadline at the earliest time limit of the ``active`` trajectories, so that the time
    limit also bounds a policy call in progress (policies that honour :attr:`GenerationOptions.deadline`)."""
    if config.time_limit is None:
        return config.options
    left = min(config.time_limit - (time.perf_counter() - run.started) for run in active)
    return replace(config.options, deadline=time.monotonic() + max(0.0, left))


# --------------------------------------------------------------------------------------------------------------
# grids


def resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 → (h, w, 3) uint8 for ``size`` = (h, w), Lanczos; the input itself when the size matches."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    h, w = size
    return np.asarray(PILImage.fromarray(rgb).resize((w, h), IMAGE_RESAMPLING))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool → (h, w) bool for ``size`` = (h, w), nearest neighbour at pixel centres."""
    if mask.shape == tuple(size):
        return mask
    rows = _centre_index(size[0], mask.shape[0])
    cols = _centre_index(size[1], mask.shape[1])
    return mask[np.ix_(rows, cols)]


def _centre_index(n_out: int, n_in: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


# --------------------------------------------------------------------------------------------------------------
# answers


def absent_targets(answer: str | None, targets: Sequence[str]) -> frozenset[str]:
    """The targets a final answer declares absent ("not present", "absent", "No.", "no <target>", …).

    The answer is split into clauses (``;``, newlines, sentence ends). A clause that declares absence applies to
    the targets it names; one that names none applies to every target only when the whole answer names no target
    (so "The liver is segmented. The gallbladder is not visible." keeps the liver). ``"no <target>"`` (up to three
    words between) declares that target absent.
    """
    if not answer:
        return frozenset()
    lowered = answer.casefold()
    names = {name: name.casefold() for name in targets}
    any_named = any(n in lowered for n in names.values())
    absent: set[str] = set()
    for clause in _CLAUSE_SPLIT.split(lowered):
        named = {name for name, n in names.items() if n in clause}
        for name, n in names.items():
            if re.search(rf"\bno\s+(?:\S+\s+){{0,3}}?{re.escape(n)}", clause):
                absent.add(name)
        if not (_ABSENT_PHRASE.search(clause) or _DENIAL.match(clause)):
            continue
        if named:
            absent |= named
        elif not any_named:
            absent |= set(targets)
    return frozenset(absent)


# --------------------------------------------------------------------------------------------------------------
# one trajectory's mutable bookkeeping, private to one run_agents call


@dataclass(frozen=True)
class _Routed:
    """An action with its target index (clicks only) and its pixel click in the policy grid."""

    action: Action
    target: int | None = None
    policy_click: Click | None = None


class _Run:
    """The loop of one job. Created and used only inside one :func:`run_agents` call (never shared)."""

    def __init__(self, policy: Policy, job: AgentJob, config: AgentConfig, prompts: Prompts) -> None:
        self.job = _checked_job(job)
        self.config = config
        self.prompts = prompts
        self.session = job.session
        self.grid = tuple(self.job.image.shape[:2])
        ph, pw = policy.image_size(*self.grid)
        if int(ph) < 1 or int(pw) < 1:
            raise ValueError(f"policy {getattr(policy, 'name', type(policy).__name__)} asked for an image size of "
                             f"{ph}x{pw} for a {self.grid[0]}x{self.grid[1]} image")
        self.policy_grid = (int(ph), int(pw))
        self.started = time.perf_counter()
        self.seconds: Counter[str] = Counter()
        t0 = time.perf_counter()
        self.policy_image = resize_image(self.job.image, self.policy_grid)
        self.seconds["render"] += time.perf_counter() - t0
        self.state = self._initial_state()
        self.steps: list[AgentStep] = []
        self.step_index = 0
        self.attempt = 0
        self.click_counts: Counter[tuple[int, int, int, bool]] = Counter()
        self.stop_reason: StopReason | None = None
        self.answer: str | None = None
        self.error: str | None = None
        self.system: Message = _text_message("system", prompts.system)
        refining = any(t.mask.any() for t in self.state.targets)
        if refining:
            t0 = time.perf_counter()
            first = self._observation_message()
            self.seconds["render"] += time.perf_counter() - t0
        else:
            first = _image_message(self.policy_image, prompts.first_turn(self.job.instruction, self.job.targets))
        self.history: list[Message] = [self.system, first]  # full mode: the whole clean history
        self.current: Message = first  # off mode: the latest observation turn
        self.repair_tail: list[Message] = []  # failed attempts of the current step and their repair turns

    # -- lockstep interface -------------------------------------------------------------------------------------

    def finished(self) -> bool:
        """Whether this trajectory has stopped; stops it with ``time_limit`` when its wall clock has run out."""
        if self.stop_reason is None and self.config.time_limit is not None:
            if time.perf_counter() - self.started >= self.config.time_limit:
                self.stop("time_limit", None)
        return self.stop_reason is not None

    def request(self) -> PolicyRequest:
        base = self.history if self.config.history == "full" else [self.system, self.current]
        observation = Observation(
            image=self.policy_image,
            masks={name: resize_mask(mask, self.policy_grid) for name, mask in self._masks().items()},
            targets=self.job.targets,
            step=self.step_index,
        )
        return PolicyRequest(messages=[*base, *self.repair_tail], observation=observation)

    def consume(self, generation: Generation, wall: float) -> None:
        """Apply one reply: parse, route, run the tool, render the next observation, decide whether to stop."""
        self.seconds["policy"] += wall
        self.seconds["prefill"] += generation.prefill_seconds
        self.seconds["decode"] += generation.decode_seconds
        timings = StepTimings(policy=wall, prefill=generation.prefill_seconds, decode=generation.decode_seconds)
        raw = generation.text if isinstance(generation.text, str) else ""
        try:
            response = parse_response(generation.text)
            routed = self._route(response)
        except ProtocolError as exc:
            self._malformed(raw, exc, timings)
            return
        actions = tuple(r.action for r in routed)
        if response.terminates:
            self._terminate(raw, response, actions, timings)
            return
        repeated = self._repeated(routed)
        if repeated is not None:
            self._record(raw, response, None, (), (), timings)
            self.stop("repeated_click", repeated)
            return
        t0 = time.perf_counter()
        self.state, clicks = self._apply(routed)
        timings = replace(timings, tool=time.perf_counter() - t0)
        self.seconds["tool"] += timings.tool
        if self.step_index + 1 >= self.config.max_steps:
            self._record(raw, response, None, actions, clicks, timings)
            self.stop("max_steps", None)
            return
        t0 = time.perf_counter()
        observation = self._observation_message()
        timings = replace(timings, render=time.perf_counter() - t0)
        self.seconds["render"] += timings.render
        self._record(raw, response, None, actions, clicks, timings)
        if self.config.history == "full":
            self.history += [_text_message("assistant", raw), observation]
        self.current = observation
        self.repair_tail = []
        self.attempt = 0
        self.step_index += 1

    def stop(self, reason: StopReason, error: str | None) -> None:
        self.stop_reason = reason
        if error is not None:
            self.error = error

    def result(self) -> AgentTrajectory:
        assert self.stop_reason is not None
        seconds = dict(self.seconds)
        seconds["total"] = time.perf_counter() - self.started
        return AgentTrajectory(
            instruction=self.job.instruction, targets=self.job.targets, steps=tuple(self.steps),
            masks={name: mask.copy() for name, mask in self._masks().items()}, answer=self.answer,
            stop_reason=self.stop_reason,
            seconds={k: seconds.get(k, 0.0) for k in ("policy", "prefill", "decode", "tool", "render", "total")},
            error=self.error,
        )

    # -- steps ----------------------------------------------------------------------------------------------------

    def _malformed(self, raw: str, exc: ProtocolError, timings: StepTimings) -> None:
        self._record(raw, None, str(exc), (), (), timings)
        if self.attempt >= self.config.repair_retries:
            self.stop("unparseable", str(exc))
            return
        self.attempt += 1
        self.repair_tail += [
            _text_message("assistant", raw),
            _text_message("user", self.prompts.repair_turn(repair_message(exc))),
        ]

    def _terminate(self, raw: str, response: Response, actions: tuple[Action, ...], timings: StepTimings) -> None:
        self.answer = response.answer
        absent = absent_targets(response.answer, self.job.targets)
        if absent:
            self.state = self.state.push(tuple(
                _empty_target(self.grid) if name in absent else target
                for name, target in zip(self.job.targets, self.state.targets)
            ))
        self._record(raw, response, None, actions, (), timings)
        self.stop("terminate", None)

    def _route(self, response: Response) -> tuple[_Routed, ...]:
        """Resolve click targets and policy-grid pixels; an unknown target name raises :class:`ProtocolError`."""
        lookup = {name.strip().casefold(): i for i, name in enumerate(self.job.targets)}
        ph, pw = self.policy_grid
        routed = []
        for action in response.actions:
            if not action.is_click:
                routed.append(_Routed(action))
                continue
            index = 0
            if action.target is not None:
                found = lookup.get(action.target.strip().casefold())
                if found is None:
                    raise ProtocolError(f"unknown target [{action.target}]; the targets are: "
                                        + ", ".join(f"[{t}]" for t in self.job.targets))
                index = found
            routed.append(_Routed(action, index, action.to_click(pw, ph)))
        return tuple(routed)

    def _repeated(self, routed: Sequence[_Routed]) -> str | None:
        """Count this step's clicks; a message when one reaches the repeat limit (counts kept only if none does)."""
        counts = self.click_counts.copy()
        for r in routed:
            if r.policy_click is None or r.target is None:
                continue
            key = (r.target, r.policy_click.x, r.policy_click.y, r.policy_click.positive)
            counts[key] += 1
            if counts[key] >= self.config.repeat_limit:
                return (f"click {format_action(r.action)} on {self.job.targets[r.target]} requested "
                        f"{counts[key]} times")
        self.click_counts = counts
        return None

    def _apply(self, routed: Sequence[_Routed]) -> tuple[AgentState, tuple[AgentClick, ...]]:
        """Apply actions in order: runs of clicks become one tool call per touched target and one undoable change;
        ``Undo`` and ``Reset`` act between runs."""
        state = self.state
        added: list[AgentClick] = []
        pending: dict[int, list[Click]] = {}
        for r in routed:
            if r.policy_click is not None and r.target is not None:
                click = r.action.to_click(self.grid[1], self.grid[0])  # relative → original grid, no detour
                pending.setdefault(r.target, []).append(click)
                added.append(AgentClick(self.job.targets[r.target], r.action, click))
                continue
            state = self._flush(state, pending)
            pending = {}
            if r.action.kind == "undo":
                state = state.undo()
            elif r.action.kind == "reset":
                state = state.push(tuple(_empty_target(self.grid) for _ in self.job.targets))
        return self._flush(state, pending), tuple(added)

    def _flush(self, state: AgentState, pending: Mapping[int, list[Click]]) -> AgentState:
        if not pending:
            return state
        targets = list(state.targets)
        for index, new in pending.items():
            current = targets[index]
            clicks = (*current.clicks, *new)
            prediction = self.session.predict(clicks, current.logits)
            targets[index] = TargetState(_frozen(prediction.mask), prediction.logits, clicks)
        return state.push(tuple(targets))

    # -- observations and records ----------------------------------------------------------------------------

    def _observation_message(self) -> Message:
        masks = [resize_mask(t.mask, self.policy_grid) for t in self.state.targets]
        picture = overlay(self.policy_image, masks)
        return _image_message(picture, self.prompts.refine_turn(self.job.instruction, self.job.targets))

    def _masks(self) -> dict[str, np.ndarray]:
        return {name: t.mask for name, t in zip(self.job.targets, self.state.targets)}

    def _record(self, raw: str, response: Response | None, error: str | None, actions: tuple[Action, ...],
                clicks: tuple[AgentClick, ...], timings: StepTimings) -> None:
        self.steps.append(AgentStep(
            index=self.step_index, attempt=self.attempt, raw=raw, response=response, error=error, actions=actions,
            clicks=clicks,
            masks=self._masks(), timings=timings,
        ))

    def _initial_state(self) -> AgentState:
        targets = []
        initial = self.job.initial_masks or {}
        for name in self.job.targets:
            mask = initial.get(name)
            if mask is None or not np.any(mask):
                targets.append(_empty_target(self.grid))
                continue
            mask = _frozen(mask)
            t0 = time.perf_counter()
            try:
                logits: np.ndarray | None = self.session.logits_from_mask(mask)
            except NotImplementedError:
                logits = None
            self.seconds["tool"] += time.perf_counter() - t0
            targets.append(TargetState(mask, logits, ()))
        return AgentState(tuple(targets))


def _empty_target(grid: tuple[int, ...]) -> TargetState:
    return TargetState(_frozen(np.zeros(grid, dtype=bool)), None, ())


def _frozen(mask: np.ndarray) -> np.ndarray:
    """A read-only bool copy of ``mask``: states are shared by steps, observations and the undo stack."""
    out = np.array(mask, dtype=bool)
    out.flags.writeable = False
    return out


def _checked_job(job: AgentJob) -> AgentJob:
    """Validate a job (``ValueError`` naming the problem) and normalise targets to a tuple."""
    image = check_image(job.image)
    targets = (job.targets,) if isinstance(job.targets, str) else tuple(job.targets)
    if not targets:
        raise ValueError("an agent job needs at least one target")
    folded = [t.strip().casefold() for t in targets]
    if len(set(folded)) != len(folded):
        raise ValueError(f"target names must be distinct (case-insensitive): {targets}")
    for name in targets:
        if not name.strip() or any(ch in name for ch in "[]\n"):
            raise ValueError(f"target name {name!r} must be non-empty, one line, without square brackets")
    session_shape = tuple(job.session.shape)
    if session_shape != image.shape[:2]:
        raise ValueError(f"tool session shape {session_shape} != image shape {image.shape[:2]}")
    initial = dict(job.initial_masks or {})
    unknown = sorted(set(initial) - set(targets))
    if unknown:
        raise ValueError(f"initial masks for unknown target(s) {unknown}; targets are {list(targets)}")
    for name, mask in initial.items():
        if mask is not None and np.shape(mask) != image.shape[:2]:
            raise ValueError(f"initial mask of {name!r} has shape {np.shape(mask)}, image is {image.shape[:2]}")
    return replace(job, image=image, targets=targets)


def _text_message(role: str, text: str) -> Message:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _image_message(image: np.ndarray, text: str) -> Message:
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


def _truth_for(ground_truth: Mapping[str, np.ndarray | None] | None, name: str,
               shape: tuple[int, ...]) -> np.ndarray | None:
    if ground_truth is None or name not in ground_truth:
        return None
    mask = ground_truth[name]
    return np.zeros(shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)


def _step_record(step: AgentStep, name: str, truth: np.ndarray | None, multi: bool) -> StepRecord:
    mask = step.masks[name]
    clicks = [
        ClickRecord(x=float(c.action.x), y=float(c.action.y), px=c.click.x, py=c.click.y,  # type: ignore[arg-type]
                    positive=c.click.positive, target=c.target if multi else None)
        for c in step.clicks if c.target == name
    ]
    return StepRecord(
        clicks=clicks, mask=rle_encode(mask), iou=None if truth is None else round(iou(mask, truth), 6),
        action="\n".join(format_action(a) for a in step.actions),
        think=step.response.think if step.response is not None else "", raw=step.raw,
        seconds=round(step.timings.total, 6),
    )


__all__ = [
    "AgentClick", "AgentConfig", "AgentJob", "AgentState", "AgentStep", "AgentTrajectory", "HistoryMode",
    "StepTimings", "StopReason", "TargetState", "absent_targets", "resize_image", "resize_mask",
    "run_agent", "run_agents",
]
