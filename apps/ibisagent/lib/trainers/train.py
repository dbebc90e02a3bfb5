"""Train tasks over the collected corrections: ``ibisagent_sft`` (cold-start SFT) and ``ibisagent_grpo`` (agentic RL).

The training entry points (``ibisagent.train``) are not written yet: a train request fails with a message saying so.
It never reports a success it did not have.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)


class TrainingUnavailable(RuntimeError):
    """Training was requested but the training code it needs is not there."""


class IbisAgentTrain(TrainTask):
    """``mode`` is ``"sft"`` or ``"grpo"``; data is the corrections file (``corrections.jsonl``)."""

    def __init__(self, mode: str, corrections: Path, stats_dir: Path, options: dict[str, Any]) -> None:
        super().__init__(f"IBISAgent {mode.upper()} on the radiologists' corrections ({corrections.name})")
        self.mode = mode
        self.corrections = corrections
        self.stats_file = stats_dir / f"train_stats_{mode}.json"
        self.options = options
        self._config = {"max_epochs": 1, "policy": options.get("policy", ""), "tool": options.get("tool", "")}

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def stats(self) -> dict[str, Any]:
        """``epoch``, ``total_epochs``, ``best_metric``, ``total_time`` (what Slicer and OHIF show), from the last
        run's stats file; zeros when nothing was trained."""
        stats: dict[str, Any] = {"epoch": 0, "total_epochs": self._config["max_epochs"], "best_metric": 0.0,
                                 "total_time": "0:00:00", "trained": False}
        if self.stats_file.is_file():
            try:
                stats.update(json.loads(self.stats_file.read_text(encoding="utf-8")))
            except ValueError:
                logger.warning("%s: unreadable train stats", self.stats_file)
        return stats

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        params = {**self._config, **{k: v for k, v in request.items() if k != "model"}}
        from ibisagent.corrections import CorrectionStore

        n = CorrectionStore(self.corrections).count()
        logger.info("ibisagent_%s requested with %s on %d corrections", self.mode, params, n)
        if importlib.util.find_spec("ibisagent.train") is None:
            raise TrainingUnavailable(
                f"ibisagent_{self.mode}: training is not available in this version: the training entry points "
                f"(ibisagent.train) are not implemented yet. {n} correction(s) are collected in {self.corrections} "
                "and will be used once they are."
            )
        raise TrainingUnavailable(
            f"ibisagent_{self.mode}: ibisagent.train exists but this app does not call it yet; run training from the "
            f"command line on {self.corrections}."
        )
