"""Trajectory records (DESIGN §4): one JSON object per line, one line per (case, target) trajectory.

A record holds the case id, the instruction, the image reference, and per step the clicks (relative and pixel),
the tool, the IoU after the step, the mask as run-length encoding, the reasoning text and the raw model text; then
the final IoU/Dice and the source (``simulated``, ``policy`` or ``correction``).

Masks are stored as row-major run-length encoding: ``{"size": [H, W], "counts": [n0, n1, n2, …]}`` — alternating
runs of background and foreground pixels over ``mask.ravel()`` (C order), starting with background (``n0`` may be
0). :func:`rle_encode` and :func:`rle_decode` are exact inverses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ibisagent.fileio import atomic_path

Source = Literal["simulated", "policy", "correction"]


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool mask → ``{"size": [H, W], "counts": [...]}`` (row-major, starting with a background run)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"RLE needs a 2D mask, got shape {mask.shape}")
    flat = mask.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`rle_encode`; raises ``ValueError`` when the counts do not fill the size."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h * w} for size {h}x{w}")
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(h, w)


@dataclass
class ClickRecord:
    """A click in both coordinate systems: relative ``x``, ``y`` in [0, 1] and pixel ``px``, ``py`` (x = column);
    ``in_error_region``: whether it fell where it should (positive in the missed part, negative in the over-included
    part of the mask before its step; :attr:`ibisagent.env.ClickResult.in_error_region`), ``None`` when unknown."""

    x: float
    y: float
    px: int
    py: int
    positive: bool
    target: str | None = None
    in_error_region: bool | None = None


@dataclass
class StepRecord:
    """One step: the clicks it added, the action text, the tool's mask after it and its IoU (``None`` if unknown),
    the IoU before it (``iou_before``), the reasoning (``think``), the model's full turn (``raw``, exactly the text
    the environment was stepped with) and, for malformed turns, the ``error``; ``attempt`` > 0 marks repair retries
    of the same step."""

    clicks: list[ClickRecord]
    mask: dict[str, Any]
    iou: float | None = None
    action: str = ""
    think: str = ""
    raw: str = ""
    seconds: float = 0.0
    iou_before: float | None = None
    attempt: int = 0
    error: str | None = None


@dataclass
class TrajectoryRecord:
    """One trajectory of one target of one case."""

    id: str
    instruction: str
    image: str
    target: str
    tool: str
    source: Source
    modality: str = ""
    slice: int | None = None
    steps: list[StepRecord] = field(default_factory=list)
    final_iou: float | None = None
    final_dice: float | None = None
    stop_reason: str = ""
    answer: str | None = None
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrajectoryRecord:
        steps = [
            StepRecord(**{**s, "clicks": [ClickRecord(**c) for c in s.get("clicks", [])]}) for s in data.get("steps", [])
        ]
        return cls(**{**data, "steps": steps})

    def final_mask(self) -> np.ndarray | None:
        """The last step's mask, or ``None`` for a trajectory without steps."""
        return rle_decode(self.steps[-1].mask) if self.steps else None


def write_trajectories(path: str | os.PathLike[str], records: Iterable[TrajectoryRecord]) -> Path:
    """Write records as JSONL atomically (a temp file renamed into place); returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(record.to_json() + "\n")
    return Path(path)


def read_trajectories(path: str | os.PathLike[str]) -> Iterator[TrajectoryRecord]:
    """Read a trajectory JSONL file; a bad line raises ``ValueError`` naming the file and line."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield TrajectoryRecord.from_dict(json.loads(line))
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{path}:{number}: not a trajectory record ({exc})") from exc
