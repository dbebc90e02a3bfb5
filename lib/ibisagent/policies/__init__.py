"""Policies behind one interface (:class:`Policy`): the oracle, transformers, OpenAI-compatible servers, vLLM.

Policy specs (DESIGN §4):

=====================  ==============================================================================
``oracle``             simulated expert (needs ground truth; built per case by the evaluation harness)
``hf:PATH``            a local Hugging Face model directory (Qwen2.5-VL family), in-process transformers
``openai:URL#MODEL``   any OpenAI-compatible chat endpoint (``vllm serve``, ``transformers serve``)
``vllm:PATH``          in-process vLLM engine (``pip install -e '.[gpu]'``)
``bundled``            the small policy this project trained with its own recipe and ships (the default)
``tiny``               the offline tiny Qwen2.5-VL (untrained: for wiring and latency, not for answers)
=====================  ==============================================================================
"""

from __future__ import annotations

import os
from pathlib import Path

from ibisagent.policies.base import (
    Conversation,
    Generation,
    GenerationOptions,
    Observation,
    Policy,
    PolicyError,
    PolicyRequest,
)

__all__ = [
    "Conversation",
    "Generation",
    "GenerationOptions",
    "Observation",
    "Policy",
    "PolicyError",
    "PolicyRequest",
    "bundled_policy_dir",
    "default_cache_dir",
    "load_policy",
]


def default_cache_dir() -> Path:
    """Where built artefacts (the tiny model) are kept: ``$IBISAGENT_CACHE`` or ``~/.cache/ibisagent``."""
    return Path(os.environ.get("IBISAGENT_CACHE", Path.home() / ".cache" / "ibisagent"))


def bundled_policy_dir() -> Path:
    """Where the bundled policy lives (``ibisagent/policies/bundled``); see docs/TRAINING.md for how it was made."""
    return Path(__file__).resolve().parent / "bundled"


def has_bundled_policy() -> bool:
    """Whether this installation ships the bundled policy."""
    return (bundled_policy_dir() / "config.json").is_file()


def load_policy(spec: str, device: str | None = None, timeout: float | None = None, progress: bool = True) -> Policy:
    """Build a policy from its spec (see the module docstring). ``oracle`` is not built here: it needs the case's
    ground truth (:class:`ibisagent.policies.oracle.OraclePolicy`). ``timeout``: overall seconds per call of a remote
    (``openai:``) policy, default that policy's own. ``progress``: show transformers' weight-loading bar (in-process
    models)."""
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        from ibisagent.policies.hf import HFPolicy

        return HFPolicy(_local_dir(rest), device=device, progress=progress)
    if kind == "openai" and rest:
        from ibisagent.policies.openai import OpenAIPolicy

        return OpenAIPolicy.from_spec(rest) if timeout is None else OpenAIPolicy.from_spec(rest, timeout=timeout)
    if kind == "vllm" and rest:
        from ibisagent.policies.vllm import VLLMPolicy

        return VLLMPolicy(_local_dir(rest))
    if spec == "bundled":
        from ibisagent.policies.hf import HFPolicy

        if not has_bundled_policy():
            raise ValueError(f"no bundled policy in this installation ({bundled_policy_dir()} is empty); train one "
                             "with `ibisagent train tiny MANIFEST --out DIR` and pass --policy hf:DIR/policy")
        return HFPolicy(bundled_policy_dir(), device=device, progress=progress)
    if spec == "tiny":
        from ibisagent.policies.hf import HFPolicy
        from ibisagent.policies.tiny import ensure_tiny_model

        return HFPolicy(ensure_tiny_model(default_cache_dir()), device=device, progress=progress)
    if spec == "oracle":
        raise ValueError("the oracle policy needs ground truth; use `ibisagent eval --policy oracle` on a manifest")
    raise ValueError(f"unknown policy spec {spec!r}; expected oracle, hf:PATH, openai:URL#MODEL, vllm:PATH, "
                     "bundled or tiny")


def _local_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path} (policies load local checkpoints only)")
    return path
