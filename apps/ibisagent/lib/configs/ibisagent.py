"""The IBISAgent model: infer tasks ``ibisagent`` and ``ibisagent_clicks``, train tasks ``ibisagent_sft`` and
``ibisagent_grpo``. Nothing heavy is built here: the policy and the tool load on the first infer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monailabel.interfaces.config import TaskConfig

from ibisagent.corrections import AgentOutputStore

from lib.infers import IbisAgentInfer, IbisClicksInfer, Options, Runtime
from lib.trainers import IbisAgentTrain


class IbisAgentConfig(TaskConfig):
    """Wires :mod:`ibisagent` into MONAI Label. ``kwargs``: ``data_dir`` (agent outputs and corrections)."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.options = Options.from_conf(conf)
        self.data_dir = Path(kwargs["data_dir"])
        self.runtime = Runtime(self.options, model_dir, private=(self.data_dir.parent,))
        self.outputs = AgentOutputStore(self.data_dir / "agent_outputs")

    @property
    def corrections_path(self) -> Path:
        return self.data_dir / "corrections.jsonl"

    def infer(self) -> dict[str, Any]:
        return {
            self.name: IbisAgentInfer(self.runtime, self.outputs),
            f"{self.name}_clicks": IbisClicksInfer(self.runtime),
        }

    def trainer(self) -> dict[str, Any]:
        opts = self.options.as_info()
        public = self.options.public_info()
        return {f"{self.name}_{mode}": IbisAgentTrain(mode, self.corrections_path, Path(self.model_dir), opts, public)
                for mode in ("sft", "grpo")}
