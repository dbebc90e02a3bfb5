"""The oracle policy: the click simulator (:mod:`ibisagent.clicks`) speaking the action grammar.

It needs the ground truth, so it is a reference (what a perfect clicker achieves with a given tool) and a source of
training trajectories, not a product policy. Each turn it reads the agent's :class:`Observation` (current masks in
the policy grid) and writes, through :func:`ibisagent.protocol.format_response` (so the text passes
:func:`~ibisagent.protocol.is_strict_format`):

* one click per unfinished target at the simulator's next click (`` [target]`` suffixes when there are several
  targets), with a geometric ``<think>`` sentence per click; or
* ``Reset`` when every drawn mask misses its target entirely (an initial mask that contradicts the instruction); or
* ``Terminate`` + ``<answer>`` (target names; "not present" for absent targets) once every target has reached
  ``iou_stop`` or has no error left that a click could fix.

With ``anchors`` (target name → relative ``(x, y)``, :func:`ibisagent.clicks.click_anchor` over a training set, or
→ the target's appearance modes, :func:`ibisagent.clicks.anchor_modes`, of which the one the observed image is
nearest gives the anchor) the expert's clicks of those targets are anchored (:func:`ibisagent.clicks.next_click`):
the first click of a target only (``anchor_clicks="first"``) or every click (``"all"``).

Clicks already made (the observation's clicks of the current state, and those written in earlier assistant turns of
the conversation in history mode ``full``) are not repeated.

The oracle is the simulated expert of the training data: ``ibisagent simulate``, radiologist corrections and the SFT
builder run it through the environment (:mod:`ibisagent.env`) like any other policy, so its recorded turns are
exactly the turns a trained policy is expected to write. Its texts mention only what the overlay shows (no IoU or
other number computed from the hidden ground truth).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ibisagent.clicks import (
    ANCHOR_CLICK_CHOICES,
    Anchor,
    AnchorClicks,
    AnchorMode,
    Click,
    ErrorRule,
    nearest_mode,
    next_click,
)
from ibisagent.metrics import iou
from ibisagent.observation import resize_mask
from ibisagent.policies.base import (
    Conversation,
    Generation,
    GenerationOptions,
    Observation,
    Policy,
    PolicyError,
    PolicyRequest,
)
from ibisagent.protocol import Action, ProtocolError, Response, format_response, parse_response

#: Default IoU at which the oracle terminates (the NoC@90 protocol).
DEFAULT_ORACLE_IOU_STOP = 0.9
#: Answer text for a target that is not in the image.
ABSENT_ANSWER = "not present"


#: Below this IoU the oracle's reasoning calls the mask rough rather than close.
COARSE_IOU = 0.7


def click_sentence(action: Action, before_iou: float, target: str | None = None) -> str:
    """Why the click ``action`` (relative coordinates) is placed: the error region it fixes and where it lies.

    The sentence describes only what the overlay shows (how much of the target is covered, in words): a number such
    as the IoU with the hidden ground truth would teach a model trained on these texts to invent it.
    """
    where = f"({action.x:.2f}, {action.y:.2f})"
    subject = f"the {target}" if target else "the target"
    if before_iou <= 0.0:
        state = f"There is no mask on {subject} yet"
    elif before_iou < COARSE_IOU:
        state = f"The mask covers {subject} only roughly"
    else:
        state = f"The mask is close to {subject}"
    if action.kind == "positive":
        return f"{state}; the largest missed part is centred near {where}, so I add a positive point there."
    return (f"{state}, but it spills outside; the largest wrongly included part is centred near {where}, so I add a "
            "negative point there.")


class OraclePolicy(Policy):
    """Clicks where the simulated expert would, from the ground truth.

    Args:
        ground_truth: target name → (H, W) bool mask (``None`` or empty = absent), in the original grid or the
            policy grid (resized to the observation's grid with nearest-neighbour sampling when they differ).
        rule: error-region rule of :func:`ibisagent.clicks.next_click` (``"peak"`` or ``"area"``).
        iou_stop: a target counts as done at this IoU.
        anchors: target name (case-insensitive) → relative ``(x, y)`` anchor of its clicks, or its
            :class:`~ibisagent.clicks.AnchorMode` list (see the module docstring); targets without one click at the
            deepest point.
        anchor_clicks: ``"first"`` (a target's first click only) or ``"all"``.
    """

    name = "oracle"

    def __init__(self, ground_truth: Mapping[str, np.ndarray | None], rule: ErrorRule = "peak",
                 iou_stop: float = DEFAULT_ORACLE_IOU_STOP,
                 anchors: Mapping[str, Anchor] | None = None,
                 anchor_clicks: AnchorClicks = "first") -> None:
        if rule not in ("peak", "area"):
            raise ValueError(f"unknown click rule {rule!r}; expected 'peak' or 'area'")
        if anchor_clicks not in ANCHOR_CLICK_CHOICES:
            raise ValueError(f"anchor_clicks must be 'first' or 'all', got {anchor_clicks!r}")
        if not 0.0 < iou_stop <= 1.0:
            raise ValueError(f"iou_stop must be in (0, 1], got {iou_stop}")
        truth: dict[str, np.ndarray | None] = {}
        for name, mask in ground_truth.items():
            if mask is None:
                truth[name] = None
                continue
            array = np.array(mask, dtype=bool)
            if array.ndim != 2:
                raise ValueError(f"ground truth of {name!r} must be a 2D (H, W) mask, got shape {array.shape}")
            array.flags.writeable = False
            truth[name] = array
        self._truth = truth
        self.rule: ErrorRule = rule
        self.iou_stop = iou_stop
        self.anchors = {name.casefold(): _anchor_value(name, value) for name, value in (anchors or {}).items()}
        self.anchor_clicks = anchor_clicks

    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        """One turn per request; ``PolicyError`` when a request has no observation or names an unknown target."""
        return [Generation(text=self.respond(request)) for request in requests]

    def respond(self, request: PolicyRequest) -> str:
        """The turn text for one request (see the module docstring)."""
        obs = request.observation
        if obs is None:
            raise PolicyError("oracle policy needs the agent's observation (current masks) in each request")
        truths = {name: self._truth_in_grid(name, obs.image.shape[:2]) for name in obs.targets}
        multi = len(obs.targets) > 1
        earlier = _earlier_clicks(request.messages, obs)
        for name, clicks in obs.clicks.items():  # the state's clicks (history off shows no earlier turns)
            earlier.setdefault(name, []).extend(clicks)
        h, w = obs.image.shape[:2]
        drawn = [name for name in obs.targets if obs.masks[name].any()]
        if drawn and all(iou(obs.masks[name], truths[name]) == 0.0 for name in drawn) and obs.step == 0:
            think = ("The mask drawn so far does not overlap the structure that was asked for at all, so I discard "
                     "it and start again from an empty mask.")
            return format_response(Response(think=think, actions=(Action("reset"),)))
        sentences: list[str] = []
        actions: list[Action] = []
        for name in obs.targets:
            mask, truth = obs.masks[name], truths[name]
            score = iou(mask, truth)
            if score >= self.iou_stop:
                continue
            click = next_click(truth, mask, earlier.get(name, ()), self.rule,
                               self._anchor(name, bool(earlier.get(name)), obs.image))
            if click is None:
                continue
            action = Action.from_click(click, w, h, target=name if multi else None)
            actions.append(action)
            sentences.append(click_sentence(action, score, name if multi else None))
        if actions:
            return format_response(Response(think=" ".join(sentences), actions=tuple(actions)))
        return format_response(self._final(obs, truths))

    def _final(self, obs: Observation, truths: Mapping[str, np.ndarray]) -> Response:
        sentences, parts = [], []
        for name in obs.targets:
            if truths[name].any():
                sentences.append(f"The mask now follows the {name} closely, so it is finished.")
                parts.append(name)
            else:
                sentences.append(f"I find no {name} anywhere in the image, so its mask stays empty.")
                parts.append(f"{name}: {ABSENT_ANSWER}" if len(obs.targets) > 1 else ABSENT_ANSWER)
        return Response(think=" ".join(sentences), actions=(Action("terminate"),), answer="; ".join(parts))

    def _anchor(self, name: str, clicked: bool, image: np.ndarray) -> tuple[float, float] | None:
        """The anchor of target ``name`` in pixels of the observed (h, w[, 3]) ``image`` — with appearance modes, the
        mode the image is nearest — or ``None`` (no anchor, or not anchored now)."""
        anchor = self.anchors.get(name.casefold())
        if anchor is None or (clicked and self.anchor_clicks == "first"):
            return None
        if isinstance(anchor[0], AnchorMode):
            anchor = nearest_mode(anchor, image).anchor
        h, w = image.shape[:2]
        return anchor[0] * w, anchor[1] * h

    def _truth_in_grid(self, name: str, grid: tuple[int, ...]) -> np.ndarray:
        if name not in self._truth:
            raise PolicyError(f"oracle policy has no ground truth for target {name!r} "
                              f"(it knows: {', '.join(sorted(self._truth)) or 'none'})")
        mask = self._truth[name]
        if mask is None:
            return np.zeros(grid, dtype=bool)
        return resize_mask(mask, (int(grid[0]), int(grid[1])))


def _anchor_value(name: str, value: Anchor) -> tuple[float, float] | tuple[AnchorMode, ...]:
    """An ``anchors`` entry checked: an ``(x, y)`` pair or a non-empty sequence of anchor modes."""
    if value and all(isinstance(m, AnchorMode) for m in value):
        return tuple(value)  # type: ignore[arg-type]
    try:
        x, y = value  # type: ignore[misc]
        return float(x), float(y)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"anchor of {name!r} must be (x, y) or a list of AnchorMode, got {value!r}") from exc


def _earlier_clicks(messages: Conversation, obs: Observation) -> dict[str, list[Click]]:
    """Clicks written in earlier assistant turns, per target, in pixels of the observation's grid."""
    h, w = obs.image.shape[:2]
    found: dict[str, list[Click]] = {}
    for message in messages:
        if message.get("role") != "assistant":
            continue
        content = message.get("content", "")
        text = content if isinstance(content, str) else "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
        try:
            response = parse_response(text)
        except ProtocolError:
            continue
        for action in response.clicks:
            name = action.target if action.target in obs.targets else obs.targets[0]
            found.setdefault(name, []).append(action.to_click(w, h))
    return found
