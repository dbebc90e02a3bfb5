"""Run configs: the shipped YAML files load, an unknown key fails before training starts (library and CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ibisagent.train.config import ConfigError, GRPORunConfig, SFTRunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "training" / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cls = GRPORunConfig if name.startswith("grpo") else SFTRunConfig
    config = load_config(cls, ROOT / "training" / "configs" / name)
    assert config.learning_rate > 0


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nlerning_rate: 0.1\nlora:\n  rank: 4\n")
    with pytest.raises(ConfigError, match="lerning_rate"):
        load_config(SFTRunConfig, path)
    path.write_text("lora:\n  rank: 4\n")
    with pytest.raises(ConfigError, match="lora.rank"):
        load_config(SFTRunConfig, path)
    path.write_text("rewards: {format: 1, speed: 2}\n")
    with pytest.raises(ConfigError, match="speed"):
        load_config(GRPORunConfig, path)


def test_weight_decay_reaches_the_trainer_and_a_negative_one_is_refused(tmp_path):
    from trl import GRPOConfig, SFTConfig

    from ibisagent.train.common import training_arguments

    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nweight_decay: 0.05\n")
    for cls, trl_cls in ((SFTRunConfig, SFTConfig), (GRPORunConfig, GRPOConfig)):
        config = load_config(cls, path)
        assert trl_cls(**training_arguments(config, tmp_path / "out")).weight_decay == 0.05
    assert SFTConfig(**training_arguments(SFTRunConfig(), tmp_path / "out")).weight_decay == 0.0
    path.write_text("weight_decay: -0.1\n")
    with pytest.raises(ConfigError, match="weight_decay"):
        load_config(SFTRunConfig, path)


def test_cli_rejects_an_unknown_key_before_training(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nepochz: 3\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib")}
    proc = subprocess.run([sys.executable, "-m", "ibisagent.cli", "train", "sft", "--config", str(path), "--data",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "epochz" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_split_by_image_keeps_every_image_on_one_side():
    from ibisagent.train.recipe import split_by_image

    lines = [{"id": f"{img}-{k}", "image": f"/d/{img}.png"} for img in "abcdefghij" for k in range(2)]
    train, test = split_by_image(lines, 0.2, seed=0)
    assert len(test) == 4 and set(train).isdisjoint(test) and len(train) + len(test) == 20
    test_images = {t.split("-")[0] for t in test}
    assert all(t.split("-")[0] not in test_images for t in train)


def test_cli_grpo_anchor_from_overrides_the_config_and_a_missing_file_stops_it_before_training(tmp_path):
    """``train grpo --anchor-from`` reaches the run config (checked like a YAML key): a file that is not there is named
    and nothing starts."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib")}
    missing = tmp_path / "anchor_modes.json"
    proc = subprocess.run([sys.executable, "-m", "ibisagent.cli", "train", "grpo", "--manifest",
                           str(ROOT / "sample_data" / "manifest.jsonl"), "--out", str(tmp_path / "out"),
                           "--anchor-from", str(missing)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and f"anchor_from: no such file: {missing}" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
