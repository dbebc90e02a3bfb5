"""The action grammar the policy speaks: parse, format, strict-format check, repair message.

A step's text is reasoning followed by actions, or by a final answer (DESIGN §2)::

    <think>
    …reasoning…
    </think>
    <action>
    Positive Point (0.5123, 0.3012)
    Negative Point (0.2100, 0.7000) [left kidney]
    </action>

One action per line: ``Positive Point (x, y)``, ``Negative Point (x, y)``, ``Undo``, ``Reset``, ``Terminate``.
``x, y`` are relative to the image width and height, in [0, 1], written with four decimals; an optional
`` [target name]`` names the target of a click in multi-target requests. ``Terminate`` stands alone and is followed
by ``<answer>…</answer>``; a pure VQA turn is ``<think>`` + ``<answer>``. This is exactly the grammar of the released
IBISAgent-7B checkpoint.

Two readings of the same text:

* :func:`parse_response` is lenient, for running models: tags without the surrounding newlines, any case in
  action words, ``Termination`` for ``Terminate``, stray text outside the tags. Everything that is *malformed*
  still raises :class:`ProtocolError`.
* :func:`is_strict_format` is exact, for the format reward: the newline layout :func:`format_response` writes.

Pixel ↔ relative conversion uses pixel centres: ``x_rel = (x_px + 0.5) / width`` and
``x_px = min(floor(x_rel · width), width − 1)``, so four decimals round-trip exactly for images under 10 000 px.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ibisagent.clicks import Click

ActionKind = Literal["positive", "negative", "undo", "reset", "terminate"]

#: Decimals written for relative coordinates.
COORD_DECIMALS = 4

_TAGS = ("think", "action", "answer")
_CLICK_RE = re.compile(
    r"^(?P<kind>positive|negative)\s+point\s*\((?P<args>[^()]*)\)\s*(?:\[(?P<target>[^\[\]]*)\])?$",
    re.IGNORECASE,
)
_WORD_ACTIONS: dict[str, ActionKind] = {
    "undo": "undo",
    "reset": "reset",
    "terminate": "terminate",
    "termination": "terminate",
}
_WORD_NAMES: dict[ActionKind, str] = {"undo": "Undo", "reset": "Reset", "terminate": "Terminate"}


class ProtocolError(ValueError):
    """Model output that does not follow the action grammar. The message says what is wrong, for the repair prompt."""


@dataclass(frozen=True)
class Action:
    """One action. For clicks, ``x``/``y`` are relative coordinates in [0, 1] (x = horizontal)."""

    kind: ActionKind
    x: float | None = None
    y: float | None = None
    target: str | None = None

    def __post_init__(self) -> None:
        if self.kind in ("positive", "negative"):
            if self.x is None or self.y is None:
                raise ProtocolError(f"{self.kind} click needs both coordinates, got x={self.x}, y={self.y}")
            for name, value in (("x", self.x), ("y", self.y)):
                if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                    raise ProtocolError(f"click coordinate {name}={value} is outside [0, 1]")
        elif self.kind in _WORD_NAMES:
            if self.x is not None or self.y is not None or self.target is not None:
                raise ProtocolError(f"{_WORD_NAMES[self.kind]} takes no coordinates or target")
        else:
            raise ProtocolError(f"unknown action kind {self.kind!r}")

    @property
    def is_click(self) -> bool:
        return self.kind in ("positive", "negative")

    def to_click(self, width: int, height: int) -> Click:
        """This click in pixels of a ``width`` × ``height`` image."""
        if not self.is_click:
            raise ValueError(f"{self.kind} is not a click")
        assert self.x is not None and self.y is not None
        px, py = to_pixel(self.x, self.y, width, height)
        return Click(x=px, y=py, positive=self.kind == "positive")

    @classmethod
    def from_click(cls, click: Click, width: int, height: int, target: str | None = None) -> Action:
        """The relative-coordinate action for a pixel click."""
        x, y = to_relative(click.x, click.y, width, height)
        return cls("positive" if click.positive else "negative", x, y, target)


@dataclass(frozen=True)
class Response:
    """A parsed model turn: reasoning, the actions in order, and the final answer (``None`` when not given)."""

    think: str
    actions: tuple[Action, ...] = field(default_factory=tuple)
    answer: str | None = None

    @property
    def terminates(self) -> bool:
        return any(a.kind == "terminate" for a in self.actions) or (not self.actions and self.answer is not None)

    @property
    def clicks(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.is_click)


def to_relative(x_px: int, y_px: int, width: int, height: int) -> tuple[float, float]:
    """Pixel ``(x, y)`` → relative ``(x, y)`` at the pixel centre, rounded to :data:`COORD_DECIMALS`."""
    if not (0 <= x_px < width and 0 <= y_px < height):
        raise ValueError(f"pixel ({x_px}, {y_px}) is outside the {width}x{height} image")
    return round((x_px + 0.5) / width, COORD_DECIMALS), round((y_px + 0.5) / height, COORD_DECIMALS)


def to_pixel(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """Relative ``(x, y)`` in [0, 1] → the pixel ``(x, y)`` containing it (1.0 maps to the last pixel)."""
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise ValueError(f"relative point ({x}, {y}) is outside [0, 1]")
    return min(int(math.floor(x * width)), width - 1), min(int(math.floor(y * height)), height - 1)


def parse_action_line(line: str) -> Action:
    """One line of an ``<action>`` block → :class:`Action`; raises :class:`ProtocolError` naming the line."""
    text = line.strip()
    word = _WORD_ACTIONS.get(text.rstrip(".").lower())
    if word is not None:
        return Action(word)
    match = _CLICK_RE.match(text)
    if match is None:
        raise ProtocolError(
            f"unknown action {text!r}; expected 'Positive Point (x, y)', 'Negative Point (x, y)', 'Undo', 'Reset' "
            "or 'Terminate'"
        )
    parts = [p.strip() for p in match["args"].split(",")]
    if len(parts) != 2 or not all(parts):
        raise ProtocolError(f"click {text!r} needs exactly two coordinates (x, y)")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise ProtocolError(f"click {text!r} has a coordinate that is not a number") from None
    target = match["target"].strip() if match["target"] is not None else None
    return Action(match["kind"].lower(), x, y, target or None)  # type: ignore[arg-type]


def parse_response(text: str) -> Response:
    """Parse a model turn leniently (see the module docstring). Raises :class:`ProtocolError` when malformed.

    Malformed means: not a string; no ``<think>`` block; a tag opened and not closed (or closed and not opened) or
    given twice; neither ``<action>`` nor ``<answer>``; an empty or unknown action; a click without both
    coordinates or outside [0, 1]; ``Terminate`` mixed with other actions; an answer after non-final actions.
    """
    if not isinstance(text, str):
        raise ProtocolError(f"model output must be text, got {type(text).__name__}")
    blocks = {tag: _extract(text, tag) for tag in _TAGS}
    think, action_block, answer = blocks["think"], blocks["action"], blocks["answer"]
    if think is None:
        raise ProtocolError("missing <think>…</think> block")
    if action_block is None and answer is None:
        raise ProtocolError("missing <action>…</action> (or <answer>…</answer> for a final answer)")
    actions: tuple[Action, ...] = ()
    if action_block is not None:
        lines = [ln for ln in action_block.splitlines() if ln.strip()]
        if not lines:
            raise ProtocolError("empty <action> block")
        actions = tuple(parse_action_line(ln) for ln in lines)
        kinds = [a.kind for a in actions]
        if "terminate" in kinds and len(kinds) > 1:
            raise ProtocolError(f"Terminate must stand alone in <action>, got {len(kinds)} actions")
        if answer is not None and kinds != ["terminate"]:
            raise ProtocolError("<answer> may only follow Terminate (or stand alone without <action>)")
    return Response(think=think.strip(), actions=actions, answer=answer.strip() if answer is not None else None)


def format_action(action: Action) -> str:
    """The canonical text of one action line."""
    if action.kind in _WORD_NAMES:
        return _WORD_NAMES[action.kind]
    word = "Positive" if action.kind == "positive" else "Negative"
    suffix = f" [{action.target}]" if action.target else ""
    return f"{word} Point ({action.x:.{COORD_DECIMALS}f}, {action.y:.{COORD_DECIMALS}f}){suffix}"


def format_response(response: Response) -> str:
    """The canonical text of a turn, in the released checkpoint's exact newline layout (inverse of parsing)."""
    parts = [f"<think>\n{response.think}\n</think>"]
    if response.actions:
        body = "\n".join(format_action(a) for a in response.actions)
        parts.append(f"<action>\n{body}\n</action>")
    if response.answer is not None:
        parts.append(f"<answer>\n{response.answer}\n</answer>")
    return "\n".join(parts)


