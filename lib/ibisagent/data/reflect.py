"""Reflective samples (IBISAgent paper §3.3, "self-reflection"): turns that teach the policy to notice and undo errors.

Two kinds, both played through the environment like every other SFT episode (:mod:`ibisagent.data.sft`):

* **self-correction** — before one expert click, a plausible *wrong* click (a positive point just outside the
  structure, or a negative point inside the part already correct), its observation, then ``Undo`` and the expert
  click. The wrong turn is marked ``train: false`` (it is context, never a target of the loss); the ``Undo`` turn
  and everything after it are trained.
* **user inconsistency** — the episode starts from an initial mask of a *different structure* (another target of the
  same image, or the structure's own shape moved off it); the first turn is ``Reset``, then the expert trajectory.

A plan is a list of :class:`Turn`; the functions here edit plans and pick the wrong click or mask. Pixels are
``(x, y)`` = (column, row) in the image grid; actions carry relative coordinates (:mod:`ibisagent.protocol`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from ibisagent.clicks import Click
from ibisagent.protocol import Action

TurnKind = Literal["click", "terminate", "undo", "reset", "wrong"]

#: Largest overlap (IoU) a "different structure" mask may have with the structure asked for.
MAX_WRONG_OVERLAP = 0.05


@dataclass(frozen=True)
class Turn:
    """One planned assistant turn: its actions, its kind (what reasoning it gets), whether it is trained, and whether
    it is one of the expert trajectory's own turns (``False`` for the inserted reflective turns)."""

    actions: tuple[Action, ...]
    kind: TurnKind
    train: bool = True
    expert: bool = True


@dataclass(frozen=True)
class ReflectiveRatios:
    """Probabilities, per expert trajectory (single-target, target present), of adding a self-correction sample and
    a user-inconsistency sample (each adds one more episode; 0 = none)."""

    self_correction: float = 0.0
    inconsistency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("self_correction", "inconsistency"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"reflective ratio {name} must be in [0, 1], got {value}")

    @classmethod
    def of(cls, value: ReflectiveRatios | float | None) -> ReflectiveRatios:
        """From a ratio object, one number for both kinds, or ``None`` (none)."""
        if value is None:
            return cls()
        if isinstance(value, ReflectiveRatios):
            return value
        return cls(float(value), float(value))


def wrong_click(reference: np.ndarray, current: np.ndarray, rng: random.Random) -> Click | None:
    """A plausible wrong click for the mask ``current`` of structure ``reference`` ((H, W) bool, image grid).

    A positive click in a ring just outside the structure (a few pixels to a tenth of its size away, not already in
    the mask), or — when the mask already covers part of the structure, with probability 1/2 — a negative click well
    inside that correct part. ``None`` when neither exists.
    """
    reference = np.asarray(reference, bool)
    current = np.asarray(current, bool)
    correct = ndimage.binary_erosion(current & reference, iterations=2)
    if correct.any() and rng.random() < 0.5:
        return _pick(correct, rng, positive=False)
    size = max(1.0, float(np.sqrt(reference.sum())))
    inner = max(2, int(round(0.08 * size)))
    outer = inner + max(2, int(round(0.15 * size)))
    near = ndimage.binary_dilation(reference, iterations=outer) & ~ndimage.binary_dilation(reference,
                                                                                          iterations=inner)
    ring = near & ~current
    if not ring.any():
        return None
    return _pick(ring, rng, positive=True)


def _pick(region: np.ndarray, rng: random.Random, positive: bool) -> Click:
    ys, xs = np.nonzero(region)
    i = rng.randrange(xs.size)
    return Click(x=int(xs[i]), y=int(ys[i]), positive=positive)


def wrong_structure(reference: np.ndarray, others: Sequence[np.ndarray], rng: random.Random,
                    max_overlap: float = MAX_WRONG_OVERLAP) -> np.ndarray | None:
    """An initial mask of a different structure than ``reference`` ((H, W) bool).

    Prefers one of ``others`` (masks of other structures of the same image) that overlaps ``reference`` by at most
    ``max_overlap`` IoU; otherwise ``reference`` moved by a quarter to a half of the image so that it overlaps
    itself by at most ``max_overlap``. ``None`` when neither works.
    """
    from ibisagent.metrics import iou

    reference = np.asarray(reference, bool)
    candidates = [np.asarray(m, bool) for m in others
                  if np.shape(m) == reference.shape and np.any(m) and iou(m, reference) <= max_overlap]
    if candidates:
        return candidates[rng.randrange(len(candidates))]
    h, w = reference.shape
    shifts = [(dy, dx) for dy in (-h // 2, -h // 4, 0, h // 4, h // 2) for dx in (-w // 2, -w // 4, 0, w // 4, w // 2)
              if (dy, dx) != (0, 0)]
    rng.shuffle(shifts)
    for dy, dx in shifts:
        moved = _shift(reference, dy, dx)
        if moved.sum() >= 0.5 * reference.sum() and iou(moved, reference) <= max_overlap:
            return moved
    return None


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by (dy, dx) pixels, what leaves the image dropped (no wrap-around)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def with_self_correction(plan: Sequence[Turn], at: int, wrong: Action) -> list[Turn]:
    """``plan`` with a wrong click (``train=False``) and ``Undo`` inserted before turn ``at`` (a click turn)."""
    if not 0 <= at < len(plan) or plan[at].kind != "click":
        raise ValueError(f"self-correction must precede a click turn; turn {at} is not one")
    return [*plan[:at], Turn((wrong,), "wrong", train=False, expert=False),
            Turn((Action("undo"),), "undo", expert=False), *plan[at:]]


def with_reset(plan: Sequence[Turn]) -> list[Turn]:
    """``plan`` preceded by ``Reset`` (for an episode that starts from a mask of the wrong structure)."""
    return [Turn((Action("reset"),), "reset", expert=False), *plan]


__all__ = ["MAX_WRONG_OVERLAP", "ReflectiveRatios", "Turn", "TurnKind", "with_reset", "with_self_correction",
           "wrong_click", "wrong_structure"]
