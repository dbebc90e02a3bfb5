"""Evaluation harness: run a manifest through a policy and a tool, score it, write tables and plots.

``results.json`` = ``{"aggregate": {...}, "cases": [{"id", "iou", "dice", "f1", "steps", "seconds", ...}]}``; a case
that failed carries ``"error"`` (and ``null`` scores) and does not count in the aggregate, which reports how many
failed. IoU and Dice are in [0, 1] (see :mod:`ibisagent.metrics` for the absent-target convention).

The ``oracle`` policy is the click simulator of :mod:`ibisagent.clicks` (it needs the ground truth); it is the
reference for what a perfect clicker achieves with a given tool, and it produces the training trajectories.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from ibisagent.clicks import (
    DEFAULT_IOU_STOP,
    DEFAULT_MAX_CLICKS,
    ErrorRule,
    SimulatedStep,
    number_of_clicks,
    simulate,
)
from ibisagent.data.manifest import CaseError, LoadedCase, load_case, read_manifest
from ibisagent.data.trajectory import TrajectoryRecord
from ibisagent.fileio import atomic_write_text
from ibisagent.metrics import dice, entity_counts, f1_from_counts, iou
from ibisagent.policies.oracle import oracle_step_records
from ibisagent.tools.base import SegmentationTool

if TYPE_CHECKING:
    from ibisagent.agent import AgentConfig
    from ibisagent.policies.base import Policy
    from ibisagent.prompts import Prompts

log = logging.getLogger(__name__)

#: IoU thresholds reported as NoC@85 and NoC@90.
NOC_THRESHOLDS = (0.85, 0.90)


@dataclass
class TargetResult:
    """Outcome for one target: final scores, clicks used, why it stopped and the IoU after each click."""

    name: str
    iou: float
    dice: float
    steps: int
    stop_reason: str
    ious: list[float] = field(default_factory=list)
    present: bool = True


@dataclass
class CaseResult:
    """Outcome for one manifest case. Scores are means over its targets; ``error`` is set when the case failed."""

    id: str
    modality: str = ""
    iou: float | None = None
    dice: float | None = None
    f1: float | None = None
    steps: int | None = None
    seconds: float = 0.0
    targets: list[TargetResult] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None

    @property
    def scored(self) -> bool:
        """Whether the case counts in the aggregate (it ran and had something to score)."""
        return self.error is None and self.skipped is None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "modality": self.modality,
            "iou": self.iou,
            "dice": self.dice,
            "f1": self.f1,
            "steps": self.steps,
            "seconds": round(self.seconds, 4),
            "targets": [
                {"name": t.name, "present": t.present, "iou": t.iou, "dice": t.dice, "steps": t.steps,
                 "stop_reason": t.stop_reason, "ious": [round(v, 4) for v in t.ious]}
                for t in self.targets
            ],
        }
        if self.error is not None:
            data["error"] = self.error
        if self.skipped is not None:
            data["skipped"] = self.skipped
        return data


def _trajectory_record(
    loaded: LoadedCase, name: str, tool: str, steps: Sequence[SimulatedStep], stop: str, target: np.ndarray
) -> TrajectoryRecord:
    case = loaded.case
    h, w = loaded.rgb.shape[:2]
    start = loaded.initial_mask if loaded.initial_mask is not None else np.zeros_like(target)
    records = oracle_step_records(steps, w, h, iou(start, target), target=name if len(case.targets) > 1 else None)
    final = steps[-1].mask if steps else (loaded.initial_mask if loaded.initial_mask is not None
                                          else np.zeros_like(target))
    return TrajectoryRecord(
        id=case.id, instruction=case.instruction, image=str(case.image), target=name, tool=tool, source="simulated",
        modality=case.modality, slice=case.slice, window=loaded.window.to_dict(), steps=records,
        final_iou=round(iou(final, target), 6),
        final_dice=round(dice(final, target), 6), stop_reason=stop,
        answer=None if target.any() else "not present",
    )


def simulate_case(
    loaded: LoadedCase,
    tool: SegmentationTool,
    *,
    iou_stop: float = DEFAULT_IOU_STOP,
    max_steps: int = DEFAULT_MAX_CLICKS,
    rule: ErrorRule = "peak",
) -> tuple[list[TrajectoryRecord], CaseResult]:
    """Run the oracle on every target of one loaded case (one image encode for all targets)."""
    if not loaded.targets:
        return [], CaseResult(id=loaded.case.id, modality=loaded.case.modality,
                              skipped="closed-VQA case without a segmentation target: the oracle has nothing to click")
    start = time.perf_counter()
    session = tool.encode(loaded.rgb)
    records: list[TrajectoryRecord] = []
    targets: list[TargetResult] = []
    finals: list[tuple[np.ndarray, np.ndarray]] = []
    for name, mask in loaded.targets.items():
        target = np.zeros(loaded.rgb.shape[:2], dtype=bool) if mask is None else mask
        steps, stop = simulate(session, target, initial_mask=loaded.initial_mask, iou_stop=iou_stop,
                               max_clicks=max_steps, rule=rule)
        record = _trajectory_record(loaded, name, tool.name, steps, stop, target)
        final = record.final_mask()
        if final is None:
            final = loaded.initial_mask if loaded.initial_mask is not None else np.zeros_like(target)
        records.append(record)
        finals.append((final, target))
        targets.append(TargetResult(name=name, iou=float(record.final_iou), dice=float(record.final_dice),  # type: ignore[arg-type]
                                    steps=len(steps), stop_reason=stop, ious=[s.iou for s in steps],
                                    present=bool(target.any())))
    seconds = time.perf_counter() - start
    for record in records:
        record.seconds = round(seconds / len(records), 6)
    result = CaseResult(
        id=loaded.case.id, modality=loaded.case.modality,
        iou=statistics.fmean(t.iou for t in targets), dice=statistics.fmean(t.dice for t in targets),
        f1=f1_from_counts(*entity_counts(finals)), steps=sum(t.steps for t in targets), seconds=seconds,
        targets=targets,
    )
    return records, result


def run_manifest(
    manifest: str | os.PathLike[str],
    run_case: Callable[[LoadedCase], tuple[list[TrajectoryRecord], CaseResult]],
    desc: str,
    progress: bool = True,
) -> tuple[list[TrajectoryRecord], list[CaseResult]]:
    """Load and run every case of a manifest. A failing case (bad line, unreadable file, tool or policy error) is
    recorded with its error and the run carries on."""
    records: list[TrajectoryRecord] = []
    results: list[CaseResult] = []
    for entry in tqdm(read_manifest(manifest), desc=desc, unit="case", disable=not progress):
        if isinstance(entry, CaseError):
            log.warning("case failed: %s", entry)
            results.append(CaseResult(id=str(entry.case_id), error=str(entry)))
            continue
        try:
            case_records, result = run_case(load_case(entry))
        except Exception as exc:  # noqa: BLE001 - a batch records any case failure and carries on
            log.warning("case %s failed: %s", entry.id, exc, exc_info=not isinstance(exc, (ValueError, OSError)))
            results.append(CaseResult(id=entry.id, modality=entry.modality, error=f"{type(exc).__name__}: {exc}"))
            continue
        records.extend(case_records)
        results.append(result)
    return records, results


def run_oracle(
    manifest: str | os.PathLike[str],
    tool: SegmentationTool,
    *,
    iou_stop: float = DEFAULT_IOU_STOP,
    max_steps: int = DEFAULT_MAX_CLICKS,
    rule: ErrorRule = "peak",
    progress: bool = True,
) -> tuple[list[TrajectoryRecord], list[CaseResult]]:
    """Simulate every case of a manifest with the oracle (the click simulator)."""
    return run_manifest(
        manifest,
        lambda loaded: simulate_case(loaded, tool, iou_stop=iou_stop, max_steps=max_steps, rule=rule),
        f"oracle+{tool.name}",
        progress,
    )


def _noc(result: CaseResult, threshold: float, budget: int) -> float:
    """Clicks to reach ``threshold`` summed over a case's targets (budget when never reached; 0 if already there)."""
    total = 0
    for t in result.targets:
        if t.steps == 0 and t.iou >= threshold:
            continue
        reached = number_of_clicks(t.ious, threshold)
        total += reached if reached is not None else budget
    return float(total)


