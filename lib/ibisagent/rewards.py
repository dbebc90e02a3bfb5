"""The five rewards of the paper's agentic RL stage (DESIGN §2), shared by GRPO, evaluation and data checks.

Every reward is computed from an :class:`Episode`: what the environment recorded while a policy's turns were applied
(raw text of every turn, per target the IoU before and after each turn, whether each click fell in the error region
it should, the stop reason, the final answer). Nothing here re-runs the tool or recomputes a mask; IoU comes from
:mod:`ibisagent.metrics` through the environment's record.

=========================  =====================================================================================
reward                     value of one episode
=========================  =====================================================================================
``format``                 share of turns whose raw text has the released checkpoint's strict layout
                           (:func:`ibisagent.protocol.is_strict_format`); ``Termination`` is not strict
``answer``                 per target, piecewise final IoU: > 0.8 → 3, > 0.7 → 2, > 0.5 → 1, else 0; an absent
                           target scores 3 when its final mask is empty *and* the answer declares it absent; a
                           closed VQA question scores 3 for an exact (case- and punctuation-insensitive) match;
                           mean over targets
``click``                  mean over the episode's clicks of +1 (positive click inside the missed region, negative
                           click inside the over-included region) or −1 (anywhere else); 0 without clicks
``progress``               share of click turns after which the (mean over targets) IoU rose
``length``                 +1 for at most ``optimal_steps`` turns, then −0.2 per extra turn (1 − 0.2·extra)
=========================  =====================================================================================

The trl signature: every ``*_reward`` function is ``f(completions, environments=None, **columns) -> list[float]``
(one value per completion). ``environments`` are the rollouts' environment adapters
(:class:`ibisagent.train.environment.SegmentationToolEnv`); each exposes :meth:`episode`. Without environments an
``episodes`` keyword (a list of :class:`Episode`) is read instead, which is how evaluation calls them.
:func:`weighted_total` combines them with :class:`RewardWeights`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ibisagent.protocol import is_strict_format

#: Piecewise final-IoU thresholds → points (checked in order; strictly greater than).
ANSWER_IOU_STEPS: tuple[tuple[float, float], ...] = ((0.8, 3.0), (0.7, 2.0), (0.5, 1.0))
#: Points for a right answer that is not an IoU (absent target answered absent, exact closed-VQA match).
ANSWER_MATCH_POINTS = 3.0
#: Deduction per turn beyond the optimal count (trajectory-length reward).
LENGTH_PENALTY = 0.2

REWARD_NAMES: tuple[str, ...] = ("format", "answer", "click", "progress", "length")


@dataclass(frozen=True)
class ClickOutcome:
    """One applied click: its polarity and whether it fell where it should (positive inside the missed region,
    negative inside the over-included region, both judged on the mask *before* the click's turn)."""

    positive: bool
    in_error_region: bool


@dataclass(frozen=True)
class Turn:
    """One policy turn as the environment recorded it.

    Attributes:
        raw: the model's text, exactly as generated.
        iou_before, iou_after: target name → IoU with the ground truth before / after the turn (empty when the
            ground truth is unknown or the turn changed nothing).
        clicks: the clicks the turn applied.
    """

    raw: str
    iou_before: Mapping[str, float] = field(default_factory=dict)
    iou_after: Mapping[str, float] = field(default_factory=dict)
    clicks: tuple[ClickOutcome, ...] = ()


@dataclass(frozen=True)
class Episode:
    """What the rewards read about one trajectory (or one step, in step mode).

    Attributes:
        turns: every policy turn in order, malformed ones included.
        final_iou: present target name → IoU of its final mask with the ground truth.
        absent: target name → whether its final mask is empty, for targets whose ground truth is absent.
        answer: the final ``<answer>`` text (``None`` when the policy never answered).
        absent_declared: the targets the answer declares absent (``ibisagent.agent.absent_targets``).
        expected_answer: the closed-VQA answer when the row is a question, else ``None``.
        stop_reason: why the episode stopped (the environment's stop reason).
        optimal_steps: the expert's turn count for this case (``None``: the length reward uses its default).
    """

    turns: tuple[Turn, ...]
    final_iou: Mapping[str, float] = field(default_factory=dict)
    absent: Mapping[str, bool] = field(default_factory=dict)
    answer: str | None = None
    absent_declared: frozenset[str] = frozenset()
    expected_answer: str | None = None
    stop_reason: str = ""
    optimal_steps: int | None = None


@dataclass(frozen=True)
class RewardWeights:
    """Weight of each reward in the total (the paper weighs them equally)."""

    format: float = 1.0
    answer: float = 1.0
    click: float = 1.0
    progress: float = 1.0
    length: float = 1.0

    def as_list(self) -> list[float]:
        """Weights in :data:`REWARD_NAMES` order (trl's ``reward_weights``)."""
        return [float(getattr(self, name)) for name in REWARD_NAMES]

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> RewardWeights:
        """From a mapping; an unknown reward name raises ``ValueError`` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown reward name(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: float(v) for k, v in values.items()})


# ----------------------------------------------------------------------------------------------------------------
# pure scores of one episode


def format_score(episode: Episode) -> float:
    """Share of turns laid out exactly as the released checkpoint writes them; 0 for an episode without turns."""
    if not episode.turns:
        return 0.0
    return sum(is_strict_format(t.raw) for t in episode.turns) / len(episode.turns)


def iou_points(value: float) -> float:
    """Piecewise points of a final IoU: > 0.8 → 3, > 0.7 → 2, > 0.5 → 1, else 0."""
    for threshold, points in ANSWER_IOU_STEPS:
        if value > threshold:
            return points
    return 0.0


def normalise_answer(text: str) -> str:
    """Case-, whitespace- and edge-punctuation-insensitive form of a short answer, for exact matching."""
    return re.sub(r"\s+", " ", text.casefold()).strip().strip(string.punctuation + " ")


def answer_score(episode: Episode) -> float:
    """The final-answer reward (see the module table). 0 when there is nothing to score."""
    if episode.expected_answer is not None:
        if episode.answer is None:
            return 0.0
        same = normalise_answer(episode.answer) == normalise_answer(episode.expected_answer)
        return ANSWER_MATCH_POINTS if same else 0.0
    scores = [iou_points(v) for v in episode.final_iou.values()]
    for name, empty in episode.absent.items():
        scores.append(ANSWER_MATCH_POINTS if empty and name in episode.absent_declared else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def click_score(episode: Episode) -> float:
    """Mean of +1 (click in the right error region) / −1 (elsewhere) over all clicks; 0 without clicks."""
    clicks = [c for t in episode.turns for c in t.clicks]
    if not clicks:
        return 0.0
    return sum(1.0 if c.in_error_region else -1.0 for c in clicks) / len(clicks)


def progress_score(episode: Episode) -> float:
    """Share of click turns after which the mean IoU over targets rose; 0 without click turns."""
    rises = []
    for t in episode.turns:
        if not t.clicks or not t.iou_after:
            continue
        names = [n for n in t.iou_after if n in t.iou_before]
        if not names:
            continue
        before = sum(t.iou_before[n] for n in names) / len(names)
        after = sum(t.iou_after[n] for n in names) / len(names)
        rises.append(after > before)
    return sum(rises) / len(rises) if rises else 0.0


def length_score(episode: Episode, optimal_steps: int = 3) -> float:
    """+1 for at most the optimal number of turns (``episode.optimal_steps`` or ``optimal_steps``), minus 0.2 per
    extra turn."""
    optimal = episode.optimal_steps if episode.optimal_steps is not None else optimal_steps
    extra = max(0, len(episode.turns) - max(1, int(optimal)))
    return 1.0 - LENGTH_PENALTY * extra


SCORES = {
    "format": format_score,
    "answer": answer_score,
    "click": click_score,
    "progress": progress_score,
    "length": length_score,
}


def score_episode(episode: Episode) -> dict[str, float]:
    """Every reward of one episode, by name (:data:`REWARD_NAMES` order)."""
    return {name: float(SCORES[name](episode)) for name in REWARD_NAMES}


def weighted_total(scores: Mapping[str, float], weights: RewardWeights | None = None) -> float:
    """Σ weight · reward over :data:`REWARD_NAMES`."""
    w = weights or RewardWeights()
    return float(sum(getattr(w, name) * scores[name] for name in REWARD_NAMES))


# ----------------------------------------------------------------------------------------------------------------
# trl reward functions


def episodes_of(completions: Sequence[Any], environments: Sequence[Any] | None = None, **columns: Any) -> list[Episode]:
    """The episode of every completion: from the environment adapters (each finishes the rollout's last,
    not-yet-executed turn from its completion first) or from an ``episodes`` column."""
    if environments is not None:
        if len(environments) != len(completions):
            raise ValueError(f"{len(environments)} environments for {len(completions)} completions")
        return [env.episode(completion) for env, completion in zip(environments, completions, strict=True)]
    episodes = columns.get("episodes")
    if episodes is None:
        raise ValueError("rewards need `environments=` (GRPO) or `episodes=` (evaluation)")
    if len(episodes) != len(completions):
        raise ValueError(f"{len(episodes)} episodes for {len(completions)} completions")
    return list(episodes)


def _reward(name: str):
    score = SCORES[name]

    def reward(completions: Sequence[Any], environments: Sequence[Any] | None = None, **columns: Any) -> list[float]:
        return [float(score(e)) for e in episodes_of(completions, environments, **columns)]

    reward.__name__ = f"{name}_reward"
    reward.__qualname__ = reward.__name__
    reward.__doc__ = (
        f"trl reward function: the ``{name}`` reward of each completion (see :func:`{score.__name__}`). "
        "Signature ``(completions, environments=None, **columns) -> list[float]``."
    )
    return reward


format_reward = _reward("format")
answer_reward = _reward("answer")
click_reward = _reward("click")
progress_reward = _reward("progress")
length_reward = _reward("length")

#: The five trl reward functions in :data:`REWARD_NAMES` order.
REWARD_FUNCTIONS = (format_reward, answer_reward, click_reward, progress_reward, length_reward)


# ----------------------------------------------------------------------------------------------------------------
# reading the environment


def episode_from_steps(
    steps: Sequence[Any],
    masks: Mapping[str, Any],
    *,
    answer: str | None = None,
    stop_reason: str | None = None,
    expected_answer: str | None = None,
    optimal_steps: int | None = None,
) -> Episode:
    """An :class:`Episode` from the environment's records (:class:`ibisagent.env.StepResult` objects, which need
    ground truth for scores) and its final masks (target name → (H, W) bool). Reads the records only: IoU before /
    after, each click's ``in_error_region``, the raw text, the answer and the targets it declared absent."""
    turns = []
    final: dict[str, float] = {}
    present: dict[str, bool] = {}
    declared: set[str] = set()
    for step in steps:
        scores = step.scores or ()
        turns.append(Turn(
            raw=step.raw,
            iou_before={s.name: float(s.iou_before) for s in scores},
            iou_after={s.name: float(s.iou_after) for s in scores},
            clicks=tuple(ClickOutcome(positive=c.action.kind == "positive", in_error_region=bool(c.in_error_region))
                         for c in step.clicks),
        ))
        for s in scores:
            final[s.name] = float(s.iou_after)
            present[s.name] = bool(s.present)
        declared |= set(step.absent)
    return Episode(
        turns=tuple(turns),
        final_iou={n: v for n, v in final.items() if present[n]},
        absent={n: not bool(masks[n].any()) for n in final if not present[n]},
        answer=answer,
        absent_declared=frozenset(declared),
        expected_answer=expected_answer,
        stop_reason=stop_reason or "",
        optimal_steps=optimal_steps,
    )


def episode_from_env(env: Any, first_step: int = 0, *, expected_answer: str | None = None,
                     optimal_steps: int | None = None) -> Episode:
    """The :class:`Episode` of a :class:`ibisagent.env.SegmentationEnv` from its ``first_step``-th record on (step
    mode replays recorded turns first and scores only the policy's)."""
    return episode_from_steps(env.steps[first_step:], env.masks, answer=env.answer, stop_reason=env.stop_reason,
                              expected_answer=expected_answer, optimal_steps=optimal_steps)
