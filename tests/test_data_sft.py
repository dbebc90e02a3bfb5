"""build-sft / build-rl end to end on small real files: simulated expert → environment → datasets / parquet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

datasets = pytest.importorskip("datasets")

from ibisagent.cli import main  # noqa: E402
from ibisagent.data.reasoning import leaks  # noqa: E402
from ibisagent.data.reflect import ReflectiveRatios  # noqa: E402
from ibisagent.data.sft import build_sft  # noqa: E402
from ibisagent.data.trajectory import read_trajectories, write_trajectories  # noqa: E402
from ibisagent.observation import qwen_grid, resize_image  # noqa: E402
from ibisagent.prompts import load_prompts  # noqa: E402
from ibisagent.protocol import format_action, parse_response  # noqa: E402

#: A small policy image budget keeps the rows small (the grid is still Qwen's smart resize).
PIXELS = 64 * 64


def _png(path: Path, array: np.ndarray) -> str:
    PILImage.fromarray(array).save(path)
    return path.name


def _manifest(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :128]
    disc = (yy - 40) ** 2 + (xx - 45) ** 2 < 18**2
    square = (abs(yy - 62) < 12) & (abs(xx - 100) < 14)
    image = np.clip(60 + 120 * disc + 80 * square + rng.normal(0, 8, disc.shape), 0, 255).astype(np.uint8)
    img = _png(folder / "img.png", image)
    m_disc = _png(folder / "disc.png", (disc * 255).astype(np.uint8))
    m_square = _png(folder / "square.png", (square * 255).astype(np.uint8))
    initial = np.roll(disc, 6, axis=1) | ((yy - 40) ** 2 + (xx - 70) ** 2 < 6**2)
    m_init = _png(folder / "initial.png", (initial * 255).astype(np.uint8))
    lines = [
        {"id": "disc", "image": img, "modality": "CT", "instruction": "Segment the disc.",
         "targets": [{"name": "disc", "mask": m_disc}]},
        {"id": "square", "image": img, "modality": "MR", "instruction": "Segment the square.",
         "targets": [{"name": "square", "mask": m_square}]},
        {"id": "two", "image": img, "modality": "MR", "instruction": "Segment the disc and the square.",
         "targets": [{"name": "disc", "mask": m_disc}, {"name": "square", "mask": m_square}]},
        {"id": "absent", "image": img, "modality": "CT", "instruction": "Segment the tumour.",
         "targets": [{"name": "tumour", "mask": None}]},
        {"id": "refine", "image": img, "modality": "CT", "instruction": "Refine the disc.",
         "targets": [{"name": "disc", "mask": m_disc}], "initial_mask": m_init},
        {"id": "vqa", "image": img, "modality": "CT", "instruction": "Is there a bright disc? Answer yes or no.",
         "targets": [], "answer": "yes"},
    ]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The manifest and the trajectories `ibisagent simulate` writes for it."""
    folder = tmp_path_factory.mktemp("sft-data")
    manifest = _manifest(folder)
    trajectories = folder / "traj.jsonl"
    assert main(["simulate", str(manifest), "--out", str(trajectories), "--max-steps", "8", "--no-progress"]) == 0
    return manifest, trajectories


def _build(simulated: tuple[Path, Path], out: Path, **kwargs) -> dict:
    manifest, trajectories = simulated
    kwargs.setdefault("manifest", manifest)
    return build_sft(trajectories, out, max_pixels=PIXELS, progress=False, **kwargs)


def _rows(out: Path) -> tuple[object, list[dict]]:
    dataset = datasets.load_from_disk(str(out))
    meta = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(meta) == len(dataset)
    return dataset, meta


def _assistant_texts(row: dict) -> list[tuple[str, bool]]:
    return [(m["content"][0]["text"], m["train"]) for m in row["messages"] if m["role"] == "assistant"]


