"""The segmentation MDP as one environment (DESIGN §2): every producer of conversations steps it — the agent loop at
inference (:mod:`ibisagent.agent`), the simulated expert that writes SFT data (the oracle policy stepping it), GRPO
rollouts (a thin trl ``environment_factory`` adapter) and the MONAI Label app — so what a model sees in training is
byte for byte what it sees in use.

One step::

    observation (messages + images) ──policy──▶ "<think>…</think><action>Positive Point (0.51, 0.30)</action>"
        ──env.step(text)──▶ parse ──route to targets──▶ clicks (pixels) ──session.predict(all clicks, prior logits)
        ──▶ masks ──observation.observation_image──▶ next observation (overlay + refinement prompt)

Usage::

    env = SegmentationEnv(rgb, "Segment the liver.", ["liver"], session, ground_truth={"liver": mask})
    obs = env.reset()
    while not env.done:
        result = env.step(policy_text(obs.messages, obs.images))   # a StepResult
        obs = result.observation                                   # None once done
    trajectory = env.trajectory()

* **State** is immutable (:class:`EnvState`): per target the mask, the tool logits and the clicks so far, plus a
  link to the previous state, which is the undo stack. ``Undo`` returns to the state before the last change (one
  step's clicks, or a ``Reset``); ``Undo`` with nothing to undo changes nothing. ``Reset`` empties every target.
* **Clicks**: several lines = several clicks in one step. A click's `` [target]`` suffix routes it to that target
  (case-insensitive); without a suffix it goes to the first target. An unknown target name is malformed output. For
  each target that got clicks the tool sees *all* clicks so far of that target and that target's previous logits.
* **Grids**: the policy sees the image resized once to the *policy grid* (``policy_grid``, (ph, pw)) with
  :func:`ibisagent.observation.resize_image`; the tool session, ground truth and every mask in a result are in the
  *image grid* (H, W). Relative click coordinates go straight to the image grid (:meth:`Action.to_click`); the
  policy-grid pixel only identifies repeats.
* **History** (:attr:`EnvConfig.history`): ``off`` = system prompt + current observation each step (as the released
  checkpoint was run); ``full`` = system prompt, first image turn, then every assistant turn and observation in
  order. A failed attempt and its repair turn are shown only while repairing that step.
* **Points** (:attr:`EnvConfig.show_points`, off by default): each refinement turn ends with a line listing the
  current state's clicks. A policy trained with it records so in its folder (:data:`OBSERVATION_FILE`) and drivers
  apply it (:meth:`ibisagent.agent.AgentConfig.env_for`).
* **Stops** (:data:`StopReason`): ``terminate``; ``max_steps``; ``repeated_click`` (the same click — target,
  policy-grid pixel, polarity — :attr:`EnvConfig.repeat_limit` times in a row, ``Undo``/``Reset`` breaking the
  run; the repeating step is not applied); ``unparseable`` (still malformed after
  :attr:`EnvConfig.repair_retries` repair turns); ``tool_error`` (the tool raised; its message is kept, the episode
  keeps its last masks). Drivers add ``time_limit`` and ``policy_error`` through :meth:`SegmentationEnv.stop`.
  Bad model output never raises.
* **Ground truth** (optional, image grid, ``None`` = absent target): each :class:`StepResult` then carries per
  target the IoU before and after the step (:class:`TargetScore`) and per click whether it fell where it should
  (:attr:`ClickResult.in_error_region`). Together with :attr:`StepResult.raw` (format reward), the answer and
  :attr:`StepResult.index` this is everything the rewards of :mod:`ibisagent.rewards` read; nothing is recomputed
  there.

An environment is one episode's mutable state: never share one between threads. Policies and tool sessions are
shared freely.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image as PILImage

from ibisagent.clicks import Click
from ibisagent.data.trajectory import ClickRecord, StepRecord, TrajectoryRecord, rle_decode, rle_encode
from ibisagent.fileio import atomic_write_text
from ibisagent.metrics import dice, iou
from ibisagent.observation import observation_image, resize_image, resize_mask, to_pil
from ibisagent.policies.base import Conversation, Message, Observation, PolicyRequest
from ibisagent.prompts import Prompts, load_prompts
from ibisagent.protocol import (
    Action,
    ProtocolError,
    Response,
    format_action,
    format_response,
    is_strict_format,
    parse_response,
    repair_message,
    to_pixel,
    to_relative,
)
from ibisagent.tools.base import ImageSession, Prediction, check_image

HistoryMode = Literal["off", "full"]
StopReason = Literal[
    "terminate", "max_steps", "repeated_click", "time_limit", "unparseable", "policy_error", "tool_error"
]

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


# --------------------------------------------------------------------------------------------------------------
# settings and records


@dataclass(frozen=True)
class EnvConfig:
    """Settings of one episode.

    Attributes:
        max_steps: most policy steps (a step's repair retries do not count as steps); the episode stops with
            ``max_steps`` after the last one is applied.
        history: ``"off"``: each observation is the system prompt + the current overlay + the refinement prompt (how
            the released checkpoint was run). ``"full"``: the whole interleaved history.
        repeat_limit: stop with ``repeated_click`` when the same click (target, policy-grid pixel, polarity) is
            requested this many times in a row (``Undo`` and ``Reset`` break the run), the authors' rule.
        repair_retries: repair turns (the error and the expected format, :func:`protocol.repair_message`) after
            malformed output before stopping with ``unparseable``.
        show_points: append to each refinement turn a line listing the points placed so far, per target in click
            order, as action lines (:meth:`Prompts.points_line`; image-grid pixel centres, four decimals). Off by
            default: the released checkpoint was trained without it. With history ``off`` the overlay alone does
            not tell a model which points it already placed, so a small policy repeats its last one; a policy
            trained with the line records it in its folder (:func:`write_observation`).
    """

    max_steps: int = 10
    history: HistoryMode = "off"
    repeat_limit: int = 3
    repair_retries: int = 1
    show_points: bool = False

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.history not in ("off", "full"):
            raise ValueError(f"history must be 'off' or 'full', got {self.history!r}")
        if self.repeat_limit < 1:
            raise ValueError(f"repeat_limit must be >= 1, got {self.repeat_limit}")
        if self.repair_retries < 0:
            raise ValueError(f"repair_retries must be >= 0, got {self.repair_retries}")


#: The file in a policy folder (and in the training data it was made from) that records how the policy observes:
#: the :class:`EnvConfig` fields of :data:`OBSERVATION_FIELDS` it was trained with. Drivers apply them
#: (:func:`ibisagent.agent.make_env`), so a checkpoint is run the way it was trained without flags.
OBSERVATION_FILE = "ibisagent.json"
#: The :class:`EnvConfig` fields that change what a policy sees (its observation) and so belong to a checkpoint.
OBSERVATION_FIELDS = ("show_points",)


def read_observation(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The observation settings recorded in ``folder`` (:data:`OBSERVATION_FILE`): field → value, ``{}`` when the
    folder has no such file (a checkpoint trained elsewhere: the defaults apply).

    Raises:
        ValueError: the file is not a JSON object of known fields with values of the right type (names the file).
    """
    path = Path(folder) / OBSERVATION_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc
    observation = data.get("observation") if isinstance(data, dict) else None
    if not isinstance(observation, dict):
        raise ValueError(f"{path}: expected an object with an 'observation' object, got {data!r}")
    unknown = sorted(set(observation) - set(OBSERVATION_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown observation setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(OBSERVATION_FIELDS)}")
    if not all(isinstance(value, bool) for value in observation.values()):
        raise ValueError(f"{path}: observation settings must be true or false, got {observation!r}")
    return dict(observation)


def write_observation(folder: str | os.PathLike[str], settings: Mapping[str, Any]) -> Path:
    """Record observation settings (:data:`OBSERVATION_FIELDS` taken from ``settings``, an :class:`EnvConfig`'s
    fields or :func:`read_observation`'s result; missing ones get the defaults) in ``folder``; returns the file."""
    defaults = EnvConfig()
    observation = {name: bool(settings.get(name, getattr(defaults, name))) for name in OBSERVATION_FIELDS}
    path = Path(folder) / OBSERVATION_FILE
    atomic_write_text(path, json.dumps({"observation": observation}, indent=2, sort_keys=True) + "\n")
    return path


@dataclass(frozen=True)
class TargetState:
    """One target's state: (H, W) bool ``mask`` and the tool's ``logits`` (``None`` = no prior) in the image grid,
    and every ``click`` so far in image-grid pixels, in order."""

    mask: np.ndarray
    logits: np.ndarray | None
    clicks: tuple[Click, ...] = ()


@dataclass(frozen=True)
class EnvState:
    """All targets' states (in target order) and the state before the last change (the undo stack)."""

    targets: tuple[TargetState, ...]
    previous: EnvState | None = None

    def push(self, targets: tuple[TargetState, ...]) -> EnvState:
        """A new state with ``targets``, undoable back to this one."""
        return EnvState(targets=targets, previous=self)

    def undo(self) -> EnvState:
        """The state before the last change (this one when there is nothing to undo)."""
        return self.previous if self.previous is not None else self


@dataclass(frozen=True)
class StepTimings:
    """Seconds spent in one step: ``policy`` (wall time of the generate call this step was part of, given by the
    driver), ``prefill`` / ``decode`` (as the policy reported them), ``tool`` and ``render`` (measured by the
    environment)."""

    policy: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    tool: float = 0.0
    render: float = 0.0

    @property
    def total(self) -> float:
        return self.policy + self.tool + self.render


@dataclass(frozen=True)
class ClickResult:
    """A click the environment applied.

    Attributes:
        target: the target it was routed to.
        action: the policy's action (relative coordinates in [0, 1], x = horizontal).
        click: the click in image-grid pixels (x = column, y = row), as the tool received it.
        policy_click: the same click in policy-grid pixels (what repeats are compared on).
        in_error_region: with ground truth: ``True`` when a positive click lies in the target's missed part (false
            negatives) or a negative click in its over-included part (false positives) of the mask the click was
            meant to correct (the target's mask before this step, after any ``Undo``/``Reset`` earlier in the same
            step); ``False`` otherwise; ``None`` without ground truth. The click-placement reward reads it.
    """

    target: str
    action: Action
    click: Click
    policy_click: Click
    in_error_region: bool | None = None


@dataclass(frozen=True)
class TargetScore:
    """One target's IoU with the ground truth around one step (needs ground truth).

    Attributes:
        name: the target.
        present: whether the ground truth has any pixel (``False`` = absent target; "not present" is right).
        iou_before: IoU of the mask before the step (:func:`ibisagent.metrics.iou`: two empty masks score 1).
        iou_after: IoU after the step (for ``Terminate``, after the answer emptied the targets it declares absent).
    """

    name: str
    present: bool
    iou_before: float
    iou_after: float

    @property
    def improved(self) -> bool:
        """Whether the step raised the IoU (the progressive-improvement reward)."""
        return self.iou_after > self.iou_before


@dataclass(frozen=True)
class EnvObservation:
    """Exactly what the policy is given at a step.

    Attributes:
        messages: the conversation in the Hugging Face / OpenAI shape (:mod:`ibisagent.policies.base`), images as
            (h, w, 3) uint8 arrays in the policy grid; history mode applied, a pending repair turn included. The
            message dicts are shared with later observations: copy before mutating (trl's collators mutate).
        images: the images of ``messages`` in placeholder order.
        state: the masks in the policy grid, for policies that act on state (the oracle).
        step: 0-based index of the step this observation asks for.
        attempt: 0 for a first try, 1… while repairing malformed output.
    """

    messages: Conversation
    images: tuple[np.ndarray, ...]
    state: Observation
    step: int
    attempt: int

    @property
    def request(self) -> PolicyRequest:
        """The :class:`PolicyRequest` a driver sends (the same messages and state)."""
        return PolicyRequest(messages=self.messages, observation=self.state)

    @property
    def image(self) -> np.ndarray:
        """The latest image of the conversation (the current overlay, or the plain image at the start)."""
        return self.images[-1]

    @property
    def turn(self) -> Message:
        """The newest user turn (the overlay + refinement prompt, the first turn, or a repair turn): what a
        framework that keeps its own history (trl's ``environment_factory``) appends after the model's turn."""
        return self.messages[-1]


@dataclass(frozen=True)
class StepResult:
    """One policy turn and what it did.

    Attributes:
        index: 0-based step number (repair attempts of a step share it); ``index + 1`` steps have been taken.
        attempt: 0 for the first try, 1… for repair retries.
        raw: the model's text as given (the format reward reads it with :func:`protocol.is_strict_format`).
        response: the parsed turn, or ``None`` when it was malformed.
        error: what was wrong (malformed output, the repeated click, the tool's exception), ``None`` when fine.
        actions: the actions applied (empty for malformed output and for a step refused as a repeat).
        clicks: the clicks added by this step, in order.
        masks: target name → (H, W) bool mask after the step, image grid (read-only arrays).
        scores: per target in order, IoU before and after (``None`` without ground truth).
        answer: the ``<answer>`` text when the step terminated with one.
        absent: targets the answer declares absent (their masks were emptied).
        stop_reason: why the episode stopped at this step, ``None`` while it goes on.
        observation: the next observation, ``None`` once the episode is done.
        total_clicks: clicks applied in the episode up to and including this step (NoC counts clicks, not turns).
        timings: where the step's time went.
    """

    index: int
    attempt: int
    raw: str
    response: Response | None
    error: str | None
    actions: tuple[Action, ...]
    clicks: tuple[ClickResult, ...]
    masks: Mapping[str, np.ndarray]
    scores: tuple[TargetScore, ...] | None
    answer: str | None
    absent: frozenset[str]
    stop_reason: StopReason | None
    observation: EnvObservation | None
    total_clicks: int
    timings: StepTimings

    @property
    def done(self) -> bool:
        """Whether the episode ended with this step."""
        return self.stop_reason is not None

    @property
    def strict_format(self) -> bool:
        """Whether :attr:`raw` follows the strict layout (the format reward)."""
        return is_strict_format(self.raw)


@dataclass(frozen=True)
class AgentTrajectory:
    """The outcome of one episode.

    Attributes:
        instruction: the request.
        targets: target names in order.
        steps: every policy turn, including malformed ones.
        masks: target name → final (H, W) bool mask in the image grid (the last valid state).
        answer: the final ``<answer>`` text (``None`` unless the policy terminated with one).
        stop_reason: why the episode stopped (:data:`StopReason`).
        seconds: totals by category: ``policy``, ``prefill``, ``decode``, ``tool``, ``render``, ``total`` (wall).
        error: the last malformed-output, tool or policy error message, if any.
    """

    instruction: str
    targets: tuple[str, ...]
    steps: tuple[StepResult, ...]
    masks: Mapping[str, np.ndarray]
    answer: str | None
    stop_reason: StopReason
    seconds: Mapping[str, float]
    error: str | None = None

    @property
    def clicks(self) -> int:
        """Clicks applied in the episode (NoC), all targets, undone ones included."""
        return sum(len(step.clicks) for step in self.steps)

    def to_records(
        self,
        case_id: str,
        image_ref: str,
        tool_name: str,
        modality: str = "",
        slice: int | None = None,  # noqa: A002 - the manifest's field name
        ground_truth: Mapping[str, np.ndarray | None] | None = None,
        source: str = "policy",
        window: Mapping[str, Any] | None = None,
    ) -> list[TrajectoryRecord]:
        """One :class:`TrajectoryRecord` per target: per step the target's clicks, its mask (RLE), IoU when
        ``ground_truth`` (name → (H, W) bool, ``None`` = absent) is given, think and raw text.

        ``source`` is ``"policy"``, ``"simulated"`` (the oracle policy) or ``"correction"``; ``window`` is the display
        rule of the picture (:meth:`ibisagent.imaging.DisplayWindow.to_dict`)."""
        records = []
        share = self.seconds.get("total", 0.0) / max(len(self.targets), 1)
        for name in self.targets:
            truth = _truth_for(ground_truth, name, self.masks[name].shape)
            steps = [_step_record(step, name, truth, len(self.targets) > 1) for step in self.steps]
            final = self.masks[name]
            records.append(TrajectoryRecord(
                id=case_id, instruction=self.instruction, image=image_ref, target=name, tool=tool_name,
                source=source, modality=modality, slice=slice, steps=steps,  # type: ignore[arg-type]
                window=dict(window) if window is not None else None,
                final_iou=None if truth is None else round(iou(final, truth), 6),
                final_dice=None if truth is None else round(dice(final, truth), 6),
                stop_reason=self.stop_reason, answer=self.answer, seconds=round(share, 6),
            ))
        return records


# --------------------------------------------------------------------------------------------------------------
# the environment


@dataclass(frozen=True)
class _Routed:
    """An action with its target index (clicks only) and its pixel click in the policy grid."""

    action: Action
    target: int | None = None
    policy_click: Click | None = None


class SegmentationEnv:
    """The segmentation MDP for one image and one request (see the module docstring).

    Args:
        image: (H, W, 3) uint8 RGB in the display grid (the grid of ``session``, the masks and the ground truth).
        instruction: the user's request, e.g. "Segment the left kidney."
        targets: target name(s) in request order (one overlay colour each); distinct case-insensitively, one line,
            no square brackets.
        session: the tool's encoding of ``image`` (:meth:`SegmentationTool.encode`); may be shared.
        policy_grid: (h, w) the policy sees the image at (:meth:`Policy.image_size`); default: the image grid.
        initial_masks: target name → (H, W) bool mask to refine (refinement mode); targets left out start empty.
        ground_truth: target name → (H, W) bool mask, ``None`` (or empty) = target absent; every target must be
            given. Enables :attr:`StepResult.scores` and :attr:`ClickResult.in_error_region`.
        config: episode settings (default :class:`EnvConfig`).
        prompts: wording of the turns (default :func:`ibisagent.prompts.load_prompts`).

    Raises:
        ValueError: a bad image, target list, mask shape, grid or ground truth (the message names it). Model
            output never raises; tool exceptions end the episode with ``tool_error``.

    Attributes (read them, do not assign):
        grid: (H, W) of the image; policy_grid: (h, w) the policy sees; targets: the names as a tuple.
        state: the current :class:`EnvState`; step_index: index of the next step; attempt: repair attempt of it.
        stop_reason: ``None`` while running; answer: the final ``<answer>`` text; error: the message that ended the
            episode (malformed output, repeated click, tool or policy error).
    """

    def __init__(
        self,
        image: np.ndarray,
        instruction: str,
        targets: Sequence[str] | str,
        session: ImageSession,
        *,
        policy_grid: tuple[int, int] | None = None,
        initial_masks: Mapping[str, np.ndarray | None] | None = None,
        ground_truth: Mapping[str, np.ndarray | None] | None = None,
        config: EnvConfig | None = None,
        prompts: Prompts | None = None,
    ) -> None:
        self.image = check_image(image)
        self.instruction = instruction
        self.targets = _checked_targets(targets)
        self.session = session
        self.grid: tuple[int, int] = (int(self.image.shape[0]), int(self.image.shape[1]))
        if tuple(session.shape) != self.grid:
            raise ValueError(f"tool session shape {tuple(session.shape)} != image shape {self.grid}")
        grid = self.grid if policy_grid is None else (int(policy_grid[0]), int(policy_grid[1]))
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(f"policy grid must be at least 1x1, got {grid[0]}x{grid[1]} for a "
                             f"{self.grid[0]}x{self.grid[1]} image")
        self.policy_grid: tuple[int, int] = grid
        self.initial_masks = _checked_masks(initial_masks, self.targets, self.grid, "initial mask", partial=True)
        self.ground_truth = (None if ground_truth is None
                             else _checked_masks(ground_truth, self.targets, self.grid, "ground truth", partial=False))
        self.config = config or EnvConfig()
        self.prompts = prompts or load_prompts()
        self._started = False
        self._reset_state()

    # -- public interface ---------------------------------------------------------------------------------------

    def reset(self) -> EnvObservation:
        """Start (or restart) the episode: initial masks (and their tool logits), the first observation.

        Returns:
            The first observation: system prompt + the image with the first-turn prompt, or — when an initial mask
            is given — the overlay of the initial masks with the refinement prompt. When the tool fails on an initial
            mask the episode is already done (``tool_error``) and the observation shows the masks without logits.
        """
        self._reset_state()
        self._started = True
        t0 = time.perf_counter()
        self.policy_image = resize_image(self.image, self.policy_grid)
        self._seconds["render"] += time.perf_counter() - t0
        self.state = self._initial_state()
        self.system: Message = _text_message("system", self.prompts.system)
        if any(t.mask.any() for t in self.state.targets):
            first = self._observation_message()
        else:
            first = _image_message(self.policy_image, self.prompts.first_turn(self.instruction, self.targets))
        self._history = [self.system, first]
        self._current = first
        self._repair_tail = []
        self._observation = None
        return self.observation

    def step(self, text: str, *, timings: StepTimings | None = None) -> StepResult:
        """Apply one model turn: parse it leniently (:func:`protocol.parse_response`), route its clicks, run the
        tool, render the next observation and decide whether the episode stops.

        Args:
            text: the model's turn as generated (non-strings count as malformed output).
            timings: the policy's share of the step's time (``policy``, ``prefill``, ``decode``), from the driver.

        Returns:
            The :class:`StepResult`; malformed output gives a result with ``error`` set and, while repair retries
            remain, an observation with the repair turn (the same ``index``, ``attempt + 1``).

        Raises:
            RuntimeError: the episode was not reset or is already done.
        """
        self._check_running()
        raw = text if isinstance(text, str) else ""
        timings = timings or StepTimings()
        try:
            response = parse_response(text)
            routed = self._route(response)
        except ProtocolError as exc:
            return self._malformed(raw, exc, timings)
        return self._act(raw, response, routed, timings)

    def apply(self, actions: Sequence[Action], *, raw: str | None = None,
              timings: StepTimings | None = None) -> StepResult:
        """Apply already parsed actions as one step (for adapters whose framework parses tool calls, e.g. trl's
        ``environment_factory``: one method per action calls this with one action).

        Args:
            actions: the step's actions in order (a ``Terminate`` ends the episode; its answer is ``None``).
            raw: the text to record as the model's turn; default :func:`protocol.format_response` of the actions.
            timings: as for :meth:`step`.

        Returns:
            The :class:`StepResult`; an unknown `` [target]`` gives a malformed-output result as in :meth:`step`.
        """
        self._check_running()
        response = Response(think="", actions=tuple(actions))
        text = raw if raw is not None else format_response(response)
        timings = timings or StepTimings()
        try:
            routed = self._route(response)
        except ProtocolError as exc:
            return self._malformed(text, exc, timings)
        return self._act(text, response, routed, timings)

    def stop(self, reason: StopReason, error: str | None = None) -> None:
        """End the episode from outside (a driver's ``time_limit`` or ``policy_error``), keeping the masks."""
        self.stop_reason = reason
        if error is not None:
            self.error = error

    @property
    def done(self) -> bool:
        """Whether the episode has stopped."""
        return self.stop_reason is not None

    @property
    def observation(self) -> EnvObservation:
        """What the policy is given for the next step (after the end: the state the episode ended in)."""
        if self._observation is None:
            self._observation = self._build_observation()
        return self._observation

    def _build_observation(self) -> EnvObservation:
        base = self._history if self.config.history == "full" else [self.system, self._current]
        messages = [*base, *self._repair_tail]
        ph, pw = self.policy_grid
        h, w = self.grid
        state = Observation(
            image=self.policy_image,
            masks={name: resize_mask(mask, self.policy_grid) for name, mask in self.masks.items()},
            targets=self.targets,
            step=self.step_index,
            clicks={name: tuple(Click(*to_pixel(*to_relative(c.x, c.y, w, h), pw, ph), c.positive) for c in t.clicks)
                    for name, t in zip(self.targets, self.state.targets)},
        )
        return EnvObservation(messages=messages, images=_images_of(messages), state=state, step=self.step_index,
                              attempt=self.attempt)

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Target name → current (H, W) bool mask in the image grid (read-only arrays)."""
        return {name: t.mask for name, t in zip(self.targets, self.state.targets)}

    @property
    def steps(self) -> tuple[StepResult, ...]:
        """Every step result so far, in order (malformed attempts included)."""
        return tuple(self._steps)

    @property
    def total_clicks(self) -> int:
        """Clicks applied so far (all targets, undone ones included): the number of clicks (NoC)."""
        return self._total_clicks

    def overlay_image(self) -> PILImage.Image:
        """The current masks over the image in the policy grid, as a PIL image (trl's image content block)."""
        return to_pil(observation_image(self.policy_image, [t.mask for t in self.state.targets]))

    def trajectory(self) -> AgentTrajectory:
        """The episode so far as an :class:`AgentTrajectory` (``stop_reason`` ``max_steps`` if it has not stopped:
        call it once :attr:`done`)."""
        seconds = dict(self._seconds)
        seconds["total"] = time.perf_counter() - self._start_time
        return AgentTrajectory(
            instruction=self.instruction, targets=self.targets, steps=tuple(self._steps),
            masks={name: mask.copy() for name, mask in self.masks.items()}, answer=self.answer,
            stop_reason=self.stop_reason or "max_steps",
            seconds={k: seconds.get(k, 0.0) for k in ("policy", "prefill", "decode", "tool", "render", "total")},
            error=self.error,
        )

    def add_policy_seconds(self, policy: float = 0.0, prefill: float = 0.0, decode: float = 0.0) -> None:
        """Count policy time that produced no step (a failed generate call) in :meth:`trajectory`'s totals."""
        self._seconds["policy"] += policy
        self._seconds["prefill"] += prefill
        self._seconds["decode"] += decode

    # -- internals ------------------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        """Clear the episode's bookkeeping (called by :meth:`reset`; the episode is not started until then)."""
        self._start_time = time.perf_counter()
        self._seconds: Counter[str] = Counter()
        self.policy_image = self.image
        self.state = EnvState(tuple(_empty_target(self.grid) for _ in self.targets))
        self._steps: list[StepResult] = []
        self.step_index = 0
        self.attempt = 0
        self._run: tuple[tuple[int, int, int, bool] | None, int] = (None, 0)
        self._total_clicks = 0
        self.stop_reason: StopReason | None = None
        self.answer: str | None = None
        self.error: str | None = None
        self.system = _text_message("system", "")
        self._history: list[Message] = []
        self._current: Message = self.system
        self._repair_tail: list[Message] = []
        self._observation: EnvObservation | None = None

    def _check_running(self) -> None:
        if not self._started:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError(f"the episode is over (stop reason {self.stop_reason!r}); call reset() to restart")

    def _act(self, raw: str, response: Response, routed: tuple[_Routed, ...], timings: StepTimings) -> StepResult:
        self._seconds["policy"] += timings.policy
        self._seconds["prefill"] += timings.prefill
        self._seconds["decode"] += timings.decode
        before = self.state
        actions = tuple(r.action for r in routed)
        if response.terminates:
            return self._terminate(raw, response, actions, timings)
        repeated, run = self._repeated(routed)
        if repeated is not None:
            self.stop("repeated_click", repeated)
            return self._record(raw, response, repeated, (), (), before, timings)
        t0 = time.perf_counter()
        try:
            self.state, clicks = self._apply(routed)
        except Exception as exc:  # noqa: BLE001 - any tool failure ends only this episode, with its message
            timings = replace(timings, tool=time.perf_counter() - t0)
            self._seconds["tool"] += timings.tool
            message = f"tool {type(self.session).__name__} failed: {type(exc).__name__}: {exc}"
            self.stop("tool_error", message)
            return self._record(raw, response, message, (), (), before, timings)
        self._run = run
        self._total_clicks += len(clicks)
        timings = replace(timings, tool=time.perf_counter() - t0)
        self._seconds["tool"] += timings.tool
        if self.step_index + 1 >= self.config.max_steps:
            self.stop("max_steps", None)
            return self._record(raw, response, None, actions, clicks, before, timings)
        t0 = time.perf_counter()
        observation = self._observation_message()
        timings = replace(timings, render=time.perf_counter() - t0)
        if self.config.history == "full":
            self._history += [_text_message("assistant", raw), observation]
        self._current = observation
        self._repair_tail = []
        result = self._record(raw, response, None, actions, clicks, before, timings, advance=True)
        return result

    def _malformed(self, raw: str, exc: ProtocolError, timings: StepTimings) -> StepResult:
        self._seconds["policy"] += timings.policy
        self._seconds["prefill"] += timings.prefill
        self._seconds["decode"] += timings.decode
        if self.attempt >= self.config.repair_retries:
            self.stop("unparseable", str(exc))
            return self._record(raw, None, str(exc), (), (), self.state, timings)
        result_attempt = self.attempt
        self.attempt += 1
        self._repair_tail += [
            _text_message("assistant", raw),
            _text_message("user", self.prompts.repair_turn(repair_message(exc))),
        ]
        return self._record(raw, None, str(exc), (), (), self.state, timings, attempt=result_attempt)

    def _terminate(self, raw: str, response: Response, actions: tuple[Action, ...],
                   timings: StepTimings) -> StepResult:
        before = self.state
        self.answer = response.answer
        absent = absent_targets(response.answer, self.targets)
        if absent:
            self.state = self.state.push(tuple(
                _empty_target(self.grid) if name in absent else target
                for name, target in zip(self.targets, self.state.targets)
            ))
        self.stop("terminate", None)
        return self._record(raw, response, None, actions, (), before, timings, answer=response.answer,
                            absent=absent)

    def _route(self, response: Response) -> tuple[_Routed, ...]:
        """Resolve click targets and policy-grid pixels; an unknown target name raises :class:`ProtocolError`."""
        lookup = {name.strip().casefold(): i for i, name in enumerate(self.targets)}
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
                                        + ", ".join(f"[{t}]" for t in self.targets))
                index = found
            routed.append(_Routed(action, index, action.to_click(pw, ph)))
        return tuple(routed)

    def _repeated(self, routed: Sequence[_Routed]) -> tuple[str | None, tuple[tuple[int, int, int, bool] | None, int]]:
        """Follow the run of identical consecutive clicks through this step's actions (``Undo``/``Reset`` end a
        run). Returns a message when a run reaches the repeat limit, and the run state to keep otherwise."""
        last, length = self._run
        for r in routed:
            if r.action.kind in ("undo", "reset"):
                last, length = None, 0
                continue
            if r.policy_click is None or r.target is None:
                continue
            key = (r.target, r.policy_click.x, r.policy_click.y, r.policy_click.positive)
            length = length + 1 if key == last else 1
            last = key
            if length >= self.config.repeat_limit:
                return (f"click {format_action(r.action)} on {self.targets[r.target]} requested {length} times in "
                        "a row"), (last, length)
        return None, (last, length)

    def _apply(self, routed: Sequence[_Routed]) -> tuple[EnvState, tuple[ClickResult, ...]]:
        """Apply actions in order: runs of clicks become one tool call per touched target and one undoable change;
        ``Undo`` and ``Reset`` act between runs."""
        state = self.state
        added: list[ClickResult] = []
        pending: dict[int, list[Click]] = {}
        for r in routed:
            if r.policy_click is not None and r.target is not None:
                click = r.action.to_click(self.grid[1], self.grid[0])  # relative → image grid, no detour
                pending.setdefault(r.target, []).append(click)
                added.append(ClickResult(self.targets[r.target], r.action, click, r.policy_click,
                                         self._in_error_region(r.target, state.targets[r.target].mask, click)))
                continue
            state = self._flush(state, pending)
            pending = {}
            if r.action.kind == "undo":
                state = state.undo()
            elif r.action.kind == "reset":
                state = state.push(tuple(_empty_target(self.grid) for _ in self.targets))
        return self._flush(state, pending), tuple(added)

    def _flush(self, state: EnvState, pending: Mapping[int, list[Click]]) -> EnvState:
        if not pending:
            return state
        targets = list(state.targets)
        for index, new in sorted(pending.items()):  # one tool call per clicked target, in target order
            current = targets[index]
            clicks = (*current.clicks, *new)
            prediction = self.session.predict(clicks, current.logits)
            targets[index] = TargetState(_frozen(prediction.mask), prediction.logits, clicks)
        return state.push(tuple(targets))

    def _in_error_region(self, target: int, mask: np.ndarray, click: Click) -> bool | None:
        if self.ground_truth is None:
            return None
        truth = self.ground_truth[self.targets[target]]
        inside_truth = bool(truth is not None and truth[click.y, click.x])
        inside_mask = bool(mask[click.y, click.x])
        if click.positive:
            return inside_truth and not inside_mask
        return inside_mask and not inside_truth

    def _scores(self, before: EnvState) -> tuple[TargetScore, ...] | None:
        if self.ground_truth is None:
            return None
        scores = []
        for name, old, new in zip(self.targets, before.targets, self.state.targets):
            truth = self.ground_truth[name]
            gt = np.zeros(self.grid, dtype=bool) if truth is None else truth
            scores.append(TargetScore(name=name, present=bool(gt.any()), iou_before=iou(old.mask, gt),
                                      iou_after=iou(new.mask, gt)))
        return tuple(scores)

    def _observation_message(self) -> Message:
        t0 = time.perf_counter()
        picture = observation_image(self.policy_image, [t.mask for t in self.state.targets])
        self._seconds["render"] += time.perf_counter() - t0
        text = self.prompts.refine_turn(self.instruction, self.targets)
        if self.config.show_points:
            text += "\n" + self.prompts.points_line(self._point_lines())
        return _image_message(picture, text)

    def _point_lines(self) -> list[str]:
        """The current state's clicks as action lines, per target in click order (suffixed when several targets)."""
        height, width = self.grid
        several = len(self.targets) > 1
        return [format_action(Action.from_click(click, width, height, name if several else None))
                for name, target in zip(self.targets, self.state.targets) for click in target.clicks]

    def _record(self, raw: str, response: Response | None, error: str | None, actions: tuple[Action, ...],
                clicks: tuple[ClickResult, ...], before: EnvState, timings: StepTimings, *, advance: bool = False,
                attempt: int | None = None, answer: str | None = None,
                absent: frozenset[str] = frozenset()) -> StepResult:
        index = self.step_index
        result_attempt = self.attempt if attempt is None else attempt
        if advance:
            self.attempt = 0
            self.step_index += 1
        self._observation = None  # the state or the conversation changed
        result = StepResult(
            index=index, attempt=result_attempt, raw=raw, response=response, error=error, actions=actions,
            clicks=clicks, masks=self.masks, scores=self._scores(before), answer=answer, absent=absent,
            stop_reason=self.stop_reason, observation=None if self.done else self.observation,
            total_clicks=self._total_clicks, timings=timings,
        )
        self._steps.append(result)
        return result

    def _initial_state(self) -> EnvState:
        targets = []
        for name in self.targets:
            mask = self.initial_masks.get(name)
            if mask is None or not mask.any():
                targets.append(_empty_target(self.grid))
                continue
            t0 = time.perf_counter()
            logits: np.ndarray | None = None
            if not self.done:
                try:
                    logits = self.session.logits_from_mask(mask)
                except NotImplementedError:
                    logits = None
                except Exception as exc:  # noqa: BLE001 - a tool failure ends only this episode
                    self.stop("tool_error", f"tool {type(self.session).__name__} failed on the initial mask of "
                                            f"{name!r}: {type(exc).__name__}: {exc}")
            self._seconds["tool"] += time.perf_counter() - t0
            targets.append(TargetState(mask, logits, ()))
        return EnvState(tuple(targets))


# --------------------------------------------------------------------------------------------------------------
# replaying recorded episodes (SFT building without the tool)


class RecordedSession(ImageSession):
    """A tool session that answers with recorded masks, in call order: with it, a recorded episode replays through
    the environment — the same observations, byte for byte — without running the tool again.

    The environment calls the tool once per step per clicked target, in target order (:meth:`SegmentationEnv.step`);
    ``masks`` are the tool's answers in that order. Logits are the mask as float32 (±1), which is also what
    :meth:`logits_from_mask` gives.

    Args:
        shape: (H, W) of the image.
        masks: (H, W) bool masks, one per tool call.
    """

    def __init__(self, shape: tuple[int, int], masks: Sequence[np.ndarray]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self._masks = [np.asarray(m, dtype=bool) for m in masks]
        for i, mask in enumerate(self._masks):
            if mask.shape != self.shape:
                raise ValueError(f"recorded mask {i} has shape {mask.shape}, the image is {self.shape}")
        self._next = 0

    def predict(self, clicks: Sequence[Click], prior_logits: np.ndarray | None = None) -> Prediction:
        if self._next >= len(self._masks):
            raise ValueError(f"the recording holds {len(self._masks)} tool results; the replay asked for more")
        mask = self._masks[self._next]
        self._next += 1
        return Prediction(mask=mask.copy(), logits=np.where(mask, 1.0, -1.0).astype(np.float32))

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        return np.where(np.asarray(mask, dtype=bool), 1.0, -1.0).astype(np.float32)


def replay_records(
    records: Sequence[TrajectoryRecord],
    image: np.ndarray,
    *,
    policy_grid: tuple[int, int] | None = None,
    history: HistoryMode = "off",
    prompts: Prompts | None = None,
    initial_masks: Mapping[str, np.ndarray | None] | None = None,
    ground_truth: Mapping[str, np.ndarray | None] | None = None,
) -> tuple[SegmentationEnv, list[EnvObservation]]:
    """Replay a recorded episode through a fresh environment: its turns (``raw``) stepped in order, the recorded
    masks standing in for the tool (:class:`RecordedSession`).

    Args:
        records: the records of one episode, one per target in target order, as :meth:`AgentTrajectory.to_records`
            wrote them (same instruction, same steps). A leading step with an empty ``raw`` (the starting state of a
            correction record) is not a turn: its mask becomes that target's initial mask.
        image: (H, W, 3) uint8, the image of the episode in the display grid.
        policy_grid: (h, w) the policy sees; default the image grid.
        history: ``"off"`` or ``"full"`` (a recording replays in either mode).
        prompts: the wording (default :func:`ibisagent.prompts.load_prompts`).
        initial_masks: target name → (H, W) bool mask the episode started from (refinement mode).
        ground_truth: as for :class:`SegmentationEnv` (the results then carry scores).

    Returns:
        ``(env, observations)``: the finished environment (its :attr:`~SegmentationEnv.steps`) and the observation
        before each step, in step order (``observations[i]`` is what the policy was given for ``env.steps[i]``).

    Raises:
        ValueError: records that disagree with each other, or a replay whose masks differ from the recorded ones.
    """
    if not records:
        raise ValueError("replay needs at least one record")
    targets = tuple(r.target for r in records)
    steps = [list(r.steps) for r in records]
    if len({len(s) for s in steps}) != 1 or len({r.instruction for r in records}) != 1:
        raise ValueError(f"records of case {records[0].id!r} disagree on their steps or instruction")
    initial = dict(initial_masks or {})
    if steps[0] and not steps[0][0].raw:
        for name, own in zip(targets, steps):
            initial.setdefault(name, rle_decode(own[0].mask))
        steps = [own[1:] for own in steps]
    texts = [s.raw for s in steps[0]]
    if any([s.raw for s in own] != texts for own in steps):
        raise ValueError(f"records of case {records[0].id!r} hold different model turns")
    calls = [rle_decode(own[i].mask) for i in range(len(texts)) for own in steps if own[i].clicks]
    grid = (int(image.shape[0]), int(image.shape[1]))
    config = EnvConfig(max_steps=max(1, sum(1 for s in steps[0] if s.attempt == 0)), history=history,
                       repair_retries=max([s.attempt for s in steps[0]], default=0))
    env = SegmentationEnv(image, records[0].instruction, targets, RecordedSession(grid, calls),
                          policy_grid=policy_grid, initial_masks=initial or None, ground_truth=ground_truth,
                          config=config, prompts=prompts)
    observations = [env.reset()]
    for i, text in enumerate(texts):
        if env.done:
            raise ValueError(f"case {records[0].id!r}: the replay stopped ({env.stop_reason}) before step {i}")
        result = env.step(text)
        for name, own in zip(targets, steps):
            if rle_encode(result.masks[name]) != own[i].mask:
                raise ValueError(f"case {records[0].id!r}: step {i} of {name!r} does not replay to its recorded mask")
        if result.observation is not None:
            observations.append(result.observation)
    return env, observations[: len(texts)]


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
# helpers


def _checked_targets(targets: Sequence[str] | str) -> tuple[str, ...]:
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    if not names:
        raise ValueError("an episode needs at least one target")
    for name in names:
        if not isinstance(name, str) or not name.strip() or any(ch in name for ch in "[]\n"):
            raise ValueError(f"target name {name!r} must be non-empty, one line, without square brackets")
    folded = [t.strip().casefold() for t in names]
    if len(set(folded)) != len(folded):
        raise ValueError(f"target names must be distinct (case-insensitive): {names}")
    return names


def _checked_masks(masks: Mapping[str, np.ndarray | None] | None, targets: tuple[str, ...], grid: tuple[int, int],
                   what: str, *, partial: bool) -> dict[str, np.ndarray | None]:
    given = dict(masks or {})
    unknown = sorted(set(given) - set(targets))
    if unknown:
        raise ValueError(f"{what} for unknown target(s) {unknown}; targets are {list(targets)}")
    missing = [t for t in targets if t not in given]
    if missing and not partial:
        raise ValueError(f"{what} missing for target(s) {missing} (give None for an absent target)")
    out: dict[str, np.ndarray | None] = {}
    for name, mask in given.items():
        if mask is None:
            out[name] = None
            continue
        if np.shape(mask) != grid:
            raise ValueError(f"{what} of {name!r} has shape {np.shape(mask)}, image is {grid}")
        out[name] = _frozen(mask)
    return out


def _empty_target(grid: tuple[int, ...]) -> TargetState:
    return TargetState(_frozen(np.zeros(grid, dtype=bool)), None, ())


def _frozen(mask: np.ndarray) -> np.ndarray:
    """A read-only bool copy of ``mask``: states are shared by steps, observations and the undo stack."""
    out = np.array(mask, dtype=bool)
    out.flags.writeable = False
    return out


def _text_message(role: str, text: str) -> Message:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _image_message(image: np.ndarray, text: str) -> Message:
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


def _images_of(messages: Sequence[Message]) -> tuple[np.ndarray, ...]:
    return tuple(part["image"] for message in messages for part in message.get("content", ())
                 if isinstance(part, dict) and part.get("type") == "image")


def _truth_for(ground_truth: Mapping[str, np.ndarray | None] | None, name: str,
               shape: tuple[int, ...]) -> np.ndarray | None:
    if ground_truth is None or name not in ground_truth:
        return None
    mask = ground_truth[name]
    return np.zeros(shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)


def _step_record(step: StepResult, name: str, truth: np.ndarray | None, multi: bool) -> StepRecord:
    mask = step.masks[name]
    clicks = [
        ClickRecord(x=float(c.action.x), y=float(c.action.y), px=c.click.x, py=c.click.y,  # type: ignore[arg-type]
                    positive=c.click.positive, target=c.target if multi else None, in_error_region=c.in_error_region)
        for c in step.clicks if c.target == name
    ]
    score = next((s for s in step.scores or () if s.name == name), None)
    after = score.iou_after if score is not None else None if truth is None else iou(mask, truth)
    return StepRecord(
        clicks=clicks, mask=rle_encode(mask), iou=None if after is None else round(after, 6),
        action="\n".join(format_action(a) for a in step.actions),
        think=step.response.think if step.response is not None else "", raw=step.raw,
        seconds=round(step.timings.total, 6),
        iou_before=None if score is None else round(score.iou_before, 6), attempt=step.attempt, error=step.error,
    )


__all__ = [
    "AgentTrajectory", "ClickResult", "EnvConfig", "EnvObservation", "EnvState", "HistoryMode", "RecordedSession",
    "SegmentationEnv", "StepResult", "StepTimings", "StopReason", "TargetScore", "TargetState", "absent_targets",
    "replay_records",
]
