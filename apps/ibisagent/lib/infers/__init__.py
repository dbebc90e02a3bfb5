"""Infer tasks: ``ibisagent`` (the agent) and ``ibisagent_clicks`` (the tool alone)."""

from .agent import IbisAgentInfer
from .clicks import IbisClicksInfer
from .common import Options, Runtime

__all__ = ["IbisAgentInfer", "IbisClicksInfer", "Options", "Runtime"]