@pytest.mark.parametrize("history", ["off", "full"])
def test_dataset_opens_with_messages_and_images_in_placeholder_order(simulated, tmp_path: Path, history: str) -> None:
    stats = _build(simulated, tmp_path / "sft", history=history, reflective=1.0)
    dataset, meta = _rows(tmp_path / "sft")
    assert set(dataset.column_names) == {"messages", "images"}
    assert len(dataset) == stats["rows"] > 0
    assert stats["samples"] == 5  # every segmentation case of the manifest (the VQA case has no trajectory)
    assert stats["self_correction"] >= 1 and stats["inconsistency"] >= 1
    for row in dataset:
        placeholders = sum(p["type"] == "image" for m in row["messages"] for p in m["content"])
        assert placeholders == len(row["images"]) >= 1
        assert row["messages"][0]["role"] == "system" and row["messages"][-1]["role"] == "assistant"
        assert row["messages"][-1]["train"] is True
        assert all(not m["train"] for m in row["messages"] if m["role"] != "assistant")
        for text, _ in _assistant_texts(row):
            response = parse_response(text)  # every turn is in the action grammar
            assert leaks(response.think) == [] and leaks(response.answer or "") == [], text
    if history == "full":
        assert len(dataset) == stats["samples"] + stats["self_correction"] + stats["inconsistency"]
    kinds = {m["kind"] for m in meta}
    assert kinds == {"expert", "self_correction", "inconsistency"}


def test_listed_points_are_the_expert_clicks_so_far_and_the_dataset_records_it(simulated, tmp_path: Path) -> None:
    from ibisagent.env import read_observation

    _build(simulated, tmp_path / "points", history="full", show_points=True)
    assert read_observation(tmp_path / "points") == {"show_points": True}  # SFT carries it into the policy
    dataset, meta = _rows(tmp_path / "points")
    checked = 0
    for row, info in zip(dataset, meta):
        if info["kind"] != "expert":
            continue
        placed: list[str] = []
        for message in row["messages"][1:]:
            if message["role"] == "assistant":
                placed += [format_action(a) for a in parse_response(message["content"][0]["text"]).clicks]
                continue
            text = message["content"][-1]["text"]
            if placed:  # every refinement turn lists exactly the expert's clicks before it
                assert text.splitlines()[-1] == f"Points so far: {'; '.join(placed)}.", text
                checked += 1
            else:
                assert "Points so far" not in text
    assert checked >= 4  # the refinement turns of the five expert episodes
    _build(simulated, tmp_path / "plain", history="off")
    assert read_observation(tmp_path / "plain") == {"show_points": False}
    plain, _ = _rows(tmp_path / "plain")
    assert not any("Points so far" in p["text"] for row in plain for m in row["messages"] for p in m["content"]
                   if p["type"] == "text")


def test_not_trained_flag_lands_on_exactly_the_wrong_turns(simulated, tmp_path: Path) -> None:
    _build(simulated, tmp_path / "full", history="full", reflective=1.0)
    dataset, meta = _rows(tmp_path / "full")
    expert_actions = {}
    for row, info in zip(dataset, meta):
        if info["kind"] == "expert":
            expert_actions[info["id"]] = {parse_response(t).actions for t, _ in _assistant_texts(row)}
    seen = {"self_correction": 0, "inconsistency": 0}
    for row, info in zip(dataset, meta):
        turns = _assistant_texts(row)
        untrained = [i for i, (_, trained) in enumerate(turns) if not trained]
        if info["kind"] == "expert":
            assert untrained == []
        elif info["kind"] == "self_correction":
            assert len(untrained) == 1
            wrong = untrained[0]
            wrong_actions = parse_response(turns[wrong][0]).actions
            assert len(wrong_actions) == 1 and wrong_actions[0].is_click
            assert wrong_actions not in expert_actions[info["id"]]  # a click the expert never made
            assert [a.kind for a in parse_response(turns[wrong + 1][0]).actions] == ["undo"]
            # after the Undo the expert trajectory goes on, trained
            rest = [parse_response(t).actions for t, _ in turns[wrong + 2:]]
            assert all(actions in expert_actions[info["id"]] for actions in rest[:-1])
        else:
            assert untrained == []
            assert [a.kind for a in parse_response(turns[0][0]).actions] == ["reset"]
            first_user = next(m for m in row["messages"] if m["role"] == "user")
            # it starts from the wrong mask's overlay with a refinement prompt, not from the plain first turn
            assert "No mask has been drawn yet" not in first_user["content"][-1]["text"]
        if info["kind"] != "expert":
            seen[info["kind"]] += 1
    assert seen["self_correction"] >= 1 and seen["inconsistency"] >= 1

    _build(simulated, tmp_path / "off", history="off", reflective=1.0)
    dataset, meta = _rows(tmp_path / "off")
    for row, info in zip(dataset, meta):
        turns = _assistant_texts(row)
        # no history: one trained turn per row; an Undo row keeps the wrong click it answers as untrained context
        kinds = [a.kind for a in parse_response(turns[-1][0]).actions]
        assert turns[-1][1] is True
        if info["kind"] == "self_correction":
            assert kinds == ["undo"] and len(turns) == 2 and turns[0][1] is False
            wrong = parse_response(turns[0][0]).actions
            assert len(wrong) == 1 and wrong[0].is_click
            images = sum(p["type"] == "image" for m in row["messages"] for p in m["content"])
            assert images == len(row["images"]) == 2  # the overlay before the wrong click and the one it produced
        else:
            assert len(turns) == 1
            if info["kind"] == "inconsistency":
                assert kinds == ["reset"]


