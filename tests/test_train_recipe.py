"""The one-command recipe end to end on a CPU (``ibisagent train tiny``): split by image, augmented variants, expert
trajectories, SFT data, SFT, GRPO, held-out evaluation beside the image-blind baseline; a killed run resumes with the
same stage budgets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ibisagent.data.manifest import click_anchor_modes
from ibisagent.env import read_observation
from ibisagent.train.recipe import ANCHOR_CLICKS, ANCHOR_MODES, EXPERT_MAX_CLICKS
from train_data import write_manifest

pytest.importorskip("trl")


@pytest.mark.slow
def test_train_tiny_writes_a_policy_and_a_report_and_a_restart_keeps_the_recorded_budget(tmp_path):
    manifest = write_manifest(tmp_path / "data", cases=10)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "ibisagent.cli", "train", "tiny", str(manifest), "--out", str(out),
               "--minutes", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert split["by"] == "image" and split["test"] and not set(split["test"]) & set(split["train"])
    # a share of the training images validates the choice of the stage shipped; the test never chooses
    assert split["validation"] and not set(split["validation"]) & (set(split["train"]) | set(split["test"]))
    selected = report["selected"]
    rewards = selected["validation_reward"]
    assert selected["validation_cases"] == len(split["validation"]) and set(rewards) == {"sft", "grpo"}
    assert selected["stage"] == max(rewards, key=lambda stage: (rewards[stage], stage == "grpo"))
    shipped = (out / selected["stage"] / "policy" / "model.safetensors").read_bytes()
    assert (out / "policy" / "model.safetensors").read_bytes() == shipped
    for stage in ("after_sft", "after_grpo"):
        # every held-out case is evaluated: scored, or counted as the agent's error (a minute of training on a busy
        # machine may not yet teach the format, and eval records such a case as an error rather than a score)
        assert report[stage]["samples"] + report[stage]["errors"] == len(split["test"])
        assert 0.0 <= report[stage]["format_valid"] <= 1.0 and "reward" in report[stage]
    assert report["baseline_image_blind"]["targets"] >= 1
    # the expert's first clicks were anchored where each target name is most often found in the training masks
    anchors = json.loads((out / "anchors.json").read_text())
    assert anchors and report["data"]["anchors"] == anchors
    # over the real training cases, not their augmented variants (whose shifts and flips move the targets)
    real = {name: found[0].anchor for name, found in click_anchor_modes(out / "train.jsonl", 1).items()}
    assert anchors == {name: pytest.approx(list(xy)) for name, xy in real.items()}
    # beside the mean-click baseline, the blind click at each anchor (what a policy that ignores the image learns)
    assert report["baseline_image_blind"]["anchor"]["targets"] == report["baseline_image_blind"]["targets"]
    assert all(0.0 <= v <= 1.0 for xy in anchors.values() for v in xy)
    # and each name's appearance modes (the expert takes the anchor of the one the image is nearest)
    modes = json.loads((out / "anchor_modes.json").read_text())
    assert set(modes) == set(anchors) and all(1 <= len(found) <= ANCHOR_MODES for found in modes.values())
    assert report["data"]["anchor_modes"] == {name: [m["anchor"] for m in found] for name, found in modes.items()}
    assert report["sft"]["steps"] > 0 and report["sft"]["last_loss"] < report["sft"]["first_loss"]
    assert report["grpo"]["steps"] > 0
    # GRPO's rows were made by the SFT data's expert: the same anchors, anchored clicks and click budget
    grpo_config = json.loads((out / "grpo" / "grpo_config.json").read_text())
    assert grpo_config["anchor_from"] == str(out / "anchor_modes.json")
    assert grpo_config["anchor_clicks"] == ANCHOR_CLICKS and grpo_config["expert_max_clicks"] == EXPERT_MAX_CLICKS
    assert (out / "curves.png").stat().st_size > 0 and (out / "policy" / "config.json").is_file()
    assert (out / "eval_sft" / "trajectories.jsonl").is_file()  # the held-out clicks, to look at
    # the policy lists its points in refinement turns (SFT rows, GRPO) and says so, so `hf:` runs it that way
    assert report["data"]["show_points"] is True
    assert read_observation(out / "sft_data") == read_observation(out / "policy") == {"show_points": True}
    first_budget = report["budget"]

    recorded = json.loads((out / "budget.json").read_text())
    assert recorded["sft_s"] == pytest.approx(first_budget["sft_budget_s"], abs=0.1)

    # a killed run started again: finished stages are skipped, and the stage split is the recorded one (its
    # preparation, cached now, would otherwise leave a different split); marked here so that it can be told apart
    (out / "budget.json").write_text(json.dumps({**recorded, "sft_s": 47.0, "grpo_s": 13.0}))
    (out / "report.json").unlink()
    shutil.rmtree(out / "eval_grpo")
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["budget"]["sft_budget_s"] == 47.0 and report["budget"]["grpo_budget_s"] == 13.0
    assert report["budget"]["sft_s"] < 30 and report["budget"]["grpo_s"] < 30  # no stage trained again
