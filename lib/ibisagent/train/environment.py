"""The trl ``environment_factory`` adapter over :class:`ibisagent.env.SegmentationEnv` (one instance per rollout).

trl calls :meth:`SegmentationToolEnv.reset` with every column of a GRPO row, exposes the public method
:meth:`~SegmentationToolEnv.act` as the only tool, and hands the instances to the reward functions. The project's
response template (:mod:`ibisagent.train.template`) turns an action turn into one ``act`` call carrying the whole
turn text, so the environment applies exactly the text the model wrote, through the same ``env.step`` the agent uses
at inference. ``act`` returns the next observation — the overlay image and the refinement prompt, as content blocks
— which trl appends to the rollout (out of the loss) and feeds to the next turn and to the training forward pass.

A turn that calls no tool (``Terminate`` with its answer, malformed text, or an action cut by
``max_tool_calling_iterations``) ends the rollout unexecuted; :meth:`episode` applies it before the rewards read the
records, so every generated turn is scored.

GRPO rows (:func:`ibisagent.train.grpo.build_rows`) carry ``manifest`` and ``case_id`` (the case is loaded from
its manifest), ``history`` (JSON list of recorded turn texts replayed before the policy acts: step mode),
``optimal_steps`` and ``expected_answer``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ibisagent.observation import DEFAULT_MIN_PIXELS, GRID_FACTOR
from ibisagent.rewards import Episode, Turn, episode_from_env


@dataclass(frozen=True)
class EnvSettings:
    """How rollouts are set up: the tool spec, episode settings (``show_points``: as the policy being trained was, see
    :func:`ibisagent.env.read_observation`) and the policy's pixel budget."""

    tool: str = "embedded"
    history: str = "full"
    max_steps: int = 6
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = 224 * 224
    factor: int = GRID_FACTOR
    prompts: str | None = None
    show_points: bool = False


@functools.lru_cache(maxsize=8)
def _tool(spec: str) -> Any:
    from ibisagent.tools import load_tool

    return load_tool(spec)


@functools.lru_cache(maxsize=64)
def _cases(manifest: str) -> dict[str, Any]:
    from ibisagent.data.manifest import read_cases

    return {case.id: case for case in read_cases(manifest)}


@functools.lru_cache(maxsize=256)
def loaded_case(manifest: str, case_id: str) -> Any:
    """The loaded case ``case_id`` of ``manifest`` (cached per process)."""
    from ibisagent.data.manifest import load_case

    cases = _cases(str(manifest))
    if case_id not in cases:
        raise KeyError(f"case {case_id!r} not found in {manifest}")
    return load_case(cases[case_id])


def policy_grid(height: int, width: int, settings: EnvSettings) -> tuple[int, int]:
    """The processor's smart resize (multiples of ``factor`` within the pixel budget), as ``hf:`` policies use."""
    from ibisagent.observation import qwen_grid

    return qwen_grid(int(height), int(width), settings.min_pixels, settings.max_pixels, factor=settings.factor)


def make_env(manifest: str, case_id: str, settings: EnvSettings) -> Any:
    """A reset-ready :class:`~ibisagent.env.SegmentationEnv` for one case, with its ground truth; ``None`` for a
    closed-VQA case without targets."""
    from ibisagent.env import EnvConfig, SegmentationEnv
    from ibisagent.prompts import load_prompts

    loaded = loaded_case(str(manifest), str(case_id))
    if not loaded.targets:
        return None
    names = tuple(loaded.targets)
    rgb = loaded.rgb
    initial = {n: loaded.initial_mask for n in names} if loaded.initial_mask is not None else None
    return SegmentationEnv(
        rgb, loaded.case.instruction, names, _tool(settings.tool).encode(rgb),
        policy_grid=policy_grid(rgb.shape[0], rgb.shape[1], settings),
        initial_masks=initial, ground_truth=dict(loaded.targets),
        config=EnvConfig(max_steps=settings.max_steps, history=settings.history,  # type: ignore[arg-type]
                         show_points=settings.show_points),
        prompts=load_prompts(settings.prompts) if settings.prompts else None,
    )


