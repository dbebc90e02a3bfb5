"""Evaluation harness: run a manifest through a policy and a tool, score it, write tables and plots.

``results.json`` = ``{"aggregate": {...}, "cases": [{"id", "iou", "dice", "f1", "steps", "seconds", ...}]}``; a case
that failed carries ``"error"`` (and ``null`` scores) and does not count in the aggregate, which reports how many
failed. IoU and Dice are in [0, 1] (see :mod:`ibisagent.metrics` for the absent-target convention).

The ``oracle`` policy is the click simulator of :mod:`ibisagent.clicks` speaking the action grammar (it needs the
ground truth); it steps the same environment as every other policy. It is the reference for what a perfect clicker
achieves with a given tool, and it produces the training trajectories.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from tqdm.auto import tqdm

from ibisagent.clicks import DEFAULT_IOU_STOP, DEFAULT_MAX_CLICKS, Anchor, ErrorRule, number_of_clicks
from ibisagent.data.manifest import CaseError, LoadedCase, load_case, read_manifest
from ibisagent.data.trajectory import TrajectoryRecord
from ibisagent.fileio import atomic_write_text
from ibisagent.metrics import dice, entity_counts, f1_from_counts, iou
from ibisagent.tools.base import SegmentationTool

if TYPE_CHECKING:
    from ibisagent.agent import AgentConfig, AgentTrajectory
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
    turns: dict[str, Any] | None = None  # policy runs: counts behind the policy metrics (policy_turn_counts)

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
        if self.turns is not None:
            data["turns"] = self.turns
        return data


#: How a case's error begins when the agent ran but stopped without a usable answer (``unparseable``, ``tool_error``).
AGENT_STOPPED = "agent stopped"


def simulate_case(
    loaded: LoadedCase,
    tool: SegmentationTool,
    *,
    iou_stop: float = DEFAULT_IOU_STOP,
    max_steps: int = DEFAULT_MAX_CLICKS,
    rule: ErrorRule = "peak",
    prompts: Prompts | None = None,
    anchors: Mapping[str, Anchor] | None = None,
    anchor_clicks: Literal["first", "all"] = "first",
) -> tuple[list[TrajectoryRecord], CaseResult]:
    """The simulated expert on one loaded case: the oracle policy (:class:`ibisagent.policies.oracle.OraclePolicy`)
    stepping the environment (:mod:`ibisagent.env`) exactly as a model policy would, all targets in one episode, so
    that the recorded turns (source ``"simulated"``) are the turns a trained policy is expected to write.

    ``max_steps`` bounds the oracle's turns (one click per unfinished target per turn; its ``Terminate`` turn counts).
    ``anchors`` and ``anchor_clicks`` anchor the expert's clicks (:class:`~ibisagent.policies.oracle.OraclePolicy`).
    """
    from ibisagent.agent import AgentConfig
    from ibisagent.policies.oracle import OraclePolicy

    if not loaded.targets:
        return [], CaseResult(id=loaded.case.id, modality=loaded.case.modality,
                              skipped="closed-VQA case without a segmentation target: the oracle has nothing to click")
    oracle = OraclePolicy(loaded.targets, rule=rule, iou_stop=iou_stop, anchors=anchors, anchor_clicks=anchor_clicks)
    return policy_case(loaded, oracle, tool, AgentConfig(max_steps=max_steps), prompts, source="simulated")


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
    anchors: Mapping[str, Anchor] | None = None,
    anchor_clicks: Literal["first", "all"] = "first",
) -> tuple[list[TrajectoryRecord], list[CaseResult]]:
    """Simulate every case of a manifest with the oracle policy stepping the environment (:func:`simulate_case`)."""
    return run_manifest(
        manifest,
        lambda loaded: simulate_case(loaded, tool, iou_stop=iou_stop, max_steps=max_steps, rule=rule,
                                     anchors=anchors, anchor_clicks=anchor_clicks),
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
    # the policy metrics count every run the policy wrote turns for, failed ones included (a case that stopped
    # unparseable is exactly where format validity and the rewards must show it)
    policy = policy_metrics([r for r in rows if r.skipped is None])
    if not ok:
        return {"samples": 0, "errors": errors, **policy}
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
    out.update(policy)
    return out


def policy_turn_counts(trajectory: AgentTrajectory) -> dict[str, Any]:
    """What the policy metrics count in one trajectory (its steps need ground-truth scores): turns and strictly
    formatted turns; present targets and those whose first click fell inside the target; absent targets and those
    answered not present (declared absent, final mask empty); the five rewards (:mod:`ibisagent.rewards`)."""
    from ibisagent.rewards import episode_from_steps, score_episode

    present, absent = [], []
    for step in trajectory.steps[:1] or ():
        present = [s.name for s in step.scores or () if s.present]
        absent = [s.name for s in step.scores or () if not s.present]
    first_inside = 0
    for name in present:
        first = next((c for step in trajectory.steps for c in step.clicks if c.target == name), None)
        first_inside += bool(first is not None and first.action.kind == "positive" and first.in_error_region)
    declared = frozenset().union(*(step.absent for step in trajectory.steps)) if trajectory.steps else frozenset()
    answered = sum(1 for n in absent if n in declared and not trajectory.masks[n].any())
    episode = episode_from_steps(trajectory.steps, trajectory.masks, answer=trajectory.answer,
                                 stop_reason=trajectory.stop_reason)
    return {"turns": len(trajectory.steps), "valid_turns": sum(1 for s in trajectory.steps if s.strict_format),
            "present": len(present), "first_inside": first_inside, "absent": len(absent),
            "answered_absent": answered, "rewards": score_episode(episode)}


def policy_metrics(rows: Sequence[CaseResult]) -> dict[str, Any]:
    """Shares over policy runs: ``format_valid`` (turns in the strict format), ``first_click_inside`` (present
    targets whose first click was a positive click inside the target), ``absent_not_present`` (absent targets answered
    not present with an empty mask), ``reward_<name>`` (mean of each reward over cases) and ``reward`` (their
    weighted total, :func:`ibisagent.rewards.weighted_total` at the default weights). Empty for oracle runs."""
    from ibisagent.rewards import weighted_total

    counts = [r.turns for r in rows if r.turns]
    if not counts:
        return {}

    def share(num: str, den: str) -> float | None:
        total = sum(c[den] for c in counts)
        return sum(c[num] for c in counts) / total if total else None

    out: dict[str, Any] = {"format_valid": share("valid_turns", "turns"),
                           "first_click_inside": share("first_inside", "present"),
                           "absent_not_present": share("answered_absent", "absent")}
    for name in counts[0]["rewards"]:
        out[f"reward_{name}"] = statistics.fmean(c["rewards"][name] for c in counts)
    out["reward"] = statistics.fmean(weighted_total(c["rewards"]) for c in counts)
    return out


def format_policy_table(summary: dict[str, Any]) -> str:
    """A Markdown table of the policy metrics (:func:`policy_metrics`), one row per modality and an overall row."""
    keys = ("format_valid", "first_click_inside", "absent_not_present", "reward_format", "reward_answer",
            "reward_click", "reward_progress", "reward_length", "reward")
    lines = ["| modality | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]

    def cells(s: dict[str, Any]) -> str:
        return " | ".join("–" if s.get(k) is None else f"{s[k]:.2f}" for k in keys)

    for modality, s in summary.get("per_modality", {}).items():
        lines.append(f"| {modality} | {cells(s)} |")
    lines.append(f"| **all** | {cells(summary)} |")
    return "\n".join(lines)


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
             _settings_line(meta), "", format_table(summary), ""]
    if "format_valid" in summary:
        lines += [format_policy_table(summary), ""]
    lines += ["| case | modality | IoU | Dice | F1 | steps | seconds | error |", "|---|---|---|---|---|---|---|---|"]
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
    loaded: LoadedCase, policy: Policy, tool: SegmentationTool, config: AgentConfig, prompts: Prompts | None = None,
    source: str = "policy",
) -> tuple[list[TrajectoryRecord], CaseResult]:
    """Run the agent (any policy, the oracle included) on one loaded case and score it against the case's ground truth.

    ``steps`` is the number of agent turns; per target, ``steps`` is its number of clicks and ``ious`` holds the IoU
    after each of its clicks (a turn with several clicks on the target repeats the IoU after the turn), so NoC counts
    clicks, not turns. A failing policy backend fails the case (it is not scored as an empty mask), and so does a run
    that stopped without a usable answer or on a tool error (:data:`ibisagent.outcome.FAILED_STOPS`): the case's
    ``error`` says why.
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
                           prompts=prompts, initial_masks=initial, ground_truth=loaded.targets)
    truth = {n: (m if m is not None else np.zeros(loaded.rgb.shape[:2], bool)) for n, m in loaded.targets.items()}
    records = trajectory.to_records(case.id, str(case.image), tool.name, modality=case.modality, slice=case.slice,
                                    window=loaded.window.to_dict(), ground_truth=truth, source=source)
    if trajectory.stop_reason == "policy_error":
        raise PolicyError(trajectory.error or "the policy backend failed")
    failed = failure(trajectory)
    if failed is not None:  # the agent gave no usable answer: the case failed, it is not scored as its mask
        return with_errors(records, trajectory), CaseResult(
            id=case.id, modality=case.modality, steps=len({s.index for s in trajectory.steps}),
            seconds=time.perf_counter() - start, error=f"{AGENT_STOPPED} {failed}",
            turns=policy_turn_counts(trajectory) if source == "policy" else None)
    pairs = [(trajectory.masks[n], truth[n]) for n in names]
    steps = len({s.index for s in trajectory.steps})
    targets = []
    for index, (name, (p, g)) in enumerate(zip(names, pairs)):
        click_ious = _click_ious(trajectory, index)
        targets.append(TargetResult(name=name, iou=iou(p, g), dice=dice(p, g), steps=len(click_ious),
                                    stop_reason=trajectory.stop_reason, ious=click_ious, present=bool(g.any())))
    result = CaseResult(id=case.id, modality=case.modality, iou=statistics.fmean(t.iou for t in targets),
                        dice=statistics.fmean(t.dice for t in targets), f1=f1_from_counts(*entity_counts(pairs)),
                        steps=steps, seconds=time.perf_counter() - start, targets=targets,
                        turns=policy_turn_counts(trajectory) if source == "policy" else None)
    return records, result


def _click_ious(trajectory: AgentTrajectory, index: int) -> list[float]:
    """IoU after each click on target ``index`` (from the environment's scores), one entry per click."""
    name = trajectory.targets[index]
    out: list[float] = []
    for step in trajectory.steps:
        n = sum(1 for c in step.clicks if c.target == name)
        if n and step.scores is not None:
            out += [float(step.scores[index].iou_after)] * n
    return out


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
