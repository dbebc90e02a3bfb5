"""The cold-start SFT corpus (IBISAgent paper §3.3): expert trajectories played through the environment as
conversations, saved with ``datasets.save_to_disk``.

Every conversation is produced by stepping :class:`ibisagent.env.SegmentationEnv` — the object the agent runs at
inference — with the expert's actions, so the user turns (system prompt, first turn, overlays, refinement prompts)
and the image resizing are byte for byte what a model sees in use. Only the assistant text is written here:

* the expert's actions from the trajectory records (``ibisagent simulate``; one record per target, grouped by case:
  step *i* of every target's record makes turn *i*), then a final ``Terminate`` with an answer in one of the five
  answer styles of :mod:`ibisagent.data.templates` ("not present" answers for absent targets);
* a ``<think>`` from the offline writer (:func:`ibisagent.data.reasoning.write_think`) or, with a teacher, from a
  teacher model (falling back to the offline text when every teacher reply is rejected; counted);
* optionally a templated instruction (:func:`templates.initialization`) and refinement prompt instead of the
  recorded ones (``instruction_ratio``, ``refinement_ratio``);
* reflective episodes (:mod:`ibisagent.data.reflect`): a wrong click marked ``train: false`` then ``Undo``; a mask of
  another structure then ``Reset``.

The replayed masks are checked against the recorded ones: a trajectory recorded with another tool (or a refinement
case given without its manifest) is skipped with the reason, never silently changed. With ``tool="recorded"`` (the
default for trajectories of any tool but ``embedded``) the recorded masks stand in for the tool
(:class:`ibisagent.env.RecordedSession`), so trajectories made with a GPU checkpoint build on a laptop; only the
self-correction samples need a real tool (the answer to a new, wrong click).

**Dataset** (``OUT``, ``datasets.load_from_disk(OUT)``): columns ``messages`` — a list of ``{"role", "content":
[{"type": "text", "text": str} | {"type": "image", "text": None}], "train": bool}`` (``train`` is ``True`` on trained
assistant turns only) — and ``images`` — the images (PNG, the policy grid) in placeholder order. History ``off``:
one row per trained assistant turn (system + current observation + the turn), as the released checkpoint was run;
``full``: one row per episode (the whole interleaved history). Beside it: ``rows.jsonl`` (per row: case id, episode
kind, modality, step), ``stats.json`` and ``stats.md`` (a table per modality like the paper's Tab. 6),
``report.jsonl`` (every skipped or filtered case with its reason) and ``.work/`` (finished cases, for resuming).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import random
import shutil
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image as PILImage

from ibisagent.data import reasoning, reflect, templates
from ibisagent.data.manifest import Case, CaseError, load_case, read_manifest
from ibisagent.data.reflect import ReflectiveRatios, Turn
from ibisagent.data.runner import Engine, prepare_work_dir, run_tasks
from ibisagent.data.trajectory import TrajectoryRecord, read_trajectories, rle_decode
from ibisagent.env import (
    EnvConfig,
    EnvObservation,
    RecordedSession,
    SegmentationEnv,
    absent_targets,
    write_observation,
)
from ibisagent.fileio import atomic_write_text
from ibisagent.imaging import ImageError, load_image, slice_of, to_display_rgb
from ibisagent.metrics import iou
from ibisagent.observation import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, qwen_grid, resize_mask
from ibisagent.prompts import Prompts, load_prompts
from ibisagent.protocol import Action, ProtocolError, Response, format_action, format_response, parse_action_line

log = logging.getLogger(__name__)

HistoryMode = Literal["off", "full"]

#: zlib level of the PNG images in the datasets: fast to write; the pixels are exact at any level.
PNG_LEVEL = 1


def dataset_features():  # noqa: ANN201 - datasets.Features, imported lazily
    """The ``datasets.Features`` of the SFT dataset (``messages``, ``images``)."""
    import datasets

    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    message = {"role": datasets.Value("string"), "content": [part], "train": datasets.Value("bool")}
    return datasets.Features({"messages": [message], "images": datasets.Sequence(datasets.Image())})


@dataclass(frozen=True)
class TeacherSpec:
    """Where the teacher is: an OpenAI-compatible ``url`` and ``model``, the reply ``cache_dir``, the rate limit
    (``per_second``, over all workers together) and the leak-filter ``retries``."""

    url: str
    model: str
    cache_dir: str
    per_second: float | None = 2.0
    retries: int = 2
    timeout: float = 120.0
    max_new_tokens: int = 160
    temperature: float = 0.7


@dataclass(frozen=True)
class SftOptions:
    """Settings of :func:`build_sft` (every field goes into the work folder's ``config.json``)."""

    history: HistoryMode = "off"
    tool: str = ""
    device: str = "cpu"
    max_steps: int | None = None
    min_dice: float | None = None
    seed: int = 0
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    instruction_ratio: float = 0.5
    refinement_ratio: float = 0.3
    self_correction: float = 0.0
    inconsistency: float = 0.0
    prompts: str | None = None
    teacher: TeacherSpec | None = None
    manifest: str | None = None
    repeat_limit: int = 3
    show_points: bool = False

    def __post_init__(self) -> None:
        if self.history not in ("off", "full"):
            raise ValueError(f"history must be 'off' or 'full', got {self.history!r}")
        for name in ("instruction_ratio", "refinement_ratio", "self_correction", "inconsistency"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")


# ------------------------------------------------------------------------------------------- plans and episodes


@dataclass
class _Episode:
    """One episode to play: what the environment is created with, the planned turns and the expected masks."""

    kind: str
    instruction: str
    targets: tuple[str, ...]
    turns: list[Turn]
    initial: dict[str, np.ndarray] = field(default_factory=dict)
    prompts: Prompts | None = None
    expected: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


def expert_plan(records: Sequence[TrajectoryRecord]) -> tuple[list[Turn], dict[int, dict[str, np.ndarray]]]:
    """The expert's turns for one case (its per-target records) and the masks each turn must produce.

    Turn *i* holds step *i*'s actions of every record (deduplicated, in record order); a recorded ``Terminate`` ends
    the plan; a final ``Terminate`` turn is always appended (its answer is written at play time).

    Returns:
        ``(turns, expected)``: ``expected[i][target]`` = (H, W) bool mask the target must have after turn *i*.

    Raises:
        ValueError: a step without a parsable action, or one mixing kinds (clicks with ``Undo``/``Reset``).
    """
    turns: list[Turn] = []
    expected: dict[int, dict[str, np.ndarray]] = {}
    length = max((len(r.steps) for r in records), default=0)
    for i in range(length):
        actions: list[Action] = []
        masks: dict[str, np.ndarray] = {}
        for r in records:
            if i >= len(r.steps):
                continue
            step = r.steps[i]
            lines = [ln for ln in step.action.splitlines() if ln.strip()]
            if not lines:
                raise ValueError(f"step {i} of {r.id}/{r.target} has no action (a malformed turn)")
            try:
                parsed = [parse_action_line(ln) for ln in lines]
            except ProtocolError as exc:
                raise ValueError(f"step {i} of {r.id}/{r.target}: {exc}") from exc
            for action in parsed:
                if action not in actions:
                    actions.append(action)
            masks[r.target] = rle_decode(step.mask)
        kinds = {a.kind for a in actions}
        if "terminate" in kinds:
            break
        if kinds <= {"positive", "negative"}:
            kind = "click"
        elif len(actions) == 1 and kinds <= {"undo", "reset"}:
            kind = actions[0].kind
        else:
            raise ValueError(f"step {i} of {records[0].id} mixes {sorted(kinds)}; not supported in SFT data")
        turns.append(Turn(tuple(actions), kind))  # type: ignore[arg-type]
        expected[i] = masks
    turns.append(Turn((Action("terminate"),), "terminate"))
    return turns, expected


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def dataset_messages(messages: Sequence[Mapping[str, Any]], train: Sequence[bool]) -> list[dict[str, Any]]:
    """Environment messages (numpy images) → dataset messages; ``train`` flags the assistant messages in order."""
    flags = iter(train)
    out = []
    for message in messages:
        content = message.get("content")
        parts = ([{"type": "text", "text": content}] if isinstance(content, str) else
                 [{"type": "image", "text": None} if p.get("type") == "image" else
                  {"type": "text", "text": p.get("text", "")} for p in content])
        role = message["role"]
        out.append({"role": role, "content": parts, "train": bool(next(flags)) if role == "assistant" else False})
    return out


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def rows_of(played: Sequence[tuple[EnvObservation, str, Turn]], history: HistoryMode,
            inserted_only: bool = False) -> list[dict[str, Any]]:
    """Dataset rows of one played episode: ``(observation before the turn, assistant text, turn)`` per turn.

    ``off``: one row per trained turn, system prompt + current observation + the turn; a turn that answers an
    untrained (deliberately wrong) turn also carries that turn and its observation as context (``train: false``); with ``inserted_only``, only the reflective turns (``Undo``, ``Reset``): the expert turns of a
    reflective episode see the same states as the expert episode's rows. ``full``: one row, the last observation's
    whole history plus the last turn.
    """
    rows = []
    if history == "full":
        obs, text, _ = played[-1]
        flags = [turn.train for _, _, turn in played]
        messages = [*obs.messages, _assistant(text)]
        rows.append({"messages": dataset_messages(messages, flags), "images": [png_bytes(i) for i in obs.images],
                     "step": -1})
        return rows
    for index, (obs, text, turn) in enumerate(played):
        if not turn.train or (inserted_only and turn.expert):
            continue
        messages, flags, images = [*obs.messages, _assistant(text)], [True], list(obs.images)
        if index and not played[index - 1][2].train:
            # the turn answers an untrained (deliberately wrong) turn: that turn and the observation it led to stay in
            # the row as context (``train: false``), so the sample reads wrong click → its overlay → Undo; the last
            # observation is exactly what the policy sees at inference
            before, wrong, _ = played[index - 1]
            messages = [*before.messages, _assistant(wrong), *obs.messages[1:], _assistant(text)]
            flags, images = [False, True], [*before.images, *obs.images]
        rows.append({"messages": dataset_messages(messages, flags), "images": [png_bytes(i) for i in images],
                     "step": index})
    return rows


class _Writer:
    """Writes each turn's ``<think>`` (offline, or the teacher with the offline text as its draft)."""

    def __init__(self, modality: str, references: Mapping[str, np.ndarray | None], rng: random.Random,
                 teacher: reasoning.Teacher | None) -> None:
        self.modality = modality
        self.references = references
        self.rng = rng
        self.teacher = teacher

    def think(self, env: SegmentationEnv, obs: EnvObservation, turn: Turn, before_last: Mapping[str, np.ndarray],
              answer_text: str | None) -> str:
        targets = env.targets
        masks = env.masks
        first = targets[0]
        if turn.kind in ("click", "wrong", "terminate"):
            draft = reasoning.write_think(turn.actions, self.references, masks, targets, self.modality, self.rng)
        elif turn.kind == "undo":
            draft = reasoning.undo_think(before_last[first], masks[first], first, self.rng)
        else:
            draft = reasoning.reset_think(masks[first], self.references.get(first), first, self.modality, self.rng)
        if self.teacher is None or not turn.train:
            return draft
        grid = env.policy_grid
        reference = self.references.get(first)
        truth = np.zeros(grid, bool) if reference is None else resize_mask(reference, grid)
        click = next(((a.x, a.y) for a in turn.actions if a.is_click), None)
        view = reasoning.oracle_view(env.policy_image, resize_mask(masks[first], grid), truth, click)
        lines = "\n".join(format_action(a) for a in turn.actions)
        if answer_text is not None:
            lines += f"\nanswer: {answer_text}"
        text = self.teacher.write(view, obs.image, env.instruction, lines, draft)
        return text if text is not None else draft


def _answer(targets: Sequence[str], references: Mapping[str, np.ndarray | None], modality: str,
            rng: random.Random) -> str:
    absent = [t for t in targets if references.get(t) is None]
    return templates.answer(targets, modality, rng, absent=absent)[1]


#: A wrong first click counts as wrong when its mask overlaps the structure by less than this IoU.
WRONG_START_IOU = 0.2


def made_worse(before: np.ndarray, after: np.ndarray, reference: np.ndarray) -> bool:
    """Whether a step turned mask ``before`` into a worse ``after`` for structure ``reference`` ((H, W) bool): the
    IoU fell, or — from an empty mask — the new mask lies mostly off the structure (IoU below
    :data:`WRONG_START_IOU`)."""
    after_iou = iou(after, reference)
    if not before.any():
        return bool(after.any()) and after_iou < WRONG_START_IOU
    return after_iou < iou(before, reference)


def play(env: SegmentationEnv, episode: _Episode, writer: _Writer,
         rng: random.Random) -> tuple[list[tuple[EnvObservation, str, Turn]], str | None]:
    """Step ``env`` through ``episode``'s turns; returns the played turns, or ``(partial, reason)`` when the
    environment did not do what the plan expects (a replay that differs from the record, an early stop, a wrong
    click that did not make the mask worse)."""
    obs = env.reset()
    if env.done:
        return [], f"the environment stopped at reset: {env.stop_reason} ({env.error})"
    played: list[tuple[EnvObservation, str, Turn]] = []
    before_last: dict[str, np.ndarray] = dict(env.masks)
    expert_index = 0
    for position, turn in enumerate(episode.turns):
        before = dict(env.masks)
        answer_text = _answer(env.targets, writer.references, writer.modality, rng) if turn.kind == "terminate" \
            else None
        think = writer.think(env, obs, turn, before_last, answer_text)
        text = format_response(Response(think=think, actions=turn.actions, answer=answer_text))
        played.append((obs, text, turn))
        result = env.step(text)
        if result.error is not None:
            return played, f"turn {position} ({turn.kind}): {result.error}"
        if turn.kind == "wrong":
            name = env.targets[0]
            reference = writer.references.get(name)
            if reference is None or not made_worse(before[name], env.masks[name], reference):
                return played, "the wrong click did not make the mask worse"
        if turn.expert and turn.kind != "terminate":
            for name, mask in episode.expected.get(expert_index, {}).items():
                if not np.array_equal(env.masks[name], mask):
                    return played, (f"replayed mask of {name!r} after expert step {expert_index} differs from the "
                                    "record (another tool, or a refinement case without its manifest)")
            expert_index += 1
        if result.done and position < len(episode.turns) - 1:
            return played, f"the episode stopped early at turn {position}: {result.stop_reason}"
        before_last = before
        if result.observation is not None:
            obs = result.observation
    return played, None


# ------------------------------------------------------------------------------------------------ one case

#: The ``tool`` setting that replays the recorded masks instead of running a tool (:class:`env.RecordedSession`).
RECORDED = "recorded"


def recorded_calls(turns: Sequence[Turn], expected: Mapping[int, Mapping[str, np.ndarray]],
                   targets: Sequence[str]) -> list[np.ndarray]:
    """The recorded tool results of an episode in the order the environment asks for them: per expert clicking
    turn, one per clicked target in target order (:class:`ibisagent.env.RecordedSession`)."""
    calls: list[np.ndarray] = []
    index = 0
    for turn in turns:
        if not turn.expert or turn.kind == "terminate":
            continue
        if turn.kind == "click":
            touched = {(a.target if a.target is not None else targets[0]).strip().casefold()
                       for a in turn.actions if a.is_click}
            calls += [expected[index][name] for name in targets if name.strip().casefold() in touched]
        index += 1
    return calls


@functools.lru_cache(maxsize=4)
def load_tool_cached(spec: str, device: str):  # noqa: ANN202 - SegmentationTool; one instance per process and spec
    from ibisagent.tools import load_tool

    return load_tool(spec, device=device)


def _load_rgb(record: TrajectoryRecord) -> np.ndarray:
    image = load_image(record.image)
    plane = slice_of(image, record.slice or 0) if image.is_volume else image.array
    return to_display_rgb(plane, record.modality or image.modality)


def _references(records: Sequence[TrajectoryRecord], shape: tuple[int, int]) -> dict[str, np.ndarray | None]:
    """Target → the structure the expert trajectory ends on, ``None`` for an absent target."""
    refs: dict[str, np.ndarray | None] = {}
    for r in records:
        final = r.final_mask()
        if final is None:
            final = np.zeros(shape, bool)
        if final.shape != shape:
            raise ValueError(f"mask of {r.id}/{r.target} is {final.shape}, the image is {shape}")
        if final.any():
            refs[r.target] = final
        elif (r.final_dice is not None and r.final_dice >= 1.0) or absent_targets(r.answer, [r.target]):
            refs[r.target] = None
        else:
            raise ValueError(f"{r.id}/{r.target} ends with an empty mask but the target is present")
    return refs


def _case_stats(records: Sequence[TrajectoryRecord], modality: str) -> dict[str, Any]:
    ious = [r.final_iou for r in records if r.final_iou is not None]
    dices = [r.final_dice for r in records if r.final_dice is not None]
    return {"modality": modality, "iou": statistics.fmean(ious) if ious else None,
            "dice": statistics.fmean(dices) if dices else None}


def sft_case(task: dict[str, Any]) -> dict[str, Any]:
    """Build every SFT row of one case (the per-case function of every engine).

    Args:
        task: ``{"key", "records": [TrajectoryRecord dicts of one case], "options": SftOptions as a dict,
            "case": manifest Case or None, "others": [RLE masks of other structures on the same image]}``.

    Returns:
        ``{"key", "id", "rows": [{"messages", "images", "step"}], "meta": [...], "stats": {...},
        "report": [{"id", "reason", "kind"}]}``.

    Raises:
        reasoning.TeacherUnavailable: the teacher endpoint is down (the run stops; finished cases are kept).
    """
    options = _options(task["options"])
    records = [TrajectoryRecord.from_dict(d) for d in task["records"]]
    case_id = records[0].id
    modality = records[0].modality
    part: dict[str, Any] = {"key": task["key"], "id": case_id, "rows": [], "meta": [], "report": [],
                            "stats": {**_case_stats(records, modality), "samples": 0, "rows": 0, "qas": 0,
                                      "steps": 0, "self_correction": 0, "inconsistency": 0,
                                      "teacher": None, "filtered": None, "skipped": None}}

    def skip(reason: str, kind: str = "skipped") -> dict[str, Any]:
        part["stats"][kind] = reason
        part["report"].append({"id": case_id, "kind": kind, "reason": reason})
        return part

    try:
        turns, expected = expert_plan(records)
    except ValueError as exc:
        return skip(str(exc))
    clicks = sum(1 for t in turns if t.kind == "click")
    if options.max_steps is not None and clicks > options.max_steps:
        return skip(f"{clicks} expert steps > max_steps {options.max_steps}", "filtered")
    if options.min_dice is not None:
        dices = [r.final_dice for r in records]
        if any(d is None for d in dices):
            return skip("no final Dice in the record (min_dice filter)", "filtered")
        if min(dices) < options.min_dice:  # type: ignore[type-var]
            return skip(f"final Dice {min(dices):.3f} < min_dice {options.min_dice}", "filtered")  # type: ignore
    case: Case | None = task.get("case")
    try:
        if case is not None:
            loaded = load_case(case)
            rgb = loaded.rgb
            initial = ({t.target: loaded.initial_mask for t in records} if loaded.initial_mask is not None else {})
            refs = {name: (m if m is not None and m.any() else None) for name, m in loaded.targets.items()}
        else:
            rgb = _load_rgb(records[0])
            initial = {}
            refs = _references(records, rgb.shape[:2])
    except (CaseError, ImageError, OSError, ValueError) as exc:
        return skip(f"{type(exc).__name__}: {exc}")
    targets = tuple(r.target for r in records)
    rng = random.Random(f"{options.seed}:{case_id}")
    base_prompts = load_prompts(options.prompts)
    teacher = _teacher(options)
    try:
        recorded = options.tool == RECORDED
        session = None
        if not recorded:
            try:
                session = load_tool_cached(options.tool, options.device).encode(rgb)
            except Exception as exc:  # noqa: BLE001 - a tool failure skips only this case, with its message
                return skip(f"tool {options.tool!r} failed: {type(exc).__name__}: {exc}")
        grid = qwen_grid(rgb.shape[0], rgb.shape[1], options.min_pixels, options.max_pixels)
        writer = _Writer(modality, refs, rng, teacher)

        def episode(kind: str, plan: list[Turn], start: dict[str, np.ndarray],
                    expect: dict[int, dict[str, np.ndarray]]) -> _Episode:
            instruction = records[0].instruction
            if rng.random() < options.instruction_ratio:
                instruction = templates.initialization(targets, modality, rng)[1]
            prompts = base_prompts
            if len(targets) == 1 and rng.random() < options.refinement_ratio:
                prompts = replace(base_prompts, refine=templates.refinement(rng)[1])
            return _Episode(kind, instruction, targets, plan, start, prompts, expect)

        episodes = [episode("expert", turns, initial, expected)]
        single_present = len(targets) == 1 and refs.get(targets[0]) is not None and not initial
        click_turns = [i for i, t in enumerate(turns) if t.kind == "click"]
        if single_present and click_turns and rng.random() < options.self_correction:
            later = [i for i in click_turns if i > 0] or click_turns  # a wrong click after the first is likelier wrong
            at = later[rng.randrange(len(later))]
            before = expected[at - 1][targets[0]] if at > 0 else np.zeros(rgb.shape[:2], bool)
            wrong = reflect.wrong_click(refs[targets[0]], before, rng)  # type: ignore[arg-type]
            if recorded:
                part["report"].append({"id": case_id, "kind": "reflective",
                                       "reason": "self-correction needs a tool "
                                                 "(--tool recorded replays recorded masks)"})
            elif wrong is not None:
                action = Action.from_click(wrong, rgb.shape[1], rgb.shape[0])
                episodes.append(episode("self_correction", reflect.with_self_correction(turns, at, action), {},
                                        expected))
            else:
                part["report"].append({"id": case_id, "kind": "reflective", "reason": "no wrong click found"})
        if single_present and rng.random() < options.inconsistency:
            others = [rle_decode(m) for m in task.get("others", [])]
            wrong_mask = reflect.wrong_structure(refs[targets[0]], others, rng)  # type: ignore[arg-type]
            if wrong_mask is not None:
                episodes.append(episode("inconsistency", reflect.with_reset(turns), {targets[0]: wrong_mask},
                                        expected))
            else:
                part["report"].append({"id": case_id, "kind": "reflective", "reason": "no other structure found"})
        for ep in episodes:
            episode_session = session if session is not None else RecordedSession(
                rgb.shape[:2], recorded_calls(ep.turns, ep.expected, targets))
            env = SegmentationEnv(rgb, ep.instruction, ep.targets, episode_session, policy_grid=grid,
                                  initial_masks=ep.initial or None,
                                  config=EnvConfig(max_steps=len(ep.turns) + 1, history=options.history,
                                                   repeat_limit=options.repeat_limit,
                                                   show_points=options.show_points),
                                  prompts=ep.prompts)
            played, problem = play(env, ep, writer, rng)
            if problem is not None:
                if ep.kind == "expert":
                    return skip(problem)
                part["report"].append({"id": case_id, "kind": "reflective", "reason": f"{ep.kind}: {problem}"})
                continue
            rows = rows_of(played, options.history, inserted_only=ep.kind != "expert")
            for row in rows:
                part["meta"].append({"id": case_id, "kind": ep.kind, "modality": modality, "step": row.pop("step")})
            part["rows"].extend(rows)
            part["stats"]["rows"] += len(rows)
            part["stats"]["qas"] += sum(1 for row in rows for m in row["messages"]
                                        if m["role"] == "assistant" and m["train"])
            if ep.kind == "expert":
                part["stats"]["samples"] = 1
                part["stats"]["steps"] = clicks
            else:
                part["stats"][ep.kind] += 1
    finally:
        if teacher is not None:
            part["stats"]["teacher"] = teacher.stats.as_dict()
            close = getattr(teacher.policy, "close", None)
            if close is not None:
                close()
    return part


def _options(data: Mapping[str, Any]) -> SftOptions:
    values = dict(data)
    if values.get("teacher") is not None and not isinstance(values["teacher"], TeacherSpec):
        values["teacher"] = TeacherSpec(**values["teacher"])
    return SftOptions(**values)


def _teacher(options: SftOptions) -> reasoning.Teacher | None:
    spec = options.teacher
    if spec is None:
        return None
    from ibisagent.policies.openai import OpenAIPolicy

    policy = OpenAIPolicy(spec.url, spec.model, timeout=spec.timeout, concurrency=1)
    from ibisagent.policies.base import GenerationOptions

    options = GenerationOptions(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, seed=0)
    return reasoning.Teacher(policy, spec.cache_dir, retries=spec.retries, per_second=spec.per_second,
                             options=options)


# ------------------------------------------------------------------------------------------------- the build


def _group(records: Iterable[TrajectoryRecord]) -> list[list[TrajectoryRecord]]:
    groups: dict[str, list[TrajectoryRecord]] = {}
    for record in records:
        groups.setdefault(record.id, []).append(record)
    return list(groups.values())


def _key(index: int, case_id: str) -> str:
    return f"{index:07d}-{case_id}"


def build_sft(
    trajectories: str | os.PathLike[str] | Iterable[TrajectoryRecord],
    out_dir: str | os.PathLike[str],
    *,
    history: HistoryMode = "off",
    reflective: ReflectiveRatios | float | None = None,
    max_steps: int | None = None,
    min_dice: float | None = None,
    seed: int = 0,
    tool: str | None = None,
    device: str = "cpu",
    manifest: str | os.PathLike[str] | None = None,
    teacher: TeacherSpec | None = None,
    prompts: str | os.PathLike[str] | None = None,
    instruction_ratio: float = 0.5,
    refinement_ratio: float = 0.3,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 1,
    engine: Engine = "local",
    progress: bool = True,
    llamafactory: bool = False,
    show_points: bool = False,
) -> dict[str, Any]:
    """Build the SFT dataset from expert trajectory records (see the module docstring for the layout).

    Args:
        trajectories: a trajectory JSONL (``ibisagent simulate --out``) or the records themselves.
        out_dir: the dataset folder (created; a killed run started again with the same settings resumes).
        history: ``"off"`` (a row per turn) or ``"full"`` (a row per episode).
        reflective: probabilities of the reflective episodes per trajectory (:class:`ReflectiveRatios`, or one
            number for both kinds).
        max_steps: drop trajectories with more expert clicks than this.
        min_dice: drop trajectories whose final Dice (any target) is below this.
        seed: every random choice (templates, phrasing, reflective samples) derives from it and the case id.
        tool: tool spec to replay with, or ``"recorded"``: the recorded masks stand in for the tool
            (:class:`ibisagent.env.RecordedSession`; no tool needed, e.g. MedSAM2 trajectories on a laptop; no
            self-correction samples, which need the tool's answer to a new click). Default: ``embedded`` when the
            records were made with it, else ``"recorded"``.
        device: torch device of model-based tools.
        manifest: the manifest the trajectories were simulated from: gives refinement cases their initial mask and
            the reasoning the ground truth (without it, the structure each trajectory ends on).
        teacher: write the reasoning with a teacher model (:class:`TeacherSpec`).
        prompts: a prompt TOML overriding the built-in wording (as ``--prompts`` at inference).
        instruction_ratio: share of episodes whose request is drawn from the instruction library.
        refinement_ratio: share of single-target episodes whose refinement prompt is drawn from the library.
        min_pixels, max_pixels: the policy's image budget (the images are resized to this grid, as at inference).
        workers: processes (local engine) or CPUs of a local Ray instance.
        engine: ``"local"`` or ``"ray"`` (:mod:`ibisagent.data.runner`).
        progress: show a progress bar.
        llamafactory: also write a LLaMA-Factory export (:func:`export_llamafactory`).
        show_points: refinement turns list the points placed so far (:attr:`ibisagent.env.EnvConfig.show_points`);
            recorded in ``out_dir/ibisagent.json`` (:func:`ibisagent.env.write_observation`), which SFT copies into
            the policy it trains so that inference observes the same way.

    Returns:
        The statistics (``stats.json``): totals, per modality, filters, skipped cases, teacher counters.

    Raises:
        reasoning.TeacherUnavailable: the teacher endpoint is down (finished cases are kept for the next run).
        ValueError: bad settings, or an ``out_dir`` holding a build with other settings.
    """
    ratios = ReflectiveRatios.of(reflective)
    out = Path(out_dir)
    if teacher is not None and teacher.per_second is not None:
        teacher = replace(teacher, per_second=teacher.per_second / max(1, workers))
    options = SftOptions(history=history, tool=tool or "", device=device, max_steps=max_steps, min_dice=min_dice,
                         seed=seed, min_pixels=min_pixels, max_pixels=max_pixels,
                         instruction_ratio=instruction_ratio, refinement_ratio=refinement_ratio,
                         self_correction=ratios.self_correction, inconsistency=ratios.inconsistency,
                         prompts=str(prompts) if prompts else None, teacher=teacher,
                         manifest=str(manifest) if manifest else None, show_points=show_points)
    if isinstance(trajectories, (str, os.PathLike)):
        records = list(read_trajectories(trajectories))
    else:
        records = list(trajectories)
    if tool is None:
        tools = {r.tool for r in records}
        tool = "embedded" if tools <= {"embedded"} else RECORDED
        log.info("replaying with %s (records made with %s)", tool, ", ".join(sorted(tools)) or "no tool")
    if tool != RECORDED:
        load_tool_cached(tool, device)  # a bad tool spec fails here, before any work
    options = replace(options, tool=tool)
    groups = _group(records)
    cases: dict[str, Case] = {}
    if manifest is not None:
        cases = {c.id: c for c in read_manifest(manifest) if isinstance(c, Case)}
    by_image: dict[tuple[str, int | None], list[tuple[str, dict[str, Any]]]] = {}
    for group in groups:
        for r in group:
            if r.steps:
                by_image.setdefault((r.image, r.slice), []).append((r.id, r.steps[-1].mask))
    tasks = []
    for index, group in enumerate(groups):
        case_id = group[0].id
        others = [m for other_id, m in by_image.get((group[0].image, group[0].slice), []) if other_id != case_id]
        tasks.append({"key": _key(index, case_id), "records": [asdict(r) for r in group],
                      "options": asdict(options), "case": cases.get(case_id), "others": others})
    config = {**_identity(options), "cases": [t["key"] for t in tasks]}
    work = prepare_work_dir(out / ".work", config)
    parts = run_tasks(tasks, sft_case, work, engine=engine, workers=workers, progress=progress, desc="build-sft")
    stats = _write_dataset(out, parts, options)
    if llamafactory:
        export_llamafactory(out, out / "llamafactory")
    return stats


def _write_dataset(out: Path, parts: Sequence[dict[str, Any]], options: SftOptions) -> dict[str, Any]:
    """Write the report, the statistics and the dataset of finished ``parts`` into ``out``.

    Raises:
        ValueError: no case gave a row (every one skipped or filtered; the reasons are in ``report.jsonl``).
    """
    import datasets

    meta = [m for p in parts for m in p["meta"]]
    atomic_write_text(out / "rows.jsonl", "".join(json.dumps(m, sort_keys=True) + "\n" for m in meta))
    report = [r for p in parts for r in p["report"]]
    atomic_write_text(out / "report.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in report))
    stats = summarize([p["stats"] for p in parts])
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "stats.md", format_stats(stats) + "\n")
    write_observation(out, asdict(options))
    if not meta:
        raise ValueError(f"no SFT rows: all {len(parts)} case(s) were skipped or filtered; the reasons are in "
                         f"{out / 'report.jsonl'}")
    part_files = [str(out / ".work" / f"{p['key']}.pkl") for p in parts]
    cache = out / ".work" / "hf-cache"
    shutil.rmtree(cache, ignore_errors=True)
    dataset = datasets.Dataset.from_generator(_rows, features=dataset_features(), cache_dir=str(cache),
                                              gen_kwargs={"files": part_files},
                                              fingerprint=_fingerprint(parts, options))
    if len(dataset) != len(meta):
        raise RuntimeError(f"datasets generated {len(dataset)} rows from {len(meta)} built ones ({cache})")
    for stale in out.glob("data-*.arrow"):
        stale.unlink()
    dataset.save_to_disk(str(out))
    del dataset
    shutil.rmtree(cache, ignore_errors=True)
    return stats


def _identity(options: SftOptions) -> dict[str, Any]:
    """The settings that decide the result: all of them, except where the teacher runs and how fast (its replies are
    cached by model and request, so another URL for the same model gives the same data)."""
    values = asdict(options)
    if values["teacher"] is not None:
        values["teacher"] = {k: v for k, v in values["teacher"].items() if k not in ("per_second", "url", "timeout")}
    return values


def _fingerprint(parts: Sequence[dict[str, Any]], options: SftOptions) -> str:
    import hashlib

    payload = json.dumps({"options": _identity(options), "keys": [p["key"] for p in parts]}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _rows(files: Sequence[str]) -> Iterator[dict[str, Any]]:
    import pickle

    for path in files:
        with open(path, "rb") as fh:
            part = pickle.load(fh)
        for row in part["rows"]:
            yield {"messages": row["messages"], "images": [{"bytes": b, "path": None} for b in row["images"]]}


# -------------------------------------------------------------------------------------------------- statistics


def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    kept = [r for r in rows if r["samples"]]
    ious = [float(r["iou"]) for r in kept if r["iou"] is not None]
    dices = [float(r["dice"]) for r in kept if r["dice"] is not None]
    return {
        "samples": len(kept),
        "rows": sum(r["rows"] for r in rows),
        "qas": sum(r["qas"] for r in rows),
        "self_correction": sum(r["self_correction"] for r in rows),
        "inconsistency": sum(r["inconsistency"] for r in rows),
        "mean_steps": statistics.fmean(r["steps"] for r in kept) if kept else None,
        "mean_iou": statistics.fmean(ious) if ious else None,
        "median_iou": statistics.median(ious) if ious else None,
        "mean_dice": statistics.fmean(dices) if dices else None,
        "median_dice": statistics.median(dices) if dices else None,
    }


def summarize(case_stats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Totals and per-modality statistics of a build (samples = expert trajectories kept, QAs = trained turns),
    plus the filter and skip counts and the teacher's counters summed over cases."""
    out = _summary(case_stats)
    modalities = sorted({s["modality"] or "" for s in case_stats if s["samples"]})
    out["per_modality"] = {m: _summary([s for s in case_stats if (s["modality"] or "") == m]) for m in modalities}
    out["filtered"] = sum(1 for s in case_stats if s["filtered"])
    out["skipped"] = sum(1 for s in case_stats if s["skipped"])
    teacher: dict[str, Any] = {}
    for s in case_stats:
        for k, v in (s.get("teacher") or {}).items():
            if isinstance(v, dict):
                bucket = teacher.setdefault(k, {})
                for reason, n in v.items():
                    bucket[reason] = bucket.get(reason, 0) + n
            else:
                teacher[k] = teacher.get(k, 0) + v
    if teacher:
        out["teacher"] = teacher
    return out


def format_stats(stats: Mapping[str, Any]) -> str:
    """A Markdown table like the paper's Tab. 6: samples, QAs, mean steps, mean/median IoU and Dice per modality."""
    lines = ["| modality | samples | QAs | rows | mean steps | mean IoU | median IoU | mean Dice | median Dice |",
             "|" + "---|" * 9]

    def num(value: Any, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    def row(name: str, s: Mapping[str, Any]) -> str:
        return (f"| {name} | {s['samples']} | {s['qas']} | {s['rows']} | {num(s['mean_steps'], 2)} "
                f"| {num(s['mean_iou'], 4)} | {num(s['median_iou'], 4)} | {num(s['mean_dice'], 4)} "
                f"| {num(s['median_dice'], 4)} |")

    for name, s in stats.get("per_modality", {}).items():
        lines.append(row(name or "(none)", s))
    lines.append(row("**all**", stats))
    notes = [f"{stats.get('self_correction', 0)} self-correction and {stats.get('inconsistency', 0)} "
             f"user-inconsistency episodes; {stats.get('filtered', 0)} trajectories filtered, "
             f"{stats.get('skipped', 0)} skipped (reasons in report.jsonl)."]
    if stats.get("teacher"):
        t = stats["teacher"]
        notes.append(f"Teacher: {t.get('calls', 0)} calls, {t.get('cache_hits', 0)} cached, {t.get('rejected', 0)} "
                     f"replies rejected, {t.get('dropped', 0)} steps fell back to the offline text.")
    return "\n".join(lines) + "\n\n" + " ".join(notes)


# ------------------------------------------------------------------------------------------------- LLaMA-Factory


def export_llamafactory(dataset_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                        name: str = "ibisagent_sft") -> dict[str, int]:
    """Export an SFT dataset for LLaMA-Factory (the authors' SFT tool): ``NAME.json`` in its ShareGPT layout
    (``{"messages": [{"role", "content"}], "images": ["images/…png"]}``, ``<image>`` where each image stands),
    ``images/`` and a ``dataset_info.json`` entry. LLaMA-Factory trains every assistant turn, so rows holding a
    ``train: false`` turn are left out (counted).

    Returns:
        ``{"rows": exported, "left_out": rows with untrained turns}``.
    """
    import datasets

    dataset = datasets.load_from_disk(str(dataset_dir))
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, left_out = [], 0
    for index, row in enumerate(dataset):
        if any(m["role"] == "assistant" and not m["train"] for m in row["messages"]):
            left_out += 1
            continue
        paths = []
        for k, image in enumerate(row["images"]):
            rel = f"images/{index:07d}_{k}.png"
            image.save(out / rel, format="PNG")
            paths.append(rel)
        messages = [{"role": m["role"], "content": "".join("<image>" if p["type"] == "image" else p["text"]
                                                           for p in m["content"])} for m in row["messages"]]
        records.append({"messages": messages, "images": paths})
    atomic_write_text(out / f"{name}.json", json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    info = {name: {"file_name": f"{name}.json", "formatting": "sharegpt",
                   "columns": {"messages": "messages", "images": "images"},
                   "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                            "assistant_tag": "assistant", "system_tag": "system"}}}
    atomic_write_text(out / "dataset_info.json", json.dumps(info, indent=2) + "\n")
    return {"rows": len(records), "left_out": left_out}


__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MIN_PIXELS", "SftOptions", "TeacherSpec", "build_sft", "dataset_features",
           "expert_plan", "export_llamafactory", "format_stats", "play", "rows_of", "sft_case",
           "summarize"]
