"""The command line end to end on real files: simulate, eval, render, demo; bad cases recorded, not fatal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from ibisagent.cli import SAMPLE_MANIFEST, main
from ibisagent.data.trajectory import read_trajectories


def _write_png(path: Path, array: np.ndarray) -> str:
    PILImage.fromarray(array).save(path)
    return path.name


@pytest.fixture()
def small_manifest(tmp_path: Path) -> Path:
    """Three good cases (disc, absent target, two targets) and three bad ones (missing file, size mismatch, not JSON)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :128]
    disc = (yy - 40) ** 2 + (xx - 50) ** 2 < 20**2
    square = (abs(yy - 60) < 12) & (abs(xx - 100) < 12)
    image = np.clip(60 + 120 * disc + 80 * square + rng.normal(0, 8, disc.shape), 0, 255).astype(np.uint8)
    img = _write_png(tmp_path / "img.png", image)
    m1 = _write_png(tmp_path / "disc.png", (disc * 255).astype(np.uint8))
    m2 = _write_png(tmp_path / "square.png", (square * 255).astype(np.uint8))
    small = _write_png(tmp_path / "small.png", np.zeros((10, 10), np.uint8) + 255)
    lines = [
        {"id": "disc", "image": img, "modality": "MR", "instruction": "Segment the disc.",
         "targets": [{"name": "disc", "mask": m1}]},
        {"id": "absent", "image": img, "modality": "MR", "instruction": "Segment the tumour.",
         "targets": [{"name": "tumour", "mask": None}]},
        {"id": "two", "image": img, "modality": "MR", "instruction": "Segment the disc and the square.",
         "targets": [{"name": "disc", "mask": m1}, {"name": "square", "mask": m2}]},
        {"id": "vqa", "image": img, "modality": "MR", "instruction": "Is there a disc?", "targets": [],
         "answer": "yes"},
        {"id": "missing", "image": "nope.png", "modality": "MR", "instruction": "x",
         "targets": [{"name": "a", "mask": m1}]},
        {"id": "mismatch", "image": img, "modality": "MR", "instruction": "x", "targets": [{"name": "a", "mask": small}]},
    ]
    text = "\n".join(json.dumps(line) for line in lines[:3]) + "\n{this is not json\n"
    text += "\n".join(json.dumps(line) for line in lines[3:]) + "\n"
    path = tmp_path / "manifest.jsonl"
    path.write_text(text)
    return path


