"""Train tasks over the collected corrections: ``ibisagent_sft`` (cold-start SFT) and ``ibisagent_grpo`` (agentic RL).

Each request runs :mod:`ibisagent.train.service` as a subprocess (MONAI Label stops it by stopping the train process,
whose process group it shares). While it runs, :meth:`IbisAgentTrain.stats` reports the run's ``progress.json``
(epoch, total epochs, best metric, time) so Slicer shows progress; when it finishes, the new policy is published in
the model folder and the next infer uses it without a restart. Failures are reported, never faked as success.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """The training subprocess failed; the message carries its last output."""


class IbisAgentTrain(TrainTask):
    """``mode`` is ``"sft"`` or ``"grpo"``; data is the corrections file (``corrections.jsonl``) plus the configured
    ``train_trajectories`` (SFT) or ``train_manifest`` (GRPO). ``options``: the app's options as the server uses them;
    ``public``: the same as clients may see them (:meth:`Options.public_info`), shown in the task's config."""

    def __init__(self, mode: str, corrections: Path, model_dir: Path, options: dict[str, Any],
                 public: dict[str, Any] | None = None) -> None:
        data = (f"the radiologists' corrections ({corrections.name}) and --conf train_trajectories" if mode == "sft"
                else "the ground-truth manifests of --conf train_manifest")
        super().__init__(f"IBISAgent {mode.upper()} on {data}")
        self.mode = mode
        self.corrections = corrections
        self.model_dir = model_dir
        self.options = options
        shown = options if public is None else public  # what clients see in /info: no checkpoint paths
        self._config = {"max_epochs": 1, "policy": shown.get("policy", ""), "tool": shown.get("tool", ""),
                        "minutes": options.get("train_minutes", 0)}

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def _runs(self) -> list[Path]:
        folder = self.model_dir / "ibisagent_runs"
        return sorted(folder.glob(f"{self.mode}-*")) if folder.is_dir() else []

    def stats(self) -> dict[str, Any]:
        """``epoch``, ``total_epochs``, ``best_metric``, ``total_time`` of the newest run (zeros before any)."""
        stats: dict[str, Any] = {"epoch": 0, "total_epochs": self._config["max_epochs"], "best_metric": 0.0,
                                 "total_time": "0:00:00", "trained": False}
        runs = self._runs()
        progress = runs[-1] / "progress.json" if runs else None
        if progress is not None and progress.is_file():
            try:
                stats.update(json.loads(progress.read_text(encoding="utf-8")))
                stats["trained"] = (runs[-1] / "policy" / "config.json").is_file()
            except ValueError:
                logger.warning("%s: unreadable progress", progress)
        if stats.get("total_epochs") is None:
            stats["total_epochs"] = self._config["max_epochs"]
        return stats

    def command(self, request: dict[str, Any]) -> list[str]:
        """The subprocess command line for a request."""
        from ibisagent.train.service import latest_policy

        latest = latest_policy(self.model_dir)
        base = f"hf:{latest}" if latest is not None else (self.options.get("policy") or "bundled")
        cmd = [sys.executable, "-m", "ibisagent.train.service", self.mode, "--model-dir", str(self.model_dir),
               "--base", base, "--corrections", str(self.corrections)]
        for path in filter(None, str(self.options.get("train_trajectories", "")).split(",")):
            cmd += ["--corrections", path]
        for path in filter(None, str(self.options.get("train_manifest", "")).split(",")):
            cmd += ["--manifest", path]
        minutes = request.get("minutes", self._config["minutes"])
        if minutes:
            cmd += ["--minutes", str(minutes)]
        return cmd

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        cmd = self.command(request)
        logger.info("ibisagent_%s: %s", self.mode, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "")[-2000:]
            raise TrainingFailed(f"ibisagent_{self.mode} failed (exit {proc.returncode}): {tail}")
        return self.stats()
