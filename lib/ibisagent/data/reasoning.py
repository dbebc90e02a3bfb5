"""Reasoning text for each step: an offline geometric writer, a teacher model, and the leak filter both pass.

The IBISAgent paper (§3.3, "reasoning generation") gives every expert step a ``<think>`` text that explains the
action from what the agent can see. Two writers, one filter:

* :func:`write_think` — offline, no model: where the target lies (image position, and for CT/MR the patient side and
  anterior/posterior in the radiological convention), how large it is, and which side the current mask misses or
  spills over, in directional words; several phrasings drawn with a seeded :class:`random.Random`.
* :class:`Teacher` — any OpenAI-compatible endpoint, through the project's :class:`ibisagent.policies.openai.
  OpenAIPolicy` (no second client). It is shown the *oracle view* (:func:`oracle_view`: the correct part of the mask
  green, over-segmentation red, missed part blue, the correct next click as a white cross) and the *agent view* (the
  overlay the policy sees), is told the correct next action, and must write as if it saw only the agent view.
  Replies that fail :func:`leaks` are retried with another seed, then dropped and counted. Replies are cached on disk
  (one JSON file per request, keyed by model, messages, images and decoding settings), and calls are rate-limited.
  A down endpoint raises :class:`TeacherUnavailable` after the client's retries; what was cached stays reusable.
* :func:`leaks` — the reasons a text would leak the oracle view: its colour words, "ground truth", TP/FP/FN,
  "oracle", "the correct action is", IoU/Dice figures and the like.

Coordinates: masks are ``(H, W)`` bool arrays indexed ``mask[y, x]``; relative positions are ``x / W``, ``y / H`` in
[0, 1] with the origin at the top-left corner (the action grammar's convention).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ibisagent.fileio import atomic_write_text
from ibisagent.policies.base import GenerationOptions, Policy, PolicyError, PolicyRequest
from ibisagent.protocol import Action, format_action

log = logging.getLogger(__name__)

#: Oracle-view colours (RGB): correct part, over-segmentation, missed part, the correct next click.
ORACLE_TP = (0, 200, 0)
ORACLE_FP = (230, 0, 0)
ORACLE_FN = (0, 90, 255)
ORACLE_CLICK = (255, 255, 255)
ORACLE_ALPHA = 0.5

#: Modalities whose images are read in the radiological convention (patient's right on the image left, anterior up).
RADIOLOGICAL = frozenset({"ct", "mr", "mri", "pet"})

# ----------------------------------------------------------------------------------------------------- leak filter

#: What a reasoning text must never contain (case-insensitive unless noted): the oracle view and its vocabulary.
LEAK_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, flags)) for name, pattern, flags in (
        ("oracle colour", r"\b(?:green|red|blue|reddish|bluish|greenish)\b", re.IGNORECASE),
        ("ground truth", r"\bground[\s-]*truth\b|\bgt\b", re.IGNORECASE),
        ("TP/FP/FN", r"\b(?:TP|FP|FN|TN)s?\b", 0),
        ("true/false positive/negative", r"\b(?:true|false)[\s-]+(?:positive|negative)s?\b", re.IGNORECASE),
        ("oracle", r"\boracle\b", re.IGNORECASE),
        ("the correct action", r"\b(?:the\s+)?(?:correct|right|expected|optimal|best)\s+(?:next\s+)?"
         r"(?:action|click|point|answer|move)\s+(?:is|was|would\s+be)\b", re.IGNORECASE),
        ("reference/annotation", r"\b(?:reference|target|gold(?:[\s-]+standard)?|expert)\s+(?:mask|annotation|"
         r"segmentation|label)s?\b|\bannotat(?:ion|ed|or)s?\b", re.IGNORECASE),
        ("score", r"\b(?:iou|dice|jaccard)\b", re.IGNORECASE),
        ("second view", r"\b(?:first|second|other|colou?r[\s-]*coded|coloured|colored)\s+(?:image|view|picture|"
         r"overlay)\b|\bagent\s+view\b|\bhint\b|\bi\s+was\s+told\b", re.IGNORECASE),
    )
)


def leaks(text: str) -> list[str]:
    """The names of the :data:`LEAK_PATTERNS` that ``text`` matches (empty list: the text is clean)."""
    return [name for name, pattern in LEAK_PATTERNS if pattern.search(text)]


# ------------------------------------------------------------------------------------------ geometry in words


@dataclass(frozen=True)
class Region:
    """A mask summarised: ``cx``, ``cy`` relative centroid, ``x0, y0, x1, y1`` relative bounding box, ``area``
    fraction of the image; ``None`` fields never occur (empty masks have no :class:`Region`)."""

    cx: float
    cy: float
    x0: float
    y0: float
    x1: float
    y1: float
    area: float


def region(mask: np.ndarray) -> Region | None:
    """Summarise an (H, W) bool mask; ``None`` when it is empty."""
    mask = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    h, w = mask.shape
    return Region(cx=(xs.mean() + 0.5) / w, cy=(ys.mean() + 0.5) / h, x0=xs.min() / w, y0=ys.min() / h,
                  x1=(xs.max() + 1) / w, y1=(ys.max() + 1) / h, area=xs.size / (h * w))


def position_words(x: float, y: float) -> str:
    """Relative ``(x, y)`` → "the upper left", "the centre", "the lower middle part" … of the image."""
    horizontal = "left" if x < 0.38 else "right" if x > 0.62 else ""
    vertical = "upper" if y < 0.38 else "lower" if y > 0.62 else ""
    if not horizontal and not vertical:
        return "the centre"
    if not vertical:
        return f"the {horizontal} part"
    if not horizontal:
        return f"the {vertical} middle"
    return f"the {vertical} {horizontal}"


def anatomical_words(x: float, y: float) -> str:
    """Relative ``(x, y)`` on an axial CT/MR view in the radiological convention → "the patient's right, anterior"
    (image left = patient's right, image top = anterior); "" near the centre."""
    side = "the patient's right" if x < 0.42 else "the patient's left" if x > 0.58 else ""
    depth = "anterior" if y < 0.42 else "posterior" if y > 0.58 else ""
    return ", ".join(p for p in (side, depth) if p)


def size_words(area: float) -> str:
    """Area fraction of the image → "tiny", "small", "medium-sized", "large"."""
    return "tiny" if area < 0.003 else "small" if area < 0.03 else "medium-sized" if area < 0.12 else "large"


def direction_words(dx: float, dy: float) -> str:
    """A relative displacement (image axes, y down) → the side it points to: "right", "upper", "lower left" …"""
    if abs(dx) < 1e-9 and abs(dy) < 1e-9:
        return "inner"
    horizontal = "right" if dx > 0 else "left"
    vertical = "lower" if dy > 0 else "upper"
    if abs(dx) > 2 * abs(dy):
        return horizontal
    if abs(dy) > 2 * abs(dx):
        return vertical
    return f"{vertical} {horizontal}"


def _where(reg: Region, modality: str) -> str:
    text = f"in {position_words(reg.cx, reg.cy)} of the image"
    if modality.strip().casefold() in RADIOLOGICAL:
        anatomy = anatomical_words(reg.cx, reg.cy)
        if anatomy:
            text += f" ({anatomy})"
    return text


# ------------------------------------------------------------------------------------------ the offline writer

_FIRST = (
    "The {target} is a {size} structure {where}. No mask is drawn yet, so I start with a positive point well inside it "
    "at ({x:.2f}, {y:.2f}).",
    "I can see the {target} {where}; it is {size}. Nothing is segmented yet: a first positive point near its middle, "
    "at ({x:.2f}, {y:.2f}).",
    "Looking for the {target}: it lies {where} and is {size}. I place the first point inside it at ({x:.2f}, {y:.2f}).",
)
_MISS = (
    "The mask covers only part of the {target}; the part it misses lies on its {direction} side, around "
    "({x:.2f}, {y:.2f}), so I add a positive point there.",
    "Part of the {target} {where_click} is still outside the mask, on its {direction} side. A positive point at "
    "({x:.2f}, {y:.2f}) should bring it in.",
    "The current mask stops short of the {target}'s {direction} edge; the missed tissue is centred near "
    "({x:.2f}, {y:.2f}). Adding a positive point.",
)
_SPILL = (
    "The mask spills beyond the {target} on its {direction} side, into tissue that does not belong to it around "
    "({x:.2f}, {y:.2f}); a negative point there removes it.",
    "The mask has leaked past the {direction} edge of the {target}, covering neighbouring tissue near ({x:.2f}, {y:.2f}). "
    "I place a negative point to cut it back.",
    "Some of the mask {where_click} lies outside the {target}. A negative point at ({x:.2f}, {y:.2f}) takes that "
    "region out.",
)
_DONE = (
    "The mask now follows the {target}'s boundary {where}; I see nothing left to add or remove.",
    "The {target} is covered from edge to edge and the mask stays inside it, so the segmentation is finished.",
    "The outline matches the {target} well, with no missed parts or leaks I could fix with another point.",
)
_ABSENT = (
    "I look through the image for the {target} and find no such structure anywhere, so there is nothing to segment.",
    "Nothing in this image looks like the {target}; I place no points and leave the mask empty.",
    "The {target} is not visible in this image; the right result is an empty mask.",
)
_UNDO = (
    "The last point made the mask worse: it now covers tissue on the {direction} side that is not the {target}. I undo that step.",
    "After the previous step the mask looks wrong on its {direction} side; that point did not help, so I take it back.",
    "That last step moved the mask away from the {target}. Undo, then try a better point.",
)
_UNDO_LOSS = (
    "The last point cut away part of the {target} itself, on the {direction} side; that was a mistake, so I undo it.",
    "After the previous step a piece of the {target} on the {direction} side dropped out of the mask. I take that step back.",
)
_RESET = (
    "The mask that is drawn does not lie on the {target}: it covers a different structure {where_mask}, while the "
    "{target} is {where}. I discard it and start from an empty mask.",
    "The existing outline is on the wrong structure ({where_mask}); the {target} lies {where}. Reset and start over.",
    "This mask does not match the request: the {target} is {where}, but the mask sits {where_mask}. I reset it.",
)


def _t(rng: random.Random, options: Sequence[str], **values: object) -> str:
    return rng.choice(options).format(**values)


def click_think(action: Action, reference: np.ndarray | None, current: np.ndarray, target: str, modality: str,
                rng: random.Random) -> str:
    """The ``<think>`` sentence for one click.

    Args:
        action: the click (relative coordinates).
        reference: (H, W) bool, the structure the trajectory ends on (where the target lies), or ``None``.
        current: (H, W) bool, the mask before the click (same grid).
        target: the target name.
        modality: manifest modality (anatomical words for CT/MR/PET).
        rng: seeded generator choosing the phrasing.
    """
    assert action.x is not None and action.y is not None
    x, y = float(action.x), float(action.y)
    ref = region(reference) if reference is not None else None
    cur = region(current)
    where_click = f"in {position_words(x, y)} of the image"
    if cur is None:
        where = _where(ref, modality) if ref is not None else where_click
        size = size_words(ref.area) if ref is not None else "visible"
        return _t(rng, _FIRST, target=target, where=where, size=size, x=x, y=y)
    direction = direction_words(x - cur.cx, y - cur.cy)
    table = _MISS if action.kind == "positive" else _SPILL
    return _t(rng, table, target=target, direction=direction, where_click=where_click, x=x, y=y)


def done_think(reference: np.ndarray | None, target: str, modality: str, rng: random.Random) -> str:
    """The ``<think>`` of a finished target (present: the mask fits; absent: nothing to segment)."""
    ref = region(reference) if reference is not None else None
    if ref is None:
        return _t(rng, _ABSENT, target=target)
    return _t(rng, _DONE, target=target, where=_where(ref, modality))


def undo_think(before: np.ndarray, after: np.ndarray, target: str, rng: random.Random) -> str:
    """The ``<think>`` of an ``Undo`` after a wrong step that turned mask ``before`` into ``after`` ((H, W) bool)."""
    gained = after & ~before
    lost = before & ~after
    cur = region(before) or region(after)
    changed = region(gained if gained.sum() >= lost.sum() else lost)
    direction = "outer"
    if changed is not None and cur is not None:
        direction = direction_words(changed.cx - cur.cx, changed.cy - cur.cy)
    table = _UNDO if gained.sum() >= lost.sum() else _UNDO_LOSS
    return _t(rng, table, target=target, direction=direction)


def reset_think(wrong: np.ndarray, reference: np.ndarray | None, target: str, modality: str,
                rng: random.Random) -> str:
    """The ``<think>`` of a ``Reset`` when the given mask ``wrong`` lies on another structure."""
    w = region(wrong)
    ref = region(reference) if reference is not None else None
    where_mask = _where(w, modality) if w is not None else "elsewhere"
    where = _where(ref, modality) if ref is not None else "not where the mask is"
    return _t(rng, _RESET, target=target, where=where, where_mask=where_mask)


def write_think(actions: Sequence[Action], references: Mapping[str, np.ndarray | None],
                currents: Mapping[str, np.ndarray], targets: Sequence[str], modality: str,
                rng: random.Random) -> str:
    """The offline ``<think>`` of a click step or a ``Terminate`` step over one or several targets.

    Args:
        actions: the step's actions (clicks with `` [target]`` suffixes when several targets, or ``Terminate``).
        references: target name → (H, W) bool mask the trajectory ends on (``None`` or empty = absent).
        currents: target name → (H, W) bool mask before the step (same grid as ``references``).
        targets: target names in request order.
        modality: manifest modality.
        rng: seeded generator.

    Raises:
        ValueError: an action kind this writer has no sentence for (``Undo``/``Reset``: use :func:`undo_think` /
            :func:`reset_think`).
    """
    sentences: list[str] = []
    if any(a.kind == "terminate" for a in actions):
        for name in targets:
            sentences.append(done_think(references.get(name), name, modality, rng))
        return " ".join(sentences)
    for action in actions:
        if not action.is_click:
            raise ValueError(f"write_think writes clicks and Terminate, not {format_action(action)}")
        name = action.target if action.target is not None else targets[0]
        sentences.append(click_think(action, references.get(name), currents[name], name, modality, rng))
    return " ".join(sentences)


# -------------------------------------------------------------------------------------------- the oracle view


def _blend(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float) -> None:
    rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * np.asarray(colour, dtype=np.float32)


def oracle_view(image: np.ndarray, current: np.ndarray, reference: np.ndarray,
                click: tuple[float, float] | None = None) -> np.ndarray:
    """The teacher's picture: correct part of the mask green, over-segmentation red, missed part blue, and the correct
    next click as a white cross.

    Args:
        image: (H, W, 3) uint8, the agent's image (policy grid).
        current: (H, W) bool, the current mask.
        reference: (H, W) bool, the structure asked for.
        click: the correct next click as relative ``(x, y)``, or ``None``.

    Returns:
        (H, W, 3) uint8; the input is not modified.
    """
    out = np.asarray(image, dtype=np.float32).copy()
    current, reference = np.asarray(current, bool), np.asarray(reference, bool)
    if current.shape != out.shape[:2] or reference.shape != out.shape[:2]:
        raise ValueError(f"mask shapes {current.shape}, {reference.shape} != image shape {out.shape[:2]}")
    _blend(out, current & reference, ORACLE_TP, ORACLE_ALPHA)
    _blend(out, current & ~reference, ORACLE_FP, ORACLE_ALPHA)
    _blend(out, reference & ~current, ORACLE_FN, ORACLE_ALPHA)
    picture = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if click is not None:
        h, w = picture.shape[:2]
        cx, cy = min(int(click[0] * w), w - 1), min(int(click[1] * h), h - 1)
        arm = max(2, min(h, w) // 40)
        picture[max(0, cy - arm):cy + arm + 1, cx] = ORACLE_CLICK
        picture[cy, max(0, cx - arm):cx + arm + 1] = ORACLE_CLICK
    return picture


# ----------------------------------------------------------------------------------------------- the teacher

TEACHER_SYSTEM = """You write the private reasoning of a segmentation agent that places points on a medical image \
for an interactive segmentation tool. You are shown two pictures. Picture A is for you only: it colours the current \
mask against the true structure and marks the correct next point. Picture B is what the agent sees: the image with \
its current mask overlaid. You are also told the next action. Write two or three sentences of reasoning that lead to \
that action, as the agent would think while looking only at Picture B: where the structure lies, how large it is, \
which side the current mask misses or spills over, in anatomical and directional words. Never mention colours, \
Picture A, a reference, a hint, scores, or that the action was given to you. Reply with the reasoning text only."""


class TeacherUnavailable(RuntimeError):
    """The teacher endpoint did not answer after its retries; finished calls are in the cache."""


class RateLimiter:
    """At most ``per_second`` calls per second across threads (a minimum interval between call starts)."""

    def __init__(self, per_second: float | None) -> None:
        if per_second is not None and per_second <= 0:
            raise ValueError(f"rate limit must be positive calls per second or None, got {per_second}")
        self.interval = 0.0 if per_second is None else 1.0 / per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until the next call may start."""
        if self.interval <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


@dataclass
class TeacherStats:
    """Counters of one teacher: requests sent, answered from cache, replies rejected by the leak filter (with the
    reasons), and steps dropped after every retry was rejected."""

    calls: int = 0
    cache_hits: int = 0
    rejected: int = 0
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"calls": self.calls, "cache_hits": self.cache_hits, "rejected": self.rejected,
                "dropped": self.dropped, "reasons": dict(sorted(self.reasons.items()))}


def _image_digest(image: np.ndarray) -> str:
    arr = np.ascontiguousarray(image)
    return hashlib.sha256(f"{arr.shape}{arr.dtype}".encode() + arr.tobytes()).hexdigest()


def _clean_reply(text: str) -> str:
    text = re.sub(r"</?think>", "", text).strip()
    return re.sub(r"\s+", " ", text)


class Teacher:
    """Reasoning from a teacher model behind an OpenAI-compatible endpoint (or any :class:`Policy`).

    Args:
        policy: the client, normally ``OpenAIPolicy(url, model)`` (:func:`ibisagent.policies.load_policy` with an
            ``openai:URL#MODEL`` spec).
        cache_dir: folder of cached replies (one ``<sha256>.json`` per request); reused across runs and machines.
        retries: extra requests (with a new seed) after a reply the leak filter rejects or that is empty.
        per_second: rate limit on requests actually sent (cache hits are free); ``None`` = unlimited.
        options: decoding settings; ``seed`` is set per attempt (attempt k uses ``seed + k``).
        min_chars: replies shorter than this count as empty.
    """

    def __init__(self, policy: Policy, cache_dir: str | Path, *, retries: int = 2, per_second: float | None = 2.0,
                 options: GenerationOptions | None = None, min_chars: int = 20) -> None:
        self.policy = policy
        self.model = str(getattr(policy, "model", "") or policy.name)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.retries = max(0, int(retries))
        self.limiter = RateLimiter(per_second)
        self.options = options or GenerationOptions(max_new_tokens=160, temperature=0.7, seed=0)
        self.min_chars = min_chars
        self.stats = TeacherStats()
        self._lock = threading.Lock()

    def messages(self, oracle: np.ndarray, agent: np.ndarray, instruction: str, action_text: str,
                 draft: str) -> list[dict[str, object]]:
        """The conversation sent for one step (system prompt, then both pictures and the task)."""
        text = (f"Request: {instruction}\nNext action: {action_text}\nA plain draft of the reasoning, for facts only "
                f"(improve the wording): {draft}")
        return [
            {"role": "system", "content": [{"type": "text", "text": TEACHER_SYSTEM}]},
            {"role": "user", "content": [{"type": "text", "text": "Picture A:"}, {"type": "image", "image": oracle},
                                         {"type": "text", "text": "Picture B:"}, {"type": "image", "image": agent},
                                         {"type": "text", "text": text}]},
        ]

    def _key(self, messages: list[dict[str, object]], options: GenerationOptions) -> str:
        parts = []
        for message in messages:
            content = []
            for part in message["content"]:  # type: ignore[union-attr]
                if part.get("type") == "image":  # type: ignore[union-attr]
                    content.append({"image": _image_digest(part["image"])})  # type: ignore[index]
                else:
                    content.append(part)
            parts.append({"role": message["role"], "content": content})
        payload = json.dumps({"model": self.model, "messages": parts, "options": options.__dict__}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _ask(self, messages: list[dict[str, object]], options: GenerationOptions) -> str:
        key = self._key(messages, options)
        path = self.cache_dir / f"{key}.json"
        if path.is_file():
            try:
                text = json.loads(path.read_text(encoding="utf-8"))["text"]
                with self._lock:
                    self.stats.cache_hits += 1
                return str(text)
            except (ValueError, KeyError, OSError):
                log.warning("teacher cache entry %s is unreadable; asking again", path)
        self.limiter.wait()
        try:
            generation = self.policy.generate([PolicyRequest(messages=messages)], options)[0]
        except PolicyError as exc:
            raise TeacherUnavailable(
                f"the teacher endpoint failed ({exc}); finished replies are cached in {self.cache_dir} and are "
                "reused when the run is started again") from exc
        with self._lock:
            self.stats.calls += 1
        atomic_write_text(path, json.dumps({"model": self.model, "text": generation.text}) + "\n")
        return generation.text

    def write(self, oracle: np.ndarray, agent: np.ndarray, instruction: str, action_text: str,
              draft: str) -> str | None:
        """A clean reasoning text for one step, or ``None`` when every attempt was rejected (counted in
        :attr:`stats`).

        Args:
            oracle: (H, W, 3) uint8, :func:`oracle_view` of the step.
            agent: (H, W, 3) uint8, the overlay the agent sees.
            instruction: the user's request.
            action_text: the step's action lines (what the reasoning must lead to).
            draft: the offline writer's text for the step (facts the teacher may reword).

        Raises:
            TeacherUnavailable: the endpoint is down or failing after the client's retries.
        """
        messages = self.messages(oracle, agent, instruction, action_text, draft)
        base_seed = self.options.seed or 0
        for attempt in range(self.retries + 1):
            options = GenerationOptions(max_new_tokens=self.options.max_new_tokens,
                                        temperature=self.options.temperature, top_p=self.options.top_p,
                                        seed=base_seed + attempt)
            text = _clean_reply(self._ask(messages, options))
            found = leaks(text)
            if len(text) < self.min_chars:
                found = [*found, "empty"]
            if not found:
                return text
            with self._lock:
                self.stats.rejected += 1
                for reason in found:
                    self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
        with self._lock:
            self.stats.dropped += 1
        return None


__all__ = [
    "LEAK_PATTERNS", "RateLimiter", "Region", "TEACHER_SYSTEM", "Teacher", "TeacherStats", "TeacherUnavailable",
    "anatomical_words", "click_think", "direction_words", "done_think", "leaks", "oracle_view", "position_words",
    "region", "reset_think", "size_words", "undo_think", "write_think",
]
