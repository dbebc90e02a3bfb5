"""Radiologist corrections → training trajectories, and the crash-safe store they are appended to.

When a radiologist fixes the agent's mask and saves it, the difference between the two masks is new training data:
:func:`correction_record` replays the fix as *simulated expert clicks* with the same tool (the click simulator of
:mod:`ibisagent.clicks`, started in refinement mode from the agent's mask) and returns a
:class:`~ibisagent.data.trajectory.TrajectoryRecord` with source ``"correction"``.

Record layout: step 0 is the starting state — the agent's mask, no clicks, empty ``action`` — so that the record
alone says where the correction started from; steps 1… are the simulated clicks, each with the tool's mask after
it and its IoU against the radiologist's mask. ``final_iou``/``final_dice`` compare the last mask with the
radiologist's; ``stop_reason`` is the simulator's (``iou_reached`` with no click steps means the agent's mask was
accepted as it was).

:class:`CorrectionStore` is an append-only JSONL file that survives crashes: every record is one complete line
written with a single ``os.write`` on an ``O_APPEND`` descriptor and ``fsync``-ed; complete records are never
rewritten. A crash mid-write can leave a torn last line (bytes after the last newline): :meth:`CorrectionStore.repair`
(run when the app starts, and before every append) truncates it, so that the file stays plain JSONL for any reader;
readers of this module skip a torn tail anyway.

:class:`AgentOutputStore` keeps the agent's masks that await a correction (Slicer never sends the model's own output
back, so the app stores it at infer time), and :func:`derive_corrections` turns a saved label plus those outputs
into correction records — the whole correction loop, behind the MONAI Label app's ``on_save_label``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.clicks import DEFAULT_IOU_STOP, DEFAULT_MAX_CLICKS, simulate
from ibisagent.data.trajectory import StepRecord, TrajectoryRecord, rle_decode, rle_encode
from ibisagent.fileio import atomic_write_text
from ibisagent.metrics import dice, iou
from ibisagent.policies.oracle import oracle_step_records
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
        iou_stop: the simulator stops once the tool's mask reaches this IoU with ``final_mask``.
        max_clicks: click budget of the simulator.

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

    steps, stop_reason = simulate(tool_session, final, initial_mask=agent, iou_stop=iou_stop, max_clicks=max_clicks)
    before = iou(agent, final)
    records = [StepRecord(clicks=[], mask=rle_encode(agent), iou=round(before, 6), think=START_THINK),
               *oracle_step_records(steps, w, h, before)]
    last = steps[-1].mask if steps else agent
    return TrajectoryRecord(
        id=case_id, instruction=instruction, image=image_ref, target=target, tool=tool_name, source="correction",
        modality=modality, slice=slice, steps=records, final_iou=round(iou(last, final), 6),
        final_dice=round(dice(last, final), 6), stop_reason=stop_reason,
        answer=None if final.any() else "not present", seconds=round(sum(s.seconds for s in steps), 6),
    )


class CorrectionStore:
    """Append-only, crash-safe JSONL store of :class:`TrajectoryRecord` (see the module docstring).

    Safe for concurrent appends from threads and processes (an exclusive ``flock`` covers the tail check and the
    write). The file and its folder are created on the first append.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, record: TrajectoryRecord) -> None:
        """Append one record as one line: a single ``os.write`` on an ``O_APPEND`` descriptor, then ``fsync``.

        A torn last line (a crash mid-write) is truncated first (:meth:`repair`), so the new line starts fresh.
        """
        payload = (record.to_json() + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _truncate_torn_tail(fd, self.path)
            written = os.write(fd, payload)
            while written < len(payload):  # only on a signal or a full disk; finish the line rather than tear it
                written += os.write(fd, payload[written:])
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock

    def repair(self) -> int:
        """Truncate a torn last line left by a crash mid-write (bytes after the last newline); earlier lines are never
        touched. Returns the number of bytes removed (0 when the file is whole or absent)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return _truncate_torn_tail(fd, self.path)
        finally:
            os.close(fd)

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


def _truncate_torn_tail(fd: int, path: Path) -> int:
    """Cut the bytes after the last newline of the open file ``fd`` (held under an exclusive lock); returns how many."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    block = 1 << 16
    end = size
    while end > 0:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            break
        end = start
    else:
        keep = 0
    os.ftruncate(fd, keep)
    os.fsync(fd)
    logger.warning("%s: removed a torn last line of %d bytes (interrupted write)", path, size - keep)
    return size - keep
# ------------------------------------------------------------------------------------------ outputs awaiting review

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]*$")