def to_content_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An environment message's content as trl content blocks (images as PIL)."""
    from ibisagent.observation import to_pil

    blocks = []
    for part in message["content"]:
        if part.get("type") == "image":
            blocks.append({"type": "image", "image": to_pil(np.asarray(part["image"]))})
        else:
            blocks.append({"type": "text", "text": part.get("text", "")})
    return blocks


def turn_text(message: Any) -> str:
    """The text a model wrote in one assistant message (the ``act`` call's turn plus any stray content)."""
    if isinstance(message, str):
        return message
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    calls = message.get("tool_calls") or []
    turns = []
    for call in calls:
        fn = call.get("function", call)
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {}
        if isinstance(args, dict) and isinstance(args.get("turn"), str):
            turns.append(args["turn"])
    return "".join(turns) + content


class SegmentationToolEnv:
    """One rollout's environment for trl (construct with no arguments through a factory closure)."""

    def __init__(self, settings: EnvSettings | None = None) -> None:
        self.settings = settings or EnvSettings()
        self.env: Any = None
        self.first_step = 0
        self.applied = 0
        self.calls = 0
        self.images = 0  # observation images returned to the rollout (each reaches the training forward pass)
        self.row: dict[str, Any] = {}
        self.vqa_text: str | None = None

    def reset(self, **row: Any) -> None:
        """Start the rollout of ``row`` (its columns): load the case, replay the recorded ``history`` turns (step
        mode). The prompt and its images come from the row itself (built from the same environment)."""
        self.row = row
        self.applied = 0
        self.calls = 0
        self.images = 0
        self.vqa_text = None
        self.env = make_env(row["manifest"], row["case_id"], self.settings)
        if self.env is None:
            return None
        self.env.reset()
        for text in json.loads(row.get("history") or "[]"):
            self.env.step(text)
        self.first_step = len(self.env.steps)
        return None

    def act(self, turn: str) -> list[dict[str, Any]] | str:
        """Apply one turn of the segmentation agent and show the result.

        Args:
            turn: the model's whole turn, from <think> through </action>, in the action grammar.

        Returns:
            The next observation: the overlay image of the current masks and the refinement prompt.
        """
        self.applied += 1
        self.calls += 1
        if self.env is None or self.env.done:
            return "The episode has ended."
        result = self.env.step(turn)
        if result.observation is None:
            return f"The episode has ended ({result.stop_reason})."
        blocks = to_content_blocks(result.observation.messages[-1])
        self.images += sum(1 for b in blocks if b["type"] == "image")
        return blocks

    @property
    def episode(self) -> Callable[[Any], Episode]:
        """``episode(completion)``: the rollout's :class:`~ibisagent.rewards.Episode`, after applying its last,
        unexecuted turn. A property, not a method, so that trl does not offer it to the model as a tool."""
        return self._episode

    def _episode(self, completion: Any) -> Episode:
        messages = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        turns = [m for m in messages if isinstance(m, str) or m.get("role") == "assistant"]
        expected = self.row.get("expected_answer") or None
        optimal = self.row.get("optimal_steps")
        optimal = int(optimal) if optimal is not None else None
        if self.env is None:  # closed VQA: the answer is the whole episode
            from ibisagent.protocol import ProtocolError, parse_response

            text = turn_text(turns[-1]) if turns else ""
            try:
                answer = parse_response(text).answer
            except ProtocolError:
                answer = None
            return Episode(turns=(Turn(text),), answer=answer, expected_answer=expected, optimal_steps=optimal)
        if len(turns) > self.applied and not self.env.done:
            self.env.step(turn_text(turns[-1]))
            self.applied = len(turns)
        return episode_from_env(self.env, self.first_step, expected_answer=expected, optimal_steps=optimal)


def factory(settings: EnvSettings) -> Any:
    """A no-argument ``environment_factory`` for trl."""
    return functools.partial(SegmentationToolEnv, settings)


__all__ = ["EnvSettings", "SegmentationToolEnv", "factory", "loaded_case", "make_env", "policy_grid", "turn_text"]