def _summary(rows: Sequence[CaseResult], budget: int) -> dict[str, Any]:
    ok = [r for r in rows if r.scored]
    errors = sum(r.error is not None for r in rows)
    if not ok:
        return {"samples": 0, "errors": errors}
    ious = [float(r.iou) for r in ok]  # type: ignore[arg-type]
    out: dict[str, Any] = {
        "samples": len(ok),
        "errors": errors,
        "mean_iou": statistics.fmean(ious),
        "median_iou": statistics.median(ious),
        "mean_dice": statistics.fmean(float(r.dice) for r in ok),  # type: ignore[arg-type]
        "median_dice": statistics.median(float(r.dice) for r in ok),  # type: ignore[arg-type]
        "mean_f1": statistics.fmean(float(r.f1) for r in ok),  # type: ignore[arg-type]
        "mean_steps": statistics.fmean(int(r.steps) for r in ok),  # type: ignore[arg-type]
        "mean_seconds": statistics.fmean(r.seconds for r in ok),
    }
    for thr in NOC_THRESHOLDS:
        out[f"noc@{round(thr * 100)}"] = statistics.fmean(_noc(r, thr, budget) for r in ok)
    return out


def aggregate(results: Sequence[CaseResult], budget: int = DEFAULT_MAX_CLICKS) -> dict[str, Any]:
    """Overall and per-modality summaries: samples, errors, mean/median IoU and Dice, mean F1, steps, NoC."""
    overall = _summary(results, budget)
    modalities = sorted({r.modality for r in results if r.scored})
    overall["per_modality"] = {m: _summary([r for r in results if r.modality == m], budget) for m in modalities}
    return overall


