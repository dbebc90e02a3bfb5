"""Training for a running server: a train run on trajectory records publishes its policy, and the app's runtime
switches to it on the next infer without a restart."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from train_data import write_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_service_trains_on_trajectories_and_the_app_picks_up_the_policy(tmp_path, monkeypatch):
    import shutil

    from ibisagent.data.trajectory import write_trajectories
    from ibisagent.env import read_observation, write_observation
    from ibisagent.evaluate import run_oracle
    from ibisagent.policies.tiny import ensure_tiny_model
    from ibisagent.tools import load_tool
    from ibisagent.train.service import latest_policy, main

    manifest = write_manifest(tmp_path / "data", cases=1, absent=False)
    records, _ = run_oracle(manifest, load_tool("embedded"), progress=False)
    corrections = write_trajectories(tmp_path / "corrections.jsonl", records)
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 1\nlora:\n  enabled: false\n")
    model_dir = tmp_path / "model"
    model_dir.mkdir()

    monkeypatch.syspath_prepend(str(ROOT / "apps" / "ibisagent"))
    from lib.infers.common import Options, Runtime

    runtime = Runtime(Options(policy="tiny"), model_dir)
    assert runtime.policy_spec() == "tiny" and latest_policy(model_dir) is None

    base = tmp_path / "base"  # a policy trained with the points listed (as the bundled one)
    shutil.copytree(ensure_tiny_model(tmp_path / "cache"), base)
    write_observation(base, {"show_points": True})
    assert main(["grpo", "--model-dir", str(model_dir), "--base", f"hf:{base}"]) == 2  # no manifest: clear failure
    assert latest_policy(model_dir) is None  # a failed run publishes nothing
    assert main(["sft", "--model-dir", str(model_dir), "--base", f"hf:{base}", "--corrections", str(corrections),
                 "--config", str(config)]) == 0
    trained = latest_policy(model_dir)
    assert trained is not None and trained.parent.parent.name == "ibisagent_runs"
    assert runtime.policy_spec() == f"hf:{trained}"
    assert runtime.policy().name == f"hf:{trained}"
    # the corrections were shown the way the base observes, and the fine-tuned policy keeps observing so
    assert read_observation(trained.parent / "sft_data") == read_observation(trained) == {"show_points": True}
    sys.modules.pop("lib.infers.common", None)