def check_image_id(image_id: Any) -> str:
    """An image id usable as a file name: letters, digits, ``. _ + -``, no ``..``; else ``ValueError``."""
    if not isinstance(image_id, str) or not _SAFE_ID.match(image_id) or ".." in image_id or len(image_id) > 255:
        raise ValueError(f"invalid image id {image_id!r}: use letters, digits and . _ + - only (no path separators, "
                         f"no '..')")
    return image_id


class AgentOutputStore:
    """The agent's last masks per (image id, slice), kept until a radiologist's label for the image is saved.

    One JSON file per image id under ``root`` (masks as RLE), written atomically. Each read-modify-write holds a
    thread lock and an exclusive ``flock`` on ``root/.lock``, so several server workers never lose each other's
    entries. Entries hold ``instruction``, ``targets``, ``tool``, ``policy``, ``modality``, ``answer``,
    ``stop_reason`` and ``masks`` (target → (H, W) bool).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _path(self, image_id: str) -> Path:
        return self.root / f"{check_image_id(image_id)}.json"

    def put(self, image_id: str, slice_key: int, entry: Mapping[str, Any], masks: Mapping[str, np.ndarray]) -> None:
        """Keep ``entry`` and ``masks`` (target → (H, W) bool) for slice ``slice_key`` (0 for 2D images)."""
        stored = {**entry, "masks": {name: rle_encode(m) for name, m in masks.items()}}
        with self._exclusive():
            data = self._read(image_id)
            data[str(slice_key)] = stored
            atomic_write_text(self._path(image_id), json.dumps(data))

    def peek(self, image_id: str) -> dict[int, dict[str, Any]]:
        """All stored outputs of the image (slice → entry with decoded ``masks``), leaving them in place."""
        with self._exclusive():
            return self._decoded(self._read(image_id))

    def take(self, image_id: str) -> dict[int, dict[str, Any]]:
        """All stored outputs of the image (slice → entry with decoded ``masks``), removing them."""
        with self._exclusive():
            data = self._read(image_id)
            self._path(image_id).unlink(missing_ok=True)
        return self._decoded(data)

    def has(self, image_id: str) -> bool:
        return self._path(image_id).is_file()

    @staticmethod
    def _decoded(data: dict[str, Any]) -> dict[int, dict[str, Any]]:
        out = {}
        for key, entry in data.items():
            entry["masks"] = {name: rle_decode(rle) for name, rle in entry.get("masks", {}).items()}
            out[int(key)] = entry
        return out

    def _read(self, image_id: str) -> dict[str, Any]:
        path = self._path(image_id)
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            logger.warning("%s: unreadable agent output, ignored", path)
            return {}


def derive_corrections(
    image: Any,
    label: np.ndarray,
    outputs: Mapping[int, Mapping[str, Any]],
    tool: Any,
    image_id: str,
    *,
    client_id: str | None = None,
    time: dt.datetime | None = None,
) -> list[TrajectoryRecord]:
    """Correction records from a saved label and the agent outputs it corrects.

    Args:
        image: the :class:`~ibisagent.imaging.Image` the agent worked on.
        label: the saved label on ``image``'s grid (``(Z, Y, X)`` for a volume, ``(H, W)`` for 2D): non-zero =
            the target for one target; value ``i`` = target ``i`` (1-based, the entry's order) for several.
        outputs: slice → stored entry (:meth:`AgentOutputStore.take`).
        tool: the segmenter the agent used (:func:`ibisagent.tools.load_tool`); each slice is encoded once.
        image_id: the datastore id, stored as the records' image reference.
        client_id: the MONAI Label client id of whoever saved the label.
        time: when it was saved (default: now, UTC).

    Returns:
        One record per (slice, target), source ``"correction"``, with ``client_id`` and ``time``.

    Raises:
        ValueError: the label's shape differs from the image's.
    """
    from ibisagent.volume import slice_rgb

    expected = image.array.shape if image.is_volume else image.array.shape[:2]
    label = np.asarray(label)
    if label.shape != tuple(expected):
        raise ValueError(f"saved label shape {label.shape} does not match image shape {tuple(expected)}")
    when = (time or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds")
    records = []
    for k, entry in sorted(outputs.items()):
        rgb = slice_rgb(image, k)
        session = tool.encode(rgb)
        plane = label[k] if image.is_volume else label
        targets = list(entry["targets"])
        for index, target in enumerate(targets):
            final = plane == index + 1 if len(targets) > 1 else plane != 0
            record = correction_record(
                rgb, entry["masks"][target], np.asarray(final), session, entry["instruction"], image_id,
                case_id=f"{image_id}:{k}" if image.is_volume else image_id, target=target,
                tool_name=entry["tool"], modality=image.modality, slice=k if image.is_volume else None,
            )
            record.client_id, record.time = client_id, when
            records.append(record)
    return records