def test_rows_are_the_environment_observations(simulated, tmp_path: Path) -> None:
    """The user turns and images are what the environment shows a policy at inference (one code path)."""
    manifest, trajectories = simulated
    _build(simulated, tmp_path / "sft", history="off", instruction_ratio=0.0, refinement_ratio=0.0)
    dataset, meta = _rows(tmp_path / "sft")
    prompts = load_prompts()
    record = next(r for r in read_trajectories(trajectories) if r.id == "disc")
    image = np.asarray(PILImage.open(manifest.parent / "img.png").convert("L"))
    first = next(row for row, info in zip(dataset, meta) if info["id"] == "disc" and info["step"] == 0)
    assert first["messages"][0]["content"][0]["text"] == prompts.system
    assert first["messages"][1]["content"][-1]["text"] == prompts.first_turn(record.instruction, ("disc",))
    from ibisagent.imaging import to_display_rgb

    rgb = to_display_rgb(image, "CT")
    expected = resize_image(rgb, qwen_grid(96, 128, max_pixels=PIXELS))
    assert np.array_equal(np.asarray(first["images"][0].convert("RGB")), expected)
    second = next(row for row, info in zip(dataset, meta) if info["id"] == "disc" and info["step"] == 1)
    assert second["messages"][1]["content"][-1]["text"] == prompts.refine_turn(record.instruction, ("disc",))
    from ibisagent.data.trajectory import rle_decode
    from ibisagent.observation import observation_image

    overlay = observation_image(expected, [rle_decode(record.steps[0].mask)])
    assert np.array_equal(np.asarray(second["images"][0].convert("RGB")), overlay)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_fixed_seed_gives_byte_identical_output(simulated, tmp_path: Path) -> None:
    _build(simulated, tmp_path / "a", reflective=0.5, seed=3)
    _build(simulated, tmp_path / "b", reflective=0.5, seed=3)
    _build(simulated, tmp_path / "c", reflective=0.5, seed=4)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert "data-00000-of-00001.arrow" in a and "state.json" in a
    assert a == b
    assert a["data-00000-of-00001.arrow"] != c["data-00000-of-00001.arrow"]


def test_filters_bad_input_and_replay_checks_are_reported(simulated, tmp_path: Path) -> None:
    manifest, trajectories = simulated
    records = list(read_trajectories(trajectories))
    missing = records[0].__class__.from_dict({**json.loads(records[0].to_json()), "id": "gone",
                                              "image": str(tmp_path / "nowhere.png")})
    corrupt_path = tmp_path / "corrupt.png"
    corrupt_path.write_bytes(b"not a png at all")
    corrupt = records[0].__class__.from_dict({**json.loads(records[0].to_json()), "id": "corrupt",
                                              "image": str(corrupt_path)})
    tampered_data = json.loads(records[0].to_json())
    tampered_data["id"] = "tampered"
    tampered_data["steps"][0]["mask"] = {"size": tampered_data["steps"][0]["mask"]["size"],
                                         "counts": [96 * 128]}  # an empty mask the tool never produced
    tampered = records[0].__class__.from_dict(tampered_data)
    path = tmp_path / "traj.jsonl"
    write_trajectories(path, [*records, missing, corrupt, tampered])
    stats = build_sft(path, tmp_path / "sft", max_pixels=PIXELS, progress=False)
    report = [json.loads(line) for line in (tmp_path / "sft" / "report.jsonl").read_text().splitlines()]
    reasons = {r["id"]: r for r in report}
    assert reasons["gone"]["kind"] == "skipped" and "nowhere.png" in reasons["gone"]["reason"]
    assert reasons["corrupt"]["kind"] == "skipped" and "corrupt.png" in reasons["corrupt"]["reason"]
    assert reasons["tampered"]["kind"] == "skipped" and "differs from the record" in reasons["tampered"]["reason"]
    # without the manifest the refinement case cannot be replayed: skipped, not silently changed
    assert "differs from the record" in reasons["refine"]["reason"]
    assert stats["skipped"] == 4 and stats["samples"] == 4
    _, meta = _rows(tmp_path / "sft")
    assert {m["id"] for m in meta} == {"disc", "square", "two", "absent"}

    stats = build_sft(trajectories, tmp_path / "short", max_pixels=PIXELS, progress=False, max_steps=0,
                      manifest=manifest)
    _, meta = _rows(tmp_path / "short")
    assert {m["id"] for m in meta} == {"absent"}  # the only trajectory without a click
    report = [json.loads(line) for line in (tmp_path / "short" / "report.jsonl").read_text().splitlines()]
    assert {r["id"] for r in report if r["kind"] == "filtered"} == {"disc", "square", "two", "refine"}
    assert stats["filtered"] == 4
    stats = build_sft(trajectories, tmp_path / "dice", max_pixels=PIXELS, progress=False, min_dice=0.999,
                      manifest=manifest)
    assert stats["filtered"] >= 1 and stats["samples"] + stats["filtered"] == 5