def format_table(summary: dict[str, Any]) -> str:
    """A Markdown table like the paper's Tab. 6: one row per modality and an overall row."""
    header = "| modality | samples | mean IoU | median IoU | mean Dice | median Dice | mean steps | NoC@90 |"
    lines = [header, "|" + "---|" * 8]

    def row(name: str, s: dict[str, Any]) -> str:
        if not s.get("samples"):
            return f"| {name} | 0 | – | – | – | – | – | – |"
        return (f"| {name} | {s['samples']} | {s['mean_iou']:.4f} | {s['median_iou']:.4f} | {s['mean_dice']:.4f} "
                f"| {s['median_dice']:.4f} | {s['mean_steps']:.2f} | {s['noc@90']:.2f} |")

    for name, s in summary.get("per_modality", {}).items():
        lines.append(row(name or "(none)", s))
    lines.append(row("**all**", summary))
    if summary.get("errors"):
        lines.append(f"\n{summary['errors']} case(s) failed; see `error` in results.json.")
    return "\n".join(lines)


def _settings_line(meta: dict[str, Any]) -> str:
    """The run's settings in one sentence, naming only those it applied."""
    line = f"policy `{meta.get('policy')}`, tool `{meta.get('tool')}`"
    if "iou_stop" in meta:
        line += f", stop at IoU ≥ {meta['iou_stop']} or {meta.get('max_clicks')} clicks"
    if "max_turns" in meta:
        line += f", at most {meta['max_turns']} agent turns; NoC budget {meta.get('max_clicks')} clicks"
    return line


