"""Corrections → trajectories, and the crash-safe append-only store (killed writers, torn tails, resumed appends)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ibisagent.corrections import CorrectionStore, correction_record
from ibisagent.data.trajectory import StepRecord, TrajectoryRecord, rle_decode
from ibisagent.metrics import iou
from ibisagent.tools import load_tool

LIB = Path(__file__).resolve().parents[1] / "lib"


def _record(i: int, pad: int = 0) -> TrajectoryRecord:
    """A record whose id encodes its sequence number; ``pad`` makes its line long (more chances to tear it)."""
    return TrajectoryRecord(id=f"case-{i:06d}", instruction="x" * pad, image="img.png", target="t", tool="embedded",
                            source="correction", steps=[StepRecord(clicks=[], mask={"size": [1, 1], "counts": [1]})])


def _disc_image(h: int = 64, w: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc on a dark noisy background: ``(rgb (H, W, 3) uint8, disc (H, W) bool)``."""
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 32) ** 2 + (xx - 40) ** 2 <= 15**2
    rng = np.random.default_rng(0)
    grey = np.where(disc, 200, 50) + rng.normal(0, 5, (h, w))
    rgb = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return rgb, disc


def test_correction_record_replays_the_fix_with_the_tool() -> None:
    rgb, disc = _disc_image()
    agent = np.zeros_like(disc)
    agent[20:30, 30:50] = True  # a partial, misplaced mask
    session = load_tool("embedded").encode(rgb)
    record = correction_record(rgb, agent, disc, session, "Segment the disc.", "img.png", case_id="img", target="disc",
                               tool_name="embedded", slice=None)
    assert record.source == "correction"
    assert record.steps[0].clicks == [] and record.steps[0].action == ""
    assert np.array_equal(rle_decode(record.steps[0].mask), agent)  # starts from the agent's mask
    assert record.stop_reason in ("terminate", "max_steps")
    clicking = record.steps[1:]
    if record.stop_reason == "terminate":  # the oracle's last turn: Terminate with the answer, no click
        assert record.steps[-1].action == "Terminate" and record.steps[-1].clicks == [] and record.answer == "disc"
        clicking = record.steps[1:-1]
    assert clicking and all(len(s.clicks) == 1 for s in clicking)
    assert record.steps[1].action.startswith(("Positive Point", "Negative Point"))
    assert all(s.raw.startswith("<think>") for s in record.steps[1:])  # the oracle's turns, as the env recorded them
    assert record.final_iou is not None and record.final_iou > iou(agent, disc)
    json.loads(record.to_json())


def test_accepted_mask_needs_no_click() -> None:
    rgb, disc = _disc_image()
    session = load_tool("embedded").encode(rgb)
    record = correction_record(rgb, disc, disc, session, "Segment the disc.", "img.png", case_id="img", target="disc",
                               tool_name="embedded")
    assert [s.clicks for s in record.steps] == [[], []] and record.steps[1].action == "Terminate"
    assert record.stop_reason == "terminate"
    assert record.final_iou == 1.0


def test_shape_mismatch_is_rejected() -> None:
    rgb, disc = _disc_image()
    session = load_tool("embedded").encode(rgb)
    with pytest.raises(ValueError, match="final_mask shape"):
        correction_record(rgb, disc, disc[:10], session, "i", "img", case_id="c", target="t", tool_name="embedded")


def test_store_appends_reads_and_counts(tmp_path: Path) -> None:
    store = CorrectionStore(tmp_path / "sub" / "corrections.jsonl")
    assert store.count() == 0 and store.read() == []
    for i in range(3):
        store.append(_record(i))
    assert [r.id for r in store.read()] == ["case-000000", "case-000001", "case-000002"]
    assert store.count() == 3


def test_torn_tail_is_skipped_and_never_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "corrections.jsonl"
    store = CorrectionStore(path)
    store.append(_record(0))
    torn = _record(1).to_json()[:25].encode()
    with open(path, "ab") as fh:
        fh.write(torn)
    assert [r.id for r in store.read()] == ["case-000000"]
    before = path.read_bytes()
    store.append(_record(2))
    after = path.read_bytes()
    assert after.startswith(before)  # nothing rewritten in place
    assert [r.id for r in store.read()] == ["case-000000", "case-000002"]


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from ibisagent.corrections import CorrectionStore
    from ibisagent.data.trajectory import StepRecord, TrajectoryRecord
    store = CorrectionStore(sys.argv[2])
    i = int(sys.argv[3])
    print("ready", flush=True)
    while True:
        store.append(TrajectoryRecord(id=f"case-{i:06d}", instruction="x" * 20000, image="img.png", target="t",
                                      tool="embedded", source="correction",
                                      steps=[StepRecord(clicks=[], mask={"size": [1, 1], "counts": [1]})]))
        i += 1
""")


def test_sigkilled_writers_lose_no_earlier_record(tmp_path: Path) -> None:
    """A writer subprocess appends in a loop and is SIGKILLed at random moments, several times; after each kill every
    record it finished is intact, no partial record is returned, and a new writer resumes appending."""
    path = tmp_path / "corrections.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    store = CorrectionStore(path)
    rng = random.Random(1234)
    seen = 0
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(LIB), str(path), str(seen)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        records = store.read()
        ids = [r.id for r in records]
        # every record is complete, in order, with no gap and no duplicate: the writer resumed where it stopped
        assert ids == [f"case-{i:06d}" for i in range(len(ids))], f"round {round_}"
        assert all(len(r.instruction) == 20000 for r in records)
        assert len(ids) > seen, f"round {round_}: the writer appended nothing"
        seen = len(ids)
    assert store.count() == seen