def test_llamafactory_export(simulated, tmp_path: Path) -> None:
    _build(simulated, tmp_path / "sft", history="full", reflective=1.0, llamafactory=True)
    export = tmp_path / "sft" / "llamafactory"
    rows = json.loads((export / "ibisagent_sft.json").read_text())
    info = json.loads((export / "dataset_info.json").read_text())
    assert info["ibisagent_sft"]["formatting"] == "sharegpt"
    dataset, meta = _rows(tmp_path / "sft")
    assert len(rows) == sum(1 for m in meta if m["kind"] != "self_correction")  # untrained turns cannot be exported
    for row in rows:
        assert sum(m["content"].count("<image>") for m in row["messages"]) == len(row["images"])
        assert all((export / p).is_file() for p in row["images"])


def test_killed_run_resumes_to_the_same_result(simulated, tmp_path: Path) -> None:
    manifest, trajectories = simulated
    _build(simulated, tmp_path / "whole", reflective=0.5)
    out = tmp_path / "resumed"
    code = (f"from ibisagent.data.sft import build_sft; build_sft({str(trajectories)!r}, {str(out)!r}, "
            f"reflective=0.5, manifest={str(manifest)!r}, max_pixels={PIXELS}, progress=False)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "lib"))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((out / ".work").glob("0*.pkl")):
        assert proc.poll() is None, "the build ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / ".work").glob("0*.pkl")))
    assert 1 <= done < 5 and not (out / "state.json").exists()
    _build(simulated, out, reflective=0.5)
    assert _files(out) == _files(tmp_path / "whole")
    with pytest.raises(ValueError, match="other settings"):
        _build(simulated, out, reflective=0.5, seed=9)


def test_cli_build_sft_and_build_rl(simulated, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest, trajectories = simulated
    out = tmp_path / "sft"
    assert main(["build-sft", str(trajectories), "--out", str(out), "--manifest", str(manifest), "--reflective", "1",
                 "--max-pixels", str(PIXELS), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| CT |" in printed and "| MR |" in printed and "QAs" in printed
    assert datasets.load_from_disk(str(out)).num_rows > 0

    rl = tmp_path / "rl"
    assert main(["build-rl", str(manifest), "--out", str(rl), "--max-pixels", str(PIXELS), "--max-steps", "6",
                 "--verl", "--no-progress"]) == 0
    step = datasets.load_dataset("parquet", data_files=str(rl / "step.parquet"), split="train")
    rollout = datasets.load_dataset("parquet", data_files=str(rl / "rollout.parquet"), split="train")
    vqa = datasets.load_dataset("parquet", data_files=str(rl / "vqa.parquet"), split="train")
    assert set(step["mode"]) == {"step"} and set(rollout["mode"]) == {"rollout"} and vqa["answer"] == ["yes"]
    assert sorted(rollout["id"]) == ["absent", "disc", "refine", "square", "two"]
    disc = [r for r in step if r["id"] == "disc"]
    assert [r["step"] for r in disc] == list(range(len(disc))) and len(disc) >= 2
    assert disc[0]["previous_iou"] == [0.0] and json.loads(disc[0]["clicks"]) == []
    assert disc[-1]["expert_action"] == "Terminate" and disc[-1]["previous_iou"][0] >= 0.9
    assert len(json.loads(disc[1]["clicks"])) == 1
    for row in step:
        placeholders = sum(p["type"] == "image" for m in row["prompt"] for p in m["content"])
        assert placeholders == len(row["images"]) == 1
        assert len(json.loads(row["ground_truth"])) == len(row["targets"])
    refine = [r for r in step if r["id"] == "refine"]
    assert refine[0]["previous_iou"][0] > 0  # starts from the initial mask
    assert rollout.filter(lambda r: r["id"] == "refine")[0]["initial_mask"] != "null"
    verl = datasets.load_dataset("parquet", data_files=str(rl / "verl" / "step.parquet"), split="train")
    assert len(verl) == len(step) and verl[0]["reward_model"]["style"] == "rule"
    assert "<image>" in verl[0]["prompt"][1]["content"]


def test_build_rl_skips_bad_cases_with_the_reason(simulated, tmp_path: Path) -> None:
    manifest, _ = simulated
    bad = tmp_path / "bad.jsonl"
    lines = manifest.read_text().splitlines()[:1]
    entry = json.loads(lines[0])
    lines.append(json.dumps({**entry, "id": "missing", "image": str(tmp_path / "nowhere.png")}))
    lines.append("{not json")
    entry = {**entry, "image": str(manifest.parent / "img.png")}
    entry["targets"] = [{"name": "disc", "mask": str(manifest.parent / "disc.png")}]
    bad.write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
    from ibisagent.data.rl import build_rl

    stats = build_rl(bad, tmp_path / "rl", modes=["rollout"], max_pixels=PIXELS, progress=False)
    assert stats["rows"] == {"rollout": 1} and stats["skipped"] == 2
    report = (tmp_path / "rl" / "report.jsonl").read_text()
    assert "nowhere.png" in report and "not valid JSON" in report


def test_build_rl_says_why_a_mode_wrote_no_file(simulated, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    manifest, _ = simulated
    entry = json.loads(manifest.read_text().splitlines()[0])
    assert "answer" not in entry
    entry["image"] = str(manifest.parent / entry["image"])
    for target in entry["targets"]:
        target["mask"] = str(manifest.parent / target["mask"]) if target["mask"] else None
    plain = tmp_path / "no_answers.jsonl"
    plain.write_text(json.dumps(entry) + "\n")
    out = tmp_path / "rl"
    assert main(["build-rl", str(plain), "--out", str(out), "--modes", "rollout", "vqa", "--max-pixels", str(PIXELS),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (out / "rollout.parquet").is_file() and not (out / "vqa.parquet").exists()
    assert "no vqa.parquet: no case has an 'answer'" in printed, printed
    assert "vqa" in json.loads((out / "stats.json").read_text())["empty"]


def test_recorded_masks_replay_without_the_tool(simulated, tmp_path: Path) -> None:
    """Trajectories of a tool this machine cannot run (a GPU checkpoint) replay from their recorded masks: the same
    conversations as replaying with the tool itself."""
    manifest, trajectories = simulated
    _build(simulated, tmp_path / "tool", tool="embedded", reflective=ReflectiveRatios(0.0, 1.0))
    records = []
    for record in read_trajectories(trajectories):
        record.tool = "medsam2"  # not loadable here
        records.append(record)
    stats = build_sft(records, tmp_path / "recorded", manifest=manifest, max_pixels=PIXELS, progress=False,
                      reflective=ReflectiveRatios(0.0, 1.0))
    assert stats["samples"] == 5 and stats["inconsistency"] >= 1
    a, _ = _rows(tmp_path / "tool")
    b, _ = _rows(tmp_path / "recorded")
    assert a.to_dict() == b.to_dict()
    stats = build_sft(records, tmp_path / "wrong", manifest=manifest, max_pixels=PIXELS, progress=False,
                      reflective=ReflectiveRatios(1.0, 0.0))
    assert stats["self_correction"] == 0  # a wrong click needs the tool's answer
    assert "self-correction needs a tool" in (tmp_path / "wrong" / "report.jsonl").read_text()


def test_a_build_without_rows_says_why(simulated, tmp_path: Path) -> None:
    manifest, trajectories = simulated
    with pytest.raises(ValueError, match="no SFT rows: all 5 case"):
        build_sft(trajectories, tmp_path / "none", manifest=manifest, min_dice=1.01, max_pixels=PIXELS,
                  progress=False)
    report = (tmp_path / "none" / "report.jsonl").read_text().splitlines()
    assert len(report) == 5 and all(json.loads(line)["kind"] == "filtered" for line in report)
