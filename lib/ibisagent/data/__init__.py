"""Datasets: manifests (and, from other modules, trajectories, QA templates, SFT/RL builders)."""

from .manifest import Case, CaseError, LoadedCase, Target, load_case, read_cases, read_manifest

__all__ = ["Case", "CaseError", "LoadedCase", "Target", "load_case", "read_cases", "read_manifest"]