def test_eval_scores_good_cases_and_records_bad_ones(small_manifest: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    code = main(["eval", str(small_manifest), "--policy", "oracle", "--tool", "embedded", "--out", str(out),
                 "--no-progress", "--trajectories"])
    assert code == 1  # some cases failed, the rest were written
    results = json.loads((out / "results.json").read_text())
    cases = {c["id"]: c for c in results["cases"]}
    assert set(cases) == {"disc", "absent", "two", "line 4", "vqa", "missing", "mismatch"}
    assert "skipped" in cases["vqa"] and "error" not in cases["vqa"]
    assert "nope.png" in cases["missing"]["error"]
    assert "small.png" in cases["mismatch"]["error"]
    assert "line 4" in cases["line 4"]["error"]
    # an absent target: one answer turn ("not present"), no click
    assert cases["absent"]["iou"] == 1.0 and cases["absent"]["steps"] == 1 and cases["absent"]["f1"] == 1.0
    assert cases["absent"]["targets"][0]["steps"] == 0
    for key in ("disc", "two"):
        assert cases[key]["iou"] >= 0.9 and "error" not in cases[key]
        assert 1 <= cases[key]["steps"] <= 20
    agg = results["aggregate"]
    assert agg["samples"] == 3 and agg["errors"] == 3
    meta = results["meta"]  # the simulated expert's settings, not the agent's
    assert meta["iou_stop"] == 0.9 and meta["max_clicks"] == 20 and meta["rule"] == "peak"
    assert "max_turns" not in meta and "history" not in meta
    assert 0.9 <= agg["mean_iou"] <= 1.0
    assert {"mean_iou", "median_iou", "mean_dice", "mean_f1", "mean_steps", "noc@90"} <= set(agg)
    for name in ("results.md", "iou_per_click.png", "iou_per_case.png"):
        assert (out / name).stat().st_size > 0
    records = list(read_trajectories(out / "trajectories.jsonl"))
    assert [(r.id, r.target) for r in records] == [("disc", "disc"), ("absent", "tumour"), ("two", "disc"),
                                                   ("two", "square")]
    assert records[1].answer == "not present" and [s.action for s in records[1].steps] == ["Terminate"]
    assert records[1].steps[0].clicks == [] and records[1].source == "simulated"
    assert "| MR | 3 |" in capsys.readouterr().out


def test_simulate_then_render(small_manifest: Path, tmp_path: Path) -> None:
    traj = tmp_path / "traj.jsonl"
    assert main(["simulate", str(small_manifest), "--out", str(traj), "--no-progress"]) == 1
    records = list(read_trajectories(traj))
    disc = records[0]
    assert disc.source == "simulated" and disc.steps[0].clicks[0].positive
    # the first click is inside the disc (centre x=50, y=40) in both coordinate systems
    first = disc.steps[0].clicks[0]
    assert (first.px - 50) ** 2 + (first.py - 40) ** 2 < 20**2
    assert first.x == pytest.approx((first.px + 0.5) / 128, abs=1e-4)
    assert disc.steps[0].raw.startswith("<think>\n") and "Positive Point" in disc.steps[0].raw
    png = tmp_path / "strip.png"
    assert main(["render", str(traj), "--case", "two", "--target", "square", "--out", str(png)]) == 0
    assert PILImage.open(png).size[0] > 200
    assert main(["render", str(traj), "--case", "unknown", "--out", str(png)]) == 2


def test_simulate_anchors_the_first_clicks_where_another_manifest_has_the_target(small_manifest: Path,
                                                                                tmp_path: Path) -> None:
    # a manifest whose "disc" masks sit at the disc's upper left (x 30-40, y 22-32): the expert starts there
    yy, xx = np.mgrid[:96, :128]
    corner = _write_png(tmp_path / "corner.png", ((abs(xx - 35) < 5) & (abs(yy - 27) < 5)).astype(np.uint8) * 255)
    lines = [{"id": "c", "image": "img.png", "modality": "MR", "instruction": "Segment the disc.",
              "targets": [{"name": "Disc", "mask": corner}]}]
    anchors_from = tmp_path / "anchors_from.jsonl"
    anchors_from.write_text("".join(json.dumps(line) + "\n" for line in lines))
    plain, anchored = tmp_path / "plain.jsonl", tmp_path / "anchored.jsonl"
    assert main(["simulate", str(small_manifest), "--out", str(plain), "--no-progress"]) == 1
    assert main(["simulate", str(small_manifest), "--out", str(anchored), "--no-progress",
                 "--anchor-from", str(anchors_from)]) == 1
    first_plain = next(read_trajectories(plain)).steps[0].clicks[0]
    first = next(read_trajectories(anchored)).steps[0].clicks[0]
    assert (first_plain.px - 50) ** 2 + (first_plain.py - 40) ** 2 <= 2  # the disc's deepest point: its centre
    assert (first.px - 50) ** 2 + (first.py - 40) ** 2 < 20**2  # still inside the disc
    assert np.hypot(first.px - 35, first.py - 27) < np.hypot(first_plain.px - 35, first_plain.py - 27) - 8
    # layout modes: one kind of mask is one mode, whose anchor is the same
    moded = tmp_path / "moded.jsonl"
    assert main(["simulate", str(small_manifest), "--out", str(moded), "--no-progress",
                 "--anchor-from", str(anchors_from), "--anchor-modes", "4"]) == 1
    assert next(read_trajectories(moded)).steps[0].clicks[0] == first


def test_eval_runs_the_agent_with_an_mllm_policy(small_manifest: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Any policy spec goes through the agent loop and every case is recorded; a case where the (untrained) model
    gave no usable answer is the case's error, not a score of its empty mask."""
    monkeypatch.setenv("IBISAGENT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    code = main(["eval", str(small_manifest), "--policy", "tiny", "--out", str(out), "--max-turns", "1",
                 "--max-clicks", "7", "--max-new-tokens", "12", "--no-progress", "--trajectories"])
    assert code == 1  # the three broken cases at least
    results = json.loads((out / "results.json").read_text())
    cases = {c["id"]: c for c in results["cases"]}
    assert {"disc", "absent", "two"} <= set(cases)
    records = list(read_trajectories(out / "trajectories.jsonl"))
    assert records and all(r.source == "policy" and r.steps and r.steps[0].raw for r in records)
    for key in ("disc", "absent", "two"):
        stops = {r.stop_reason for r in records if r.id == key}
        if stops & {"unparseable", "policy_error"}:
            assert cases[key]["error"].startswith("agent stopped ") and cases[key]["iou"] is None
            assert all(r.error for r in records if r.id == key)  # the trace says why, too
        else:
            assert "error" not in cases[key] and 0.0 <= cases[key]["iou"] <= 1.0
    # only the settings the agent run applied: turns and decoding, not the simulated expert's stop rule
    meta = results["meta"]
    assert meta["max_turns"] == 1 and meta["max_clicks"] == 7 and meta["max_new_tokens"] == 12
    assert "iou_stop" not in meta and "rule" not in meta and "max_steps" not in meta
    assert meta["show_points"] is False  # the tiny model's folder records nothing: the released turns


def test_a_dead_policy_backend_fails_every_case_instead_of_scoring_empty_masks(small_manifest: Path,
                                                                               tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "eval"
    code = main(["eval", str(small_manifest), "--policy", f"openai:http://127.0.0.1:{port}/v1#m", "--out", str(out),
                 "--no-progress"])
    assert code == 1
    results = json.loads((out / "results.json").read_text())
    assert results["aggregate"]["samples"] == 0
    assert all("error" in c or "skipped" in c for c in results["cases"])


def test_eval_out_that_is_a_file_fails_before_running(small_manifest: Path, tmp_path: Path) -> None:
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(["eval", str(small_manifest), "--out", str(target), "--no-progress"]) == 2


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    assert main(["eval", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert main(["eval", str(SAMPLE_MANIFEST), "--policy", "hf:/nowhere", "--out", str(tmp_path / "o")]) == 2
    assert main(["simulate", str(SAMPLE_MANIFEST), "--tool", "bogus", "--out", str(tmp_path / "t.jsonl")]) == 2


def test_demo_console_script_on_the_sample_data(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("ibisagent")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ibisagent.cli"]
    proc = subprocess.run([*cmd, "demo", "--out", str(tmp_path / "demo"), "--no-progress"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["aggregate"]["errors"] == 0
    assert results["aggregate"]["samples"] == sum(1 for line in SAMPLE_MANIFEST.read_text().splitlines() if line)
    assert (tmp_path / "demo" / "trajectory.png").stat().st_size > 0
    assert "| **all** |" in proc.stdout
    # the agent itself (the bundled policy) on the same cases, beside the oracle: every case runs; a case where the
    # small policy gave no usable answer is recorded as that case's error with the agent's stop reason, nothing else
    agent = json.loads((tmp_path / "demo" / "agent" / "results.json").read_text())
    assert agent["meta"]["policy"] == "bundled"
    assert len(agent["cases"]) == results["aggregate"]["samples"]  # every case ran
    errors = [c["error"] for c in agent["cases"] if c.get("error")]
    assert all(e.startswith("agent stopped unparseable") or e.startswith("agent stopped tool_error") for e in errors)
    assert len(errors) < len(agent["cases"])  # the policy answers usably on part of the cases at least
    assert 0.0 <= agent["aggregate"]["format_valid"] <= 1.0
    assert (tmp_path / "demo" / "agent" / "trajectory.png").stat().st_size > 0


def test_no_progress_also_hides_the_weight_loading_bar(tmp_path: Path) -> None:
    """``--no-progress`` means no bar at all, transformers' "Loading weights" included; without it the bar shows."""
    case = json.loads(SAMPLE_MANIFEST.read_text().splitlines()[0])
    case["image"] = str(SAMPLE_MANIFEST.parent / case["image"])
    for target in case["targets"]:
        target["mask"] = str(SAMPLE_MANIFEST.parent / target["mask"]) if target["mask"] else None
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps(case) + "\n")
    base = [sys.executable, "-m", "ibisagent.cli", "eval", str(manifest), "--policy", "bundled", "--max-turns", "1",
            "--max-new-tokens", "16"]
    quiet = subprocess.run([*base, "--out", str(tmp_path / "quiet"), "--no-progress"], capture_output=True, text=True,
                           timeout=300)
    assert (tmp_path / "quiet" / "results.json").is_file(), quiet.stderr
    assert "Loading weights" not in quiet.stderr and "it/s]" not in quiet.stderr, quiet.stderr
    shown = subprocess.run([*base, "--out", str(tmp_path / "shown")], capture_output=True, text=True, timeout=300)
    assert "Loading weights" in shown.stderr, shown.stderr


def _terminate(answer: str) -> str:
    return f"<think>\nNothing to segment.\n</think>\n<action>\nTerminate\n</action>\n<answer>\n{answer}\n</answer>"


@pytest.mark.parametrize(("answer", "code", "said"), [
    ("not present", 0, "the agent answered that it is absent"),
    ("The liver is not visible in this image.", 0, "the agent answered that it is absent"),
    ("The gallstone is not present in this image.", 1, "the agent did not say that liver is absent"),
    ("Done.", 1, "the agent did not say that liver is absent"),
])
def test_segment_says_why_a_mask_is_empty_and_fails_unless_the_target_was_declared_absent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], answer: str, code: int, said: str) -> None:
    from chat_server import ChatServer

    image = SAMPLE_MANIFEST.parent / "synthetic" / "ct_abdomen.png"
    out = tmp_path / "liver.png"
    with ChatServer("plain", turns=[_terminate(answer)]) as server:
        status = main(["segment", str(image), "--prompt", "Segment the liver.", "--policy",
                       f"openai:{server.url}#scripted", "--out", str(out)])
    err = capsys.readouterr().err
    assert out.is_file()  # the (empty) mask is written either way
    assert status == code, err
    assert "the mask of 'liver' is empty" in err and said in err and repr(answer) in err, err
