"""Training for a running server: the MONAI Label train tasks run this module as a subprocess.

``python -m ibisagent.train.service sft|grpo --model-dir DIR --base SPEC [--corrections C] [--manifest M]…``

* ``sft``: the radiologists' corrections (trajectory records, ``corrections.jsonl``) plus any configured trajectory
  files become an SFT dataset (:func:`ibisagent.data.sft.build_sft`), and the current policy is fine-tuned on it;
* ``grpo``: GRPO (rollout mode) of the current policy on the configured manifests.

The run lives in ``DIR/ibisagent_runs/<mode>-<time>``; its ``progress.json`` (epoch, total epochs, best metric,
time) is what the train task reports while it runs. When it finishes, :func:`publish` points
``DIR/ibisagent_policy.json`` at the new policy; the app's next infer loads it (:func:`latest_policy`) without a
restart. A run that fails publishes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ibisagent.fileio import atomic_write_text

logger = logging.getLogger(__name__)

#: The file in the app's model folder naming the newest trained policy.
LATEST = "ibisagent_policy.json"


def latest_policy(model_dir: str | os.PathLike[str]) -> Path | None:
    """The newest policy a finished train task published under ``model_dir`` (``None`` if none or it is gone)."""
    marker = Path(model_dir) / LATEST
    if not marker.is_file():
        return None
    try:
        path = Path(json.loads(marker.read_text(encoding="utf-8"))["policy"])
    except (ValueError, KeyError, TypeError):
        logger.warning("%s is unreadable; ignoring it", marker)
        return None
    return path if (path / "config.json").is_file() else None


def publish(model_dir: str | os.PathLike[str], policy: str | os.PathLike[str], mode: str) -> Path:
    """Make ``policy`` the one the app's next infer uses (an atomic write of :data:`LATEST`)."""
    marker = Path(model_dir) / LATEST
    atomic_write_text(marker, json.dumps({"policy": str(Path(policy).resolve()), "mode": mode,
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    return marker


def base_model(spec: str) -> str:
    """A model directory for training from a policy spec (``hf:PATH``, ``bundled``, ``tiny`` or a path)."""
    from ibisagent.policies import bundled_policy_dir

    if spec.startswith("hf:"):
        return spec[3:]
    if spec == "bundled":
        return str(bundled_policy_dir())
    return spec


def run(mode: str, model_dir: Path, base: str, *, corrections: Sequence[Path] = (), manifests: Sequence[Path] = (),
        config: Path | None = None, minutes: float | None = None) -> Path:
    """One training run for the app (see the module docstring); returns the published policy directory."""
    from ibisagent.train.config import GRPORunConfig, SFTRunConfig, load_config

    out = model_dir / "ibisagent_runs" / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    overrides = {"model": base_model(base), "max_seconds": minutes * 60 if minutes else None}
    if mode == "sft":
        from ibisagent.data.sft import build_sft
        from ibisagent.data.trajectory import read_trajectories
        from ibisagent.env import read_observation
        from ibisagent.train.sft import run_sft

        records = [r for path in corrections if path.is_file() for r in read_trajectories(path)]
        if not records:
            raise ValueError(f"no trajectories to train on in {[str(p) for p in corrections]}")
        # the corrections are shown the way the policy being fine-tuned observes (e.g. the bundled one lists points)
        build_sft(records, out / "sft_data", history="off", progress=False,
                  show_points=bool(read_observation(overrides["model"]).get("show_points", False)))
        policy = run_sft(load_config(SFTRunConfig, config, overrides), out / "sft_data", out).policy
    elif mode == "grpo":
        from ibisagent.train.grpo import run_grpo

        if not manifests:
            raise ValueError("GRPO needs a manifest with ground truth (--conf train_manifest PATH)")
        policy, _ = run_grpo(load_config(GRPORunConfig, config, overrides), manifests[0], out, progress=False)
    else:
        raise ValueError(f"mode must be 'sft' or 'grpo', got {mode!r}")
    publish(model_dir, policy, mode)
    return policy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ibisagent.train.service", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("sft", "grpo"))
    parser.add_argument("--model-dir", type=Path, required=True, help="the app's model folder")
    parser.add_argument("--base", required=True, help="policy to start from (hf:PATH, bundled, tiny)")
    parser.add_argument("--corrections", type=Path, action="append", default=[], help="trajectory JSONL (repeatable)")
    parser.add_argument("--manifest", type=Path, action="append", default=[], help="manifest (GRPO; repeatable)")
    parser.add_argument("--config", type=Path, help="YAML run config")
    parser.add_argument("--minutes", type=float, help="time budget")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        policy = run(args.mode, args.model_dir, args.base, corrections=args.corrections, manifests=args.manifest,
                     config=args.config, minutes=args.minutes)
    except (OSError, ValueError) as exc:
        print(f"ibisagent training: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"policy": str(policy)}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
