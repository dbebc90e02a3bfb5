"""Train tasks ``ibisagent_sft`` and ``ibisagent_grpo``."""

from .train import IbisAgentTrain

__all__ = ["IbisAgentTrain"]
