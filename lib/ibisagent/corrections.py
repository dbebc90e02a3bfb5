"""Radiologist corrections → training trajectories, and the crash-safe store they are appended to.

When a radiologist fixes the agent's mask and saves it, the difference between the two masks is new training data:
:func:`correction_record` replays the fix as *simulated expert turns* with the same tool — the oracle policy
(:mod:`ibisagent.policies.oracle`, the radiologist's mask as its ground truth) stepping the environment
(:mod:`ibisagent.env`) in refinement mode from the agent's mask — and returns a
:class:`~ibisagent.data.trajectory.TrajectoryRecord` with source ``"correction"``.

Record layout: step 0 is the starting state — the agent's mask, no clicks, empty ``action`` and ``raw`` — so that the
record alone says where the correction started from; steps 1… are the oracle's turns as the environment recorded
them (clicks, or ``Reset`` when the agent's mask misses the structure entirely, then ``Terminate``), each with the
tool's mask after it and its IoU against the radiologist's mask. ``final_iou``/``final_dice`` compare the last mask
with the radiologist's; ``stop_reason`` is the environment's (``terminate`` right after step 0 means the agent's
mask was accepted as it was; ``max_steps`` means the click budget ran out).

:class:`CorrectionStore` is an append-only JSONL file that survives crashes: every record is one complete line
written with a single ``os.write`` on an ``O_APPEND`` descriptor and ``fsync``-ed; the file is never rewritten. A
crash mid-write can leave a torn last line: readers skip it (a line counts only when it ends with a newline and
parses as a record), and the next append starts on a fresh line, so the torn bytes stay behind as one skipped line.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ibisagent.agent import AgentConfig, run_agent
from ibisagent.clicks import DEFAULT_IOU_STOP, DEFAULT_MAX_CLICKS
from ibisagent.data.trajectory import StepRecord, TrajectoryRecord, rle_encode
from ibisagent.metrics import iou
from ibisagent.policies.oracle import OraclePolicy
from ibisagent.tools.base import ImageSession, check_image

logger = logging.getLogger(__name__)

#: ``think`` text of step 0 of a correction record (the starting state).
START_THINK = "The radiologist starts from the agent's mask and corrects it."


def correction_record(
    rgb: np.ndarray,
    agent_mask: np.ndarray,
    final_mask: np.ndarray,
    tool_session: ImageSession,
    instruction: str,
    image_ref: str,
    *,
    case_id: str,
    target: str,
    tool_name: str,
    modality: str = "",
    slice: int | None = None,  # noqa: A002 - the manifest's field name
    iou_stop: float = DEFAULT_IOU_STOP,
    max_clicks: int = DEFAULT_MAX_CLICKS,
) -> TrajectoryRecord:
    """The clicks an expert would make with ``tool_session`` to turn the agent's mask into the radiologist's.

    Args:
        rgb: (H, W, 3) uint8, the image the agent and the tool saw (only its shape is used: the tool already
            encoded it).
        agent_mask: (H, W) bool, the agent's final mask (start of the correction).
        final_mask: (H, W) bool, the radiologist's saved mask (the correction's target).
        tool_session: the tool's encoding of ``rgb`` — the same tool the agent used.
        instruction: the radiologist's request, e.g. "Segment the liver."
        image_ref: where the image lives (file path or datastore id), stored in the record.
        case_id: record id (e.g. the image id and slice).
        target: target name.
        tool_name: tool spec or name, stored in the record.
        modality: "CT", "MR", … when known.
        slice: axial slice of a volume (canonical ``(Z, Y, X)`` index), ``None`` for 2D images.
        iou_stop: the oracle terminates once the tool's mask reaches this IoU with ``final_mask``.
        max_clicks: most oracle turns (one click each; the ``Terminate`` turn counts).

    Returns:
        A record with source ``"correction"`` (layout in the module docstring).

    Raises:
        ValueError: shapes that do not agree.
    """
    rgb = check_image(rgb)
    h, w = rgb.shape[:2]
    agent = np.asarray(agent_mask).astype(bool)
    final = np.asarray(final_mask).astype(bool)
    for name, mask in (("agent_mask", agent), ("final_mask", final)):
        if mask.shape != (h, w):
            raise ValueError(f"{name} shape {mask.shape} does not match the image's (H, W) = {(h, w)}")
    if tuple(tool_session.shape) != (h, w):
        raise ValueError(f"tool session shape {tuple(tool_session.shape)} does not match the image's {(h, w)}")

    oracle = OraclePolicy({target: final}, iou_stop=iou_stop)
    trajectory = run_agent(oracle, tool_session, rgb, instruction, [target], initial_masks={target: agent},
                           config=AgentConfig(max_steps=max_clicks), ground_truth={target: final})
    start = StepRecord(clicks=[], mask=rle_encode(agent), iou=round(iou(agent, final), 6), think=START_THINK)
    record = trajectory.to_records(case_id, image_ref, tool_name, modality=modality, slice=slice,
                                   ground_truth={target: final}, source="correction")[0]
    record.steps = [start, *record.steps]
    return record


class CorrectionStore:
    """Append-only, crash-safe JSONL store of :class:`TrajectoryRecord` (see the module docstring).

    Safe for concurrent appends from threads and processes (an exclusive ``flock`` covers the tail check and the
    write). The file and its folder are created on the first append.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, record: TrajectoryRecord) -> None:
        """Append one record as one line: a single ``os.write`` on an ``O_APPEND`` descriptor, then ``fsync``.

        If the file ends in a torn line (a crash mid-write), the new line is preceded by a newline so that it starts
        fresh; the torn bytes are left in place and skipped by readers.
        """
        payload = (record.to_json() + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                payload = b"\n" + payload
            written = os.write(fd, payload)
            while written < len(payload):  # only on a signal or a full disk; finish the line rather than tear it
                written += os.write(fd, payload[written:])
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock

    def read(self) -> list[TrajectoryRecord]:
        """Every complete record, in append order (torn or corrupt lines are skipped with a warning)."""
        return list(self)

    def count(self) -> int:
        """Number of complete records."""
        return sum(1 for _ in self)

    def __iter__(self) -> Iterator[TrajectoryRecord]:
        for number, data in self._lines():
            try:
                yield TrajectoryRecord.from_dict(data)
            except (TypeError, KeyError, ValueError) as exc:
                logger.warning("%s:%d: skipped, not a trajectory record (%s)", self.path, number, exc)

    def _lines(self) -> Iterator[tuple[int, dict]]:
        """``(line number, parsed object)`` for every newline-terminated line that parses as a JSON object."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: empty, or a torn line from a crash
        if tail:
            logger.warning("%s: ignoring a torn last line of %d bytes (interrupted write)", self.path, len(tail))
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                logger.warning("%s:%d: skipped a torn line (interrupted write)", self.path, number)
                continue
            if isinstance(obj, dict):
                yield number, obj