def is_strict_format(text: str) -> bool:
    """Whether ``text`` is well formed *and* laid out exactly as :func:`format_response` writes it.

    Used by the format reward: ``Termination``, missing newlines, lower-case action words, text outside the tags
    or a ``Terminate`` without an answer all fail here although :func:`parse_response` accepts them.
    """
    try:
        response = parse_response(text)
    except ProtocolError:
        return False
    if any(a.kind == "terminate" for a in response.actions) and response.answer is None:
        return False
    return format_response(response) == text


def repair_message(error: ProtocolError | str) -> str:
    """The user-turn text sent back to a model after malformed output (one repair retry)."""
    return (
        f"Your previous reply could not be used: {error}. Reply again in exactly this format: "
        "<think>\\nyour reasoning\\n</think>\\n<action>\\nPositive Point (x, y)\\n</action> with x and y in [0, 1] "
        "relative to the image width and height (four decimals), one action per line (Positive Point, Negative Point, "
        "Undo, Reset or Terminate); after Terminate add <answer>\\nyour answer\\n</answer>."
    )


def _extract(text: str, tag: str) -> str | None:
    opens = [m.end() for m in re.finditer(rf"<{tag}>", text)]
    closes = [m.start() for m in re.finditer(rf"</{tag}>", text)]
    if not opens and not closes:
        return None
    if len(opens) != 1 or len(closes) != 1:
        if len(opens) > len(closes):
            raise ProtocolError(f"<{tag}> is not closed")
        if len(closes) > len(opens):
            raise ProtocolError(f"</{tag}> has no opening <{tag}>")
        raise ProtocolError(f"<{tag}> appears {len(opens)} times; expected once")
    if closes[0] < opens[0]:
        raise ProtocolError(f"</{tag}> comes before <{tag}>")
    body = text[opens[0] : closes[0]]
    for other in _TAGS:
        if f"<{other}>" in body or f"</{other}>" in body:
            raise ProtocolError(f"<{other}> is nested inside <{tag}>")
    return body


