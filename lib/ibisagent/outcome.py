"""What a run of the agent tells whoever asked for it: whether it failed and why, and the per-step JSON.

One definition for every face: ``segment`` (exit status, stderr, the trace), ``eval`` (the case's error) and the
MONAI Label app (its reply) all read a trajectory through these functions.

A run *failed* when the agent stopped without a usable answer from the model or the tool — stop reasons in
:data:`FAILED_STOPS` — as opposed to stopping by design (``terminate``, ``max_steps``, ``repeated_click``,
``time_limit``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ibisagent.agent import AgentStep, AgentTrajectory, absent_targets
from ibisagent.data.trajectory import TrajectoryRecord
from ibisagent.imaging import Image
from ibisagent.protocol import format_action

#: Stop reasons that mean the run failed: the model's output could not be parsed even after repair, the policy
#: backend failed, or the tool failed.
FAILED_STOPS = frozenset({"unparseable", "policy_error", "tool_error"})


def last_error(trajectory: AgentTrajectory) -> str | None:
    """The last error text of a trajectory: its own ``error``, else the last step's, else ``None``."""
    if trajectory.error:
        return trajectory.error
    for step in reversed(trajectory.steps):
        if step.error:
            return step.error
    return None


def failure(trajectory: AgentTrajectory) -> str | None:
    """``"<stop reason>: <last error>"`` when the run failed (:data:`FAILED_STOPS`), else ``None``."""
    if trajectory.stop_reason not in FAILED_STOPS:
        return None
    return f"{trajectory.stop_reason}: {last_error(trajectory) or 'no detail'}"


def failures(trajectories: Iterable[tuple[int | None, AgentTrajectory]]) -> list[str]:
    """Failure texts of ``(slice or None, trajectory)`` pairs, prefixed with ``slice K:`` for volumes."""
    out = []
    for k, trajectory in trajectories:
        why = failure(trajectory)
        if why is not None:
            out.append(why if k is None else f"slice {k}: {why}")
    return out


#: Words an answer may hold besides a target's name and still be about that target alone ("Not present.", "The target
#: is not visible in this image."): anything else ("The gallstone is not present.") names some other structure.
_GENERIC_WORDS = frozenset("""
a an the this that these it its there here is are was were be been can cannot could do does not no none nothing
present absent visible seen found detected identified shown depicted included located in on at of on to within
image slice scan picture view region structure target object organ lesion mask result empty any i see
""".split())


def declared_absent(answer: str | None, target: str) -> bool:
    """Whether ``answer`` says that ``target`` is absent, explicitly: the environment's reading
    (:func:`ibisagent.env.absent_targets`) declares it absent, and the answer either names ``target`` or names nothing
    else ("not present", "No.", "The liver is not visible." for ``liver``; not "The gallstone is not present." for
    ``liver``). Case-insensitive."""
    if not answer or target not in absent_targets(answer, [target]):
        return False
    text = answer.casefold()
    if target.casefold() in text:
        return True
    return set(re.findall(r"[a-z]+", text)) <= _GENERIC_WORDS


def empty_mask_notes(masks: Mapping[str, np.ndarray], trajectory: AgentTrajectory,
                     targets: Sequence[str]) -> dict[str, tuple[bool, str]]:
    """For every target whose final mask (any shape, bool) is empty: ``(explained, text)`` — ``explained`` when the
    agent's answer on ``trajectory`` (the key slice's, for a volume) declares it absent (:func:`declared_absent`);
    ``text`` names the target, the stop reason and the answer. Targets with a mask are left out."""
    notes = {}
    for name in targets:
        if np.asarray(masks[name]).any():
            continue
        answer = trajectory.answer
        said = f"stop: {trajectory.stop_reason}; answer: {answer!r}" if answer else \
            f"stop: {trajectory.stop_reason}; no answer"
        if declared_absent(answer, name):
            notes[name] = (True, f"the mask of {name!r} is empty: the agent answered that it is absent ({said})")
        else:
            notes[name] = (False, f"the mask of {name!r} is empty and the agent did not say that {name} is absent "
                                  f"({said})")
    return notes


def with_errors(records: Iterable[TrajectoryRecord], trajectory: AgentTrajectory) -> list[TrajectoryRecord]:
    """``records`` of ``trajectory`` with its last error text filled in (the trace says why a run failed)."""
    error = last_error(trajectory)
    out = []
    for record in records:
        record.error = error
        out.append(record)
    return out


def step_json(step: AgentStep, image: Image | None = None, slice: int = 0) -> dict[str, Any]:  # noqa: A002
    """One agent step as JSON: index, repair attempt, think and raw text, error, actions, clicks, seconds.

    Clicks carry relative ``x, y`` in [0, 1], pixel ``px, py`` (column, row) on the slice, the sign and the target;
    with ``image``, also the client's ``voxel`` index ``[i, j, k]`` of the image file (``slice`` is the canonical
    axial index the step ran on).
    """
    clicks = []
    for c in step.clicks:
        click: dict[str, Any] = {"target": c.target, "x": float(c.action.x), "y": float(c.action.y),
                                 "px": c.click.x, "py": c.click.y, "positive": c.click.positive}
        if image is not None:
            click["voxel"] = list(image.geometry.canonical_to_voxel((slice, c.click.y, c.click.x)))
        clicks.append(click)
    return {
        "index": step.index,
        "attempt": step.attempt,
        "think": step.response.think if step.response is not None else None,
        "raw": step.raw,
        "error": step.error,
        "actions": [format_action(a) for a in step.actions],
        "clicks": clicks,
        "seconds": round(step.timings.total, 4),
    }


def trajectory_json(trajectory: AgentTrajectory, image: Image | None = None, slice: int = 0) -> dict[str, Any]:  # noqa: A002
    """A trajectory as JSON: ``answer``, ``stop_reason``, ``error`` (the last error text), ``failed`` and
    ``steps`` (:func:`step_json`)."""
    return {
        "answer": trajectory.answer,
        "stop_reason": trajectory.stop_reason,
        "error": last_error(trajectory),
        "failed": trajectory.stop_reason in FAILED_STOPS,
        "steps": [step_json(s, image, slice) for s in trajectory.steps],
    }