def write_results(out_dir: str | os.PathLike[str], results: Sequence[CaseResult], meta: dict[str, Any],
                  budget: int = DEFAULT_MAX_CLICKS) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and the plots into ``out_dir``; returns the aggregate."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = aggregate(results, budget)
    payload = {"meta": meta, "aggregate": summary, "cases": [r.to_dict() for r in results]}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2) + "\n")
    lines = [f"# Evaluation: {meta.get('manifest', '')}", "",
             _settings_line(meta), "", format_table(summary), "",
             "| case | modality | IoU | Dice | F1 | steps | seconds | error |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.skipped is not None:
            lines.append(f"| {r.id} | {r.modality} | – | – | – | – | – | skipped: {r.skipped} |")
        elif r.error is None:
            lines.append(f"| {r.id} | {r.modality} | {r.iou:.4f} | {r.dice:.4f} | {r.f1:.2f} | {r.steps} "
                         f"| {r.seconds:.3f} | |")
        else:
            lines.append(f"| {r.id} | {r.modality} | – | – | – | – | – | {r.error} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    from ibisagent.render import plot_eval

    plot_eval(results, out, budget)
    return summary


def policy_case(
    loaded: LoadedCase, policy: Policy, tool: SegmentationTool, config: AgentConfig, prompts: Prompts | None = None
) -> tuple[list[TrajectoryRecord], CaseResult]:
    """Run the agent (an MLLM policy) on one loaded case and score it against the case's ground truth.

    ``steps`` is the number of agent turns; per target, ``steps`` and ``ious`` count the turns that clicked (so NoC
    counts clicks, as for the oracle). A failing policy backend fails the case (it is not scored as an empty mask), and
    so does a run that stopped without a usable answer (:data:`ibisagent.outcome.FAILED_STOPS`): the case's ``error``
    says why.
    """
    from ibisagent.agent import run_agent
    from ibisagent.outcome import failure, with_errors
    from ibisagent.policies.base import PolicyError

    case = loaded.case
    start = time.perf_counter()
    if not loaded.targets:
        return [], CaseResult(id=case.id, modality=case.modality,
                              skipped="closed-VQA case: answer scoring is not part of segmentation eval yet")
    names = tuple(loaded.targets)
    initial = {n: loaded.initial_mask for n in names} if loaded.initial_mask is not None else None
    trajectory = run_agent(policy, tool.encode(loaded.rgb), loaded.rgb, case.instruction, names, config=config,
                           prompts=prompts, initial_masks=initial)
    truth = {n: (m if m is not None else np.zeros(loaded.rgb.shape[:2], bool)) for n, m in loaded.targets.items()}
    records = trajectory.to_records(case.id, str(case.image), tool.name, modality=case.modality, slice=case.slice,
                                    window=loaded.window.to_dict(),
                                    ground_truth=truth)
    if trajectory.stop_reason == "policy_error":
        raise PolicyError(trajectory.error or "the policy backend failed")
    failed = failure(trajectory)
    if failed is not None:  # the agent gave no usable answer: the case failed, it is not scored as its mask
        return with_errors(records, trajectory), CaseResult(
            id=case.id, modality=case.modality, steps=len({s.index for s in trajectory.steps}),
            seconds=time.perf_counter() - start, error=f"agent stopped {failed}")
    pairs = [(trajectory.masks[n], truth[n]) for n in names]
    steps = len({s.index for s in trajectory.steps})
    targets = []
    for name, record, (p, g) in zip(names, records, pairs):
        click_ious = [float(s.iou) for s in record.steps if s.clicks and s.iou is not None]
        targets.append(TargetResult(name=name, iou=iou(p, g), dice=dice(p, g), steps=len(click_ious),
                                    stop_reason=trajectory.stop_reason, ious=click_ious, present=bool(g.any())))
    result = CaseResult(id=case.id, modality=case.modality, iou=statistics.fmean(t.iou for t in targets),
                        dice=statistics.fmean(t.dice for t in targets), f1=f1_from_counts(*entity_counts(pairs)),
                        steps=steps, seconds=time.perf_counter() - start, targets=targets)
    return records, result


def run_policy(
    manifest: str | os.PathLike[str],
    policy: Policy,
    tool: SegmentationTool,
    config: AgentConfig,
    *,
    prompts: Prompts | None = None,
    progress: bool = True,
) -> tuple[list[TrajectoryRecord], list[CaseResult]]:
    """Run the agent with ``policy`` on every case of a manifest."""
    return run_manifest(
        manifest, lambda loaded: policy_case(loaded, policy, tool, config, prompts), f"{policy.name}+{tool.name}",
        progress,
    )