# ---------------------------------------------------------------------------------------------------- target names

#: Target names are kept this short (they label masks, DICOM-SEG segments and action suffixes).
TARGET_NAME_MAX = 48

_LEADING_VERB = re.compile(
    r"^\s*(?:please\s+)?(?:(?:segment|delineate|outline|contour|find|mark|show|label|highlight)\b)?\s*"
    r"(?:(?:the|an|a|all)\b)?\s*",
    re.IGNORECASE,
)


def target_name(instruction: str) -> str:
    """A short target name from an instruction: ``"Segment the left kidney."`` → ``"left kidney"``.

    Leading request words (please, segment, delineate, outline, …) and an article are dropped, trailing punctuation
    removed, the rest cut to :data:`TARGET_NAME_MAX` characters; ``"target"`` when nothing is left. Square brackets
    and line breaks (which the action grammar reserves) become spaces.
    """
    name = _LEADING_VERB.sub("", instruction).strip().rstrip(".!?;:").strip()
    name = re.sub(r"[\[\]\s]+", " ", name).strip()[:TARGET_NAME_MAX].strip()
    return name or "target"


def target_names(instruction: str, given: Sequence[str] | None = None) -> tuple[str, ...]:
    """The targets of a request: the names ``given`` (blank ones dropped), else one derived by :func:`target_name`.

    The one rule for the command line (``segment --target``) and the app (the request's ``target``)."""
    names = tuple(n.strip() for n in (given or ()) if n and n.strip())
    return names or (target_name(instruction),)
