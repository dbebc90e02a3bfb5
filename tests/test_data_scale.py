"""The same per-case function on a local process pool and on a local Ray instance gives the same dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("datasets")

from ibisagent.cli import main  # noqa: E402
from ibisagent.data.rl import build_rl  # noqa: E402
from ibisagent.data.sft import build_sft  # noqa: E402
from test_data_sft import PIXELS, _files, _manifest  # noqa: E402


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("scale")
    manifest = _manifest(folder)
    trajectories = folder / "traj.jsonl"
    assert main(["simulate", str(manifest), "--out", str(trajectories), "--max-steps", "6", "--no-progress"]) == 0
    return manifest, trajectories


def _sft(simulated: tuple[Path, Path], out: Path, **kwargs) -> None:
    manifest, trajectories = simulated
    build_sft(trajectories, out, manifest=manifest, reflective=0.5, max_pixels=PIXELS, progress=False, **kwargs)


@pytest.mark.slow
def test_process_pool_gives_the_single_process_result(simulated, tmp_path: Path) -> None:
    _sft(simulated, tmp_path / "one")
    _sft(simulated, tmp_path / "pool", workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "pool")


@pytest.mark.slow
def test_ray_data_pipeline_gives_the_local_result(simulated, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    _sft(simulated, tmp_path / "local")
    build_rl(simulated[0], tmp_path / "rl-local", max_pixels=PIXELS, max_steps=6, progress=False)
    try:
        _sft(simulated, tmp_path / "ray", engine="ray", workers=2)
        build_rl(simulated[0], tmp_path / "rl-ray", max_pixels=PIXELS, max_steps=6, progress=False, engine="ray",
                 workers=2)
    finally:
        ray.shutdown()
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")
    assert _files(tmp_path / "rl-local") == _files(tmp_path / "rl-ray")
