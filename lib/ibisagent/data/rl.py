"""The RL corpus (IBISAgent paper §3.4): parquet rows for the two GRPO modes and for closed-question VQA.

From a manifest, per case:

* ``rollout.parquet`` — one row per segmentation case: the display image (image grid), the instruction, the target
  names, the ground-truth masks (RLE) and, in refinement cases, the initial mask. A rollout environment is created
  from a row (``SegmentationEnv(image, instruction, targets, session, initial_masks=…, ground_truth=…)``).
* ``step.parquet`` — one row per state of the simulated expert (the oracle policy stepping
  :class:`ibisagent.env.SegmentationEnv`): the clicks so far, the previous IoU per target, the current masks, the
  overlay the policy sees (``images``) and the exact ``prompt`` messages of that observation (history ``off``), the
  ground truth and the expert's action there. The authors' released recipe trains one action from such a state.
* ``vqa.parquet`` — cases with ``answer``: the image (policy grid), the question (the instruction) and the answer
  (scored by exact match).

Every row has ``mode`` (``rollout`` / ``step`` / ``vqa``), ``id`` and ``modality``. Masks are RLE JSON strings
(:func:`ibisagent.data.trajectory.rle_encode`, ``null`` for an absent target), in the image grid; images are PNG.
Files are written with ``datasets`` (its features travel in the parquet metadata, so ``load_dataset("parquet")``
gives PIL images back). ``verl=True`` adds ``verl/step.parquet`` in the verl row layout (:func:`verl_rows`).
Unreadable cases are skipped with the reason in ``report.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent.data.manifest import Case, CaseError, load_case, read_manifest
from ibisagent.data.runner import Engine, prepare_work_dir, run_tasks
from ibisagent.data.sft import dataset_messages, load_tool_cached, png_bytes
from ibisagent.data.trajectory import rle_encode
from ibisagent.env import EnvConfig, SegmentationEnv, write_observation
from ibisagent.fileio import atomic_write_text
from ibisagent.metrics import iou
from ibisagent.observation import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, qwen_grid, resize_image
from ibisagent.policies.base import GenerationOptions
from ibisagent.prompts import load_prompts
from ibisagent.protocol import format_action

log = logging.getLogger(__name__)

MODES = ("step", "rollout", "vqa")


def _features(mode: str):  # noqa: ANN202 - datasets.Features
    import datasets

    common = {"mode": datasets.Value("string"), "id": datasets.Value("string"),
              "modality": datasets.Value("string"), "instruction": datasets.Value("string")}
    if mode == "vqa":
        return datasets.Features({**common, "image": datasets.Image(), "answer": datasets.Value("string")})
    seg = {**common, "targets": datasets.Sequence(datasets.Value("string")),
           "ground_truth": datasets.Value("string"), "ground_truth_files": datasets.Sequence(datasets.Value("string")),
           "image_ref": datasets.Value("string"), "slice": datasets.Value("int64")}
    if mode == "rollout":
        return datasets.Features({**seg, "image": datasets.Image(), "initial_mask": datasets.Value("string")})
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    message = {"role": datasets.Value("string"), "content": [part], "train": datasets.Value("bool")}
    return datasets.Features({
        **seg, "step": datasets.Value("int64"), "clicks": datasets.Value("string"),
        "previous_iou": datasets.Sequence(datasets.Value("float64")), "masks": datasets.Value("string"),
        "images": datasets.Sequence(datasets.Image()), "prompt": [message], "expert_action": datasets.Value("string"),
    })


def _rle(mask: np.ndarray | None) -> dict[str, Any] | None:
    return None if mask is None or not np.any(mask) else rle_encode(mask)


def rl_case(task: dict[str, Any]) -> dict[str, Any]:
    """The RL rows of one manifest case (the per-case function of every engine).

    Args:
        task: ``{"key", "case": Case, "options": {...}}`` (see :func:`build_rl`).

    Returns:
        ``{"key", "rows": {"step": [...], "rollout": [...], "vqa": [...]}, "report": [...], "modality"}``.
    """
    from ibisagent.policies.oracle import OraclePolicy

    case: Case = task["case"]
    options = task["options"]
    part: dict[str, Any] = {"key": task["key"], "rows": {m: [] for m in MODES}, "report": [],
                            "modality": case.modality}
    try:
        loaded = load_case(case)
    except (CaseError, OSError, ValueError) as exc:
        part["report"].append({"id": case.id, "kind": "skipped", "reason": str(exc)})
        return part
    rgb = loaded.rgb
    grid = qwen_grid(rgb.shape[0], rgb.shape[1], options["min_pixels"], options["max_pixels"])
    common = {"id": case.id, "modality": case.modality, "instruction": case.instruction}
    if case.answer is not None and "vqa" in options["modes"]:
        part["rows"]["vqa"].append({**common, "mode": "vqa", "image": {"bytes": png_bytes(resize_image(rgb, grid)),
                                                                          "path": None}, "answer": case.answer})
    if not loaded.targets:
        return part
    targets = tuple(loaded.targets)
    truth = {n: (m if m is not None and m.any() else None) for n, m in loaded.targets.items()}
    seg = {**common, "targets": list(targets),
           "ground_truth": json.dumps([_rle(truth[n]) for n in targets]),
           "ground_truth_files": [str(t.mask) if t.mask is not None else "" for t in case.targets],
           "image_ref": str(case.image), "slice": case.slice}
    initial = {n: loaded.initial_mask for n in targets} if loaded.initial_mask is not None else None
    if "rollout" in options["modes"]:
        part["rows"]["rollout"].append({**seg, "mode": "rollout", "image": {"bytes": png_bytes(rgb), "path": None},
                                        "initial_mask": json.dumps(_rle(loaded.initial_mask))})
    if "step" not in options["modes"]:
        return part
    session = load_tool_cached(options["tool"], options["device"]).encode(rgb)
    config = EnvConfig(max_steps=options["max_steps"], history="off", show_points=options["show_points"])
    env = SegmentationEnv(rgb, case.instruction, targets, session, policy_grid=grid, initial_masks=initial,
                          ground_truth=truth, config=config, prompts=load_prompts(options["prompts"]))
    oracle = OraclePolicy(loaded.targets, rule=options["rule"], iou_stop=options["iou_stop"])
    obs = env.reset()
    clicks: list[dict[str, Any]] = []
    while not env.done:
        masks = env.masks
        previous = [iou(masks[n], truth[n] if truth[n] is not None else np.zeros(rgb.shape[:2], bool))
                    for n in targets]
        text = oracle.generate([obs.request], GenerationOptions())[0].text
        result = env.step(text)
        part["rows"]["step"].append({
            **seg, "mode": "step", "step": obs.step, "clicks": json.dumps(clicks),
            "previous_iou": [round(v, 6) for v in previous],
            "masks": json.dumps([_rle(masks[n]) for n in targets]),
            "images": [{"bytes": png_bytes(image), "path": None} for image in obs.images],
            "prompt": dataset_messages(obs.messages, []),
            "expert_action": "\n".join(format_action(a) for a in result.actions),
        })
        if result.error is not None:
            part["report"].append({"id": case.id, "kind": "step", "reason": f"expert step {obs.step}: {result.error}"})
            break
        clicks = clicks + [{"x": c.action.x, "y": c.action.y, "positive": c.click.positive, "target": c.target}
                           for c in result.clicks]
        if result.observation is not None:
            obs = result.observation
    return part


def verl_rows(step_rows: Sequence[dict[str, Any]], data_source: str = "ibisagent") -> list[dict[str, Any]]:
    """Step rows in the verl RL row layout the authors released: ``data_source``, ``prompt`` (chat messages with
    ``<image>`` where each image stands), ``images`` (``{"bytes"}``), ``ability`` (``"segmentation"``),
    ``reward_model`` = ``{"style": "rule", "ground_truth": JSON}`` (ground-truth RLEs, previous IoU, clicks so far,
    targets) and ``extra_info`` (``id``, ``step``, ``index``)."""
    out = []
    for index, row in enumerate(step_rows):
        prompt = [{"role": m["role"], "content": "".join("<image>" if p["type"] == "image" else p["text"]
                                                         for p in m["content"])} for m in row["prompt"]]
        truth = {"ground_truth": json.loads(row["ground_truth"]), "previous_iou": row["previous_iou"],
                 "clicks": json.loads(row["clicks"]), "targets": row["targets"], "masks": json.loads(row["masks"])}
        out.append({"data_source": data_source, "prompt": prompt, "images": row["images"],
                    "ability": "segmentation", "reward_model": {"style": "rule", "ground_truth": json.dumps(truth)},
                    "extra_info": {"id": row["id"], "step": row["step"], "index": index}})
    return out


def build_rl(
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    modes: Sequence[str] = MODES,
    tool: str = "embedded",
    device: str = "cpu",
    iou_stop: float = 0.9,
    max_steps: int = 20,
    rule: str = "peak",
    prompts: str | os.PathLike[str] | None = None,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 1,
    engine: Engine = "local",
    progress: bool = True,
    verl: bool = False,
    show_points: bool = False,
) -> dict[str, Any]:
    """Write ``step.parquet``, ``rollout.parquet`` and ``vqa.parquet`` (the ``modes`` asked for; a mode without rows
    gets no file) into ``out_dir``.

    Args:
        manifest: the JSONL manifest (DESIGN §4).
        out_dir: output folder (a killed run started again with the same settings resumes from ``.work/``).
        modes: any of ``"step"``, ``"rollout"``, ``"vqa"``.
        tool: the tool the expert states are computed with (the one used in GRPO).
        device: torch device of model-based tools.
        iou_stop, max_steps, rule: the simulated expert (:class:`ibisagent.policies.oracle.OraclePolicy`).
        prompts: a prompt TOML overriding the built-in wording.
        min_pixels, max_pixels: the policy's image budget (images are resized to that grid as at inference).
        workers, engine, progress: as in :func:`ibisagent.data.sft.build_sft`.
        verl: also write ``verl/step.parquet`` (:func:`verl_rows`).
        show_points: step rows' refinement turns list the points placed so far
            (:attr:`ibisagent.env.EnvConfig.show_points`; recorded in ``out_dir/ibisagent.json``).

    Returns:
        ``{"rows": {mode: n}, "per_modality": {modality: {mode: n}}, "skipped": n, "empty": {mode: why}}`` (also
        ``stats.json``); ``empty`` says, for each mode asked for that got no row (and so no file), why.
    """
    import datasets

    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown RL mode(s) {unknown}; expected any of {list(MODES)}")
    out = Path(out_dir)
    entries = read_manifest(manifest)
    options = {"modes": sorted(set(modes)), "tool": tool, "device": device, "iou_stop": iou_stop,
               "max_steps": max_steps, "rule": rule, "prompts": str(prompts) if prompts else None,
               "min_pixels": min_pixels, "max_pixels": max_pixels, "show_points": bool(show_points)}
    report = [{"id": str(e.case_id), "kind": "skipped", "reason": str(e)} for e in entries
              if isinstance(e, CaseError)]
    cases = [e for e in entries if isinstance(e, Case)]
    tasks = [{"key": f"{i:07d}-{c.id}", "case": c, "options": options} for i, c in enumerate(cases)]
    work = prepare_work_dir(out / ".work", {**options, "manifest": str(Path(manifest).resolve()),
                                           "cases": [t["key"] for t in tasks]})
    parts = run_tasks(tasks, rl_case, work, engine=engine, workers=workers, progress=progress, desc="build-rl")
    counts: dict[str, int] = {}
    per_modality: dict[str, dict[str, int]] = {}
    empty: dict[str, str] = {}
    for mode in options["modes"]:
        rows = [row for p in parts for row in p["rows"][mode]]
        counts[mode] = len(rows)
        for p in parts:
            if p["rows"][mode]:
                bucket = per_modality.setdefault(p["modality"], {})
                bucket[mode] = bucket.get(mode, 0) + len(p["rows"][mode])
        target = out / f"{mode}.parquet"
        target.unlink(missing_ok=True)
        if not rows:  # an empty parquet file is not a loadable dataset: no file, the count says 0, and why
            empty[mode] = _why_empty(mode, cases)
            log.warning("build-rl: no %s.parquet written: %s", mode, empty[mode])
            continue
        datasets.Dataset.from_list(rows, features=_features(mode)).to_parquet(str(target))
        if verl and mode == "step":
            (out / "verl").mkdir(exist_ok=True)
            datasets.Dataset.from_list(verl_rows(rows)).to_parquet(str(out / "verl" / "step.parquet"))
    report += [r for p in parts for r in p["report"]]
    atomic_write_text(out / "report.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in report))
    stats = {"rows": counts, "per_modality": dict(sorted(per_modality.items())),
             "skipped": sum(1 for r in report if r["kind"] == "skipped"), "empty": empty}
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    write_observation(out, options)
    return stats


def _why_empty(mode: str, cases: list[Case]) -> str:
    """Why ``mode`` got no row from ``cases`` (the readable cases of the manifest)."""
    if not cases:
        return "no readable case in the manifest (see report.jsonl)"
    if mode == "vqa":
        return "no case has an 'answer' (closed VQA rows come from cases with an answer)"
    return "every case was skipped (see report.jsonl)"


__all__ = ["MODES", "build_rl", "rl_case", "verl_rows"]
