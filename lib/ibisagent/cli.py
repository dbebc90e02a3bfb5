"""The ``ibisagent`` command line: segment, simulate, eval, render, bench, demo, build-sft, build-rl.

Exit codes: 0 success; 1 when any case of a batch failed (the others are still written); 2 for bad usage or input.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ibisagent.clicks import ANCHOR_CLICK_CHOICES, DEFAULT_IOU_STOP, DEFAULT_MAX_CLICKS

log = logging.getLogger("ibisagent")

#: The sample manifest shipped in the repository (used by ``demo``).
SAMPLE_MANIFEST = Path(__file__).resolve().parents[2] / "sample_data" / "manifest.jsonl"


def _add_loop_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tool", default="embedded", help="tool spec: embedded, sam2:CONFIG@CKPT, medsam2:CKPT, "
                        "sam:TYPE@CKPT, medsam:CKPT (default: embedded)")
    parser.add_argument("--device", default="cpu", help="torch device for model-based tools (default: cpu)")
    parser.add_argument("--iou-stop", type=float, default=DEFAULT_IOU_STOP,
                        help=f"stop a trajectory at this IoU (default: {DEFAULT_IOU_STOP})")
    parser.add_argument("--max-clicks", "--max-steps", dest="max_clicks", type=int, default=DEFAULT_MAX_CLICKS,
                        help=f"click budget per target: the simulated expert's clicks, and the budget NoC counts "
                        f"against (default: {DEFAULT_MAX_CLICKS}; --max-steps is the old name)")
    parser.add_argument("--rule", choices=("peak", "area"), default="peak",
                        help="click rule: deepest error pixel (peak, the paper's) or larger error region (area)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_agent_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--history", choices=("off", "full"), default="off",
                        help="what the policy sees each step: off = current overlay only (the released checkpoint's "
                        "setting), full = the whole interleaved history")
    parser.add_argument("--prompts", type=Path, help="a TOML prompt file overriding the built-in wording")
    parser.add_argument("--show-points", action=argparse.BooleanOptionalAction, default=None,
                        help="list the points placed so far in each refinement turn (default: as the policy was "
                        "trained, from its ibisagent.json; off for checkpoints that record nothing)")
    parser.add_argument("--time-limit", type=float, default=None, help="wall-clock seconds per case; for `segment` on a volume, all its slices together (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="tokens per model turn (default: 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0 = greedy)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ibisagent", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate expert click trajectories for a manifest (JSONL out)")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, required=True, help="trajectory JSONL to write")
    p.add_argument("--anchor-from", type=Path, metavar="MANIFEST|JSON",
                   help="anchor the expert's clicks where each target name is most often found in this manifest's "
                   "masks (e.g. the training manifest itself; what `train tiny` does), or take the anchors saved in "
                   "a JSON file (`train tiny`'s DIR/anchor_modes.json); default: the deepest point")
    p.add_argument("--anchor-clicks", choices=ANCHOR_CLICK_CHOICES, default="first",
                   help="with --anchor-from: anchor each target's first click only (default) or every click")
    p.add_argument("--anchor-modes", type=int, choices=range(1, 9), default=1, metavar="N",
                   help="with --anchor-from: up to N appearance modes per target, each with its own anchor, the number "
                   "chosen by cross-validation (what `train tiny` does); the expert takes the anchor of the mode "
                   "the image is nearest (default: 1, one anchor per target)")
    _add_loop_options(p)

    p = sub.add_parser("eval", help="evaluate a policy + tool on a manifest (results.json, results.md, plots)")
    p.add_argument("manifest", type=Path)
    p.add_argument("--policy", default="oracle",
                   help="policy spec: oracle (simulated expert), hf:PATH, openai:URL#MODEL, vllm:PATH, tiny")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--trajectories", action="store_true", help="also write DIR/trajectories.jsonl")
    p.add_argument("--max-turns", type=int, default=10,
                   help="policies: agent turns per case (default: 10); the oracle's budget is --max-clicks")
    _add_loop_options(p)
    _add_agent_options(p)

    p = sub.add_parser(
        "segment", help="segment a 2D image or a volume with the agent (think → click → observe)",
        epilog="Exit status: 0 when every target got a mask, or its mask is empty because the agent answered that it "
        "is absent (naming it, or a bare 'not present'; a note on stderr says so); 1 when the agent failed (no usable "
        "answer, a failing policy or tool) or left a target's mask empty without saying it is absent (stderr names "
        "the target, the stop reason and the answer; the mask is written either way); 2 for bad usage.")
    p.add_argument("image", type=Path, help="PNG/JPEG, NIfTI/NRRD, DICOM file or DICOM series folder")
    p.add_argument("--prompt", required=True, help='the instruction, e.g. "Segment the liver."')
    p.add_argument("--target", action="append",
                   help="target name (repeatable; default: one target named from the prompt, e.g. 'left kidney')")
    p.add_argument("--policy", default=None, help="policy spec (default: the bundled default; see README)")
    p.add_argument("--tool", default="embedded", help="tool spec (default: embedded)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--modality", help="modality of the image (CT, MR, ...), overriding the file's; CT gets the CT "
                   "window. Default: the file's, else CT for Hounsfield-range values (see docs/INPUTS.md)")
    p.add_argument("--slice", type=int, help="volumes: key slice to start from (default: the middle slice)")
    p.add_argument("--range", type=int, nargs=2, metavar=("FIRST", "LAST"), help="volumes: slices to stay within")
    p.add_argument("--max-steps", type=int, default=10, help="agent steps per slice (default: 10)")
    p.add_argument("--propagation", choices=("agent", "sam2-video"), default="agent",
                   help="volumes: the agent on every slice (default), or SAM 2 video propagation from the key slice")
    p.add_argument("--out", type=Path, required=True,
                   help="mask to write: .png (2D), .nii.gz/.nii/.nrrd (any), .dcm (DICOM-SEG, DICOM sources)")
    p.add_argument("--trace", type=Path, help="also write the trajectory JSONL (reasoning, clicks, masks per step)")
    p.add_argument("--viz", type=Path, help="PNG: the trajectory strip (2D) or the key slice's (volumes)")
    _add_agent_options(p)

    p = sub.add_parser("render", help="draw a trajectory strip (image, clicks, mask and IoU per step)")
    p.add_argument("trajectory", type=Path, help="trajectory JSONL")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--case", help="case id (default: the first record)")
    p.add_argument("--target", help="target name (default: the case's first)")

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="what", required=True)
    b = bench.add_parser("tools", help="encode / click latency per tool; embedded cases/s per core")
    b.add_argument("--tool", dest="tools", action="append", help="tool spec (repeatable; default: all, random weights)")
    b.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in px (default: 256 512)")
    b.add_argument("--repeats", type=int, default=3)
    b = bench.add_parser("agent", help="per-step seconds: policy (prefill, decode), tool, rendering; both history modes")
    b.add_argument("--policy", default="tiny", help="policy spec (default: the tiny offline Qwen2.5-VL)")
    b.add_argument("--steps", type=int, default=4)
    b.add_argument("--cases", type=int, default=2)
    b.add_argument("--size", type=int, default=256)
    b.add_argument("--device", default=None)

    p = sub.add_parser("demo", help="simulate and evaluate the sample manifest on the embedded tool")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default: runs/demo)")
    p.add_argument("--manifest", type=Path, default=SAMPLE_MANIFEST)
    p.add_argument("--policy", default="bundled",
                   help="policy run beside the oracle (default: the bundled policy; 'none' skips it)")
    p.add_argument("--agent-steps", type=int, default=6, help="agent turns per case for --policy (default: 6)")
    _add_loop_options(p)
    _add_build_sft_parser(sub)
    _add_build_rl_parser(sub)
    _add_train_parser(sub)
    return parser


def _add_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder (a killed run started again resumes)")
    p.add_argument("--device", default="cpu", help="torch device for model-based tools (default: cpu)")
    p.add_argument("--prompts", type=Path, help="a TOML prompt file overriding the built-in wording")
    p.add_argument("--show-points", action="store_true",
                   help="list the points placed so far in each refinement turn (recorded in OUT/ibisagent.json; a "
                   "policy trained on the data carries it to inference)")
    p.add_argument("--max-pixels", type=int, default=262144,
                   help="policy image budget in pixels, as the processor's max_pixels (default: 262144)")
    p.add_argument("--min-pixels", type=int, default=3136, help="policy image minimum in pixels (default: 3136)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local process pool, or a Ray Data pipeline (joins $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_build_sft_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-sft", help="SFT dataset (datasets.save_to_disk) from expert trajectories")
    p.add_argument("trajectories", type=Path, help="trajectory JSONL from `ibisagent simulate`")
    p.add_argument("--history", choices=("off", "full"), default="off",
                   help="off: one row per turn (the released checkpoint's setting); full: one row per episode")
    p.add_argument("--manifest", type=Path, help="the manifest the trajectories came from (initial masks of "
                   "refinement cases; ground truth for the reasoning)")
    p.add_argument("--tool", default=None, help="tool spec to replay with, or `recorded` (the recorded masks stand in "
                   "for the tool; default: embedded for embedded records, else recorded)")
    p.add_argument("--reflective", type=float, default=0.0,
                   help="probability per trajectory of a self-correction and of a user-inconsistency episode")
    p.add_argument("--self-correction", type=float, default=None, help="override --reflective for self-correction")
    p.add_argument("--inconsistency", type=float, default=None, help="override --reflective for user inconsistency")
    p.add_argument("--max-steps", type=int, default=None, help="drop trajectories with more expert clicks")
    p.add_argument("--min-dice", type=float, default=None, help="drop trajectories with a lower final Dice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instruction-ratio", type=float, default=0.5,
                   help="share of episodes with a request from the instruction library (default: 0.5)")
    p.add_argument("--refinement-ratio", type=float, default=0.3,
                   help="share of single-target episodes with a library refinement prompt (default: 0.3)")
    p.add_argument("--teacher", help="reasoning from a teacher model: openai:URL#MODEL (any OpenAI-compatible server)")
    p.add_argument("--teacher-cache", type=Path, help="teacher reply cache (default: OUT/../teacher-cache)")
    p.add_argument("--teacher-rate", type=float, default=2.0, help="teacher requests per second (default: 2)")
    p.add_argument("--teacher-retries", type=int, default=2, help="new replies after a rejected one (default: 2)")
    p.add_argument("--llamafactory", action="store_true", help="also export OUT/llamafactory (ShareGPT layout)")
    _add_build_options(p)


def _add_build_rl_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-rl", help="RL rows (step, rollout, VQA) as parquet from a manifest")
    p.add_argument("manifest", type=Path)
    p.add_argument("--modes", nargs="+", choices=("step", "rollout", "vqa"), default=["step", "rollout", "vqa"])
    p.add_argument("--tool", default="embedded", help="tool spec of the expert states (default: embedded)")
    p.add_argument("--iou-stop", type=float, default=DEFAULT_IOU_STOP, help="expert stops at this IoU")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_CLICKS, help="expert step budget")
    p.add_argument("--rule", choices=("peak", "area"), default="peak", help="expert click rule")
    p.add_argument("--verl", action="store_true", help="also write OUT/verl/step.parquet (verl row layout)")
    _add_build_options(p)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="training: sft, grpo, or the one-command tiny recipe")
    stages = p.add_subparsers(dest="stage", required=True)
    for name, help_text in (("sft", "cold-start SFT on an SFT dataset (ibisagent build-sft)"),
                            ("grpo", "agentic GRPO (step or rollout mode) on a manifest")):
        s = stages.add_parser(name, help=help_text)
        s.add_argument("--config", type=Path, help="YAML run config (training/configs/); unknown keys are an error")
        s.add_argument("--out", type=Path, required=True, help="run folder: policy/, checkpoints/, logs")
        s.add_argument("--model", help="model directory or 'tiny' (overrides the config)")
        s.add_argument("--max-steps", type=int, help="optimizer steps (overrides the config)")
        s.add_argument("--minutes", type=float, help="stop training after this many minutes")
        s.add_argument("--no-resume", action="store_true", help="start over instead of resuming the last checkpoint")
        if name == "sft":
            s.add_argument("--data", type=Path, required=True, help="SFT dataset folder (datasets.save_to_disk)")
        else:
            s.add_argument("--manifest", type=Path, required=True, help="image–mask manifest (JSONL)")
            s.add_argument("--mode", choices=("step", "rollout"), help="GRPO mode (overrides the config)")
            s.add_argument("--anchor-from", type=Path, metavar="MANIFEST|JSON",
                           help="anchor the rows' simulated expert as the SFT data's was (`simulate --anchor-from`'s "
                           "manifest, or `train tiny`'s DIR/anchor_modes.json; overrides the config's anchor_from)")
            s.add_argument("--anchor-modes", type=int, metavar="N", help="with --anchor-from a manifest: as "
                           "`simulate --anchor-modes` (overrides the config's anchor_modes)")
            s.add_argument("--anchor-clicks", choices=ANCHOR_CLICK_CHOICES, help="with --anchor-from: as "
                           "`simulate --anchor-clicks` (overrides the config's anchor_clicks)")
            s.add_argument("--expert-max-clicks", type=int, metavar="N", help="the rows' expert's click budget, as "
                           "`simulate --max-clicks` (overrides the config's expert_max_clicks)")
    s = stages.add_parser("tiny", help="manifest → trajectories → SFT data → SFT → GRPO rollout → report, on a CPU")
    s.add_argument("manifest", type=Path, help="image–mask manifest (JSONL); a part is held out by image")
    s.add_argument("--out", type=Path, required=True, help="run folder (DIR/policy, DIR/report.json, curves)")
    s.add_argument("--minutes", type=float, default=45.0, help="time budget shared by all stages (default: 45)")
    s.add_argument("--extra", type=Path, action="append", default=[],
                   help="more training manifests (never held out; repeatable)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load_tool(spec: str, device: str):  # noqa: ANN202 - SegmentationTool, imported lazily
    from ibisagent.tools import load_tool

    return load_tool(spec, device=device)


def _run_oracle(args: argparse.Namespace):  # noqa: ANN202
    from ibisagent.evaluate import run_oracle

    tool = _load_tool(args.tool, args.device)
    anchors = None
    if getattr(args, "anchor_from", None):
        from ibisagent.data.manifest import expert_anchors

        anchors = expert_anchors(args.anchor_from, args.anchor_modes)
    return run_oracle(args.manifest, tool, iou_stop=args.iou_stop, max_steps=args.max_clicks, rule=args.rule,
                      progress=not args.no_progress, anchors=anchors,
                      anchor_clicks=getattr(args, "anchor_clicks", "first"))


def _meta(args: argparse.Namespace, policy: str) -> dict[str, object]:
    """The settings a run applied, and only those: the simulated expert's stop rule and click budget for the oracle;
    the agent's turn budget and decoding for a policy (``max_clicks`` is the budget NoC counts against in both)."""
    meta: dict[str, object] = {"manifest": str(args.manifest), "policy": policy, "tool": args.tool,
                               "max_clicks": args.max_clicks}
    if policy == "oracle":
        meta.update(iou_stop=args.iou_stop, rule=args.rule)
    else:
        meta.update(max_turns=args.max_turns, history=args.history, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, time_limit=args.time_limit,
                    prompts=str(args.prompts) if args.prompts else None)
    return meta


def cmd_simulate(args: argparse.Namespace) -> int:
    from ibisagent.data.trajectory import write_trajectories
    from ibisagent.evaluate import aggregate, format_table

    records, results = _run_oracle(args)
    write_trajectories(args.out, records)
    summary = aggregate(results, args.max_clicks)
    print(format_table(summary))
    print(f"\n{len(records)} trajectories → {args.out}")
    return _report_errors(results)


def cmd_eval(args: argparse.Namespace) -> int:
    from ibisagent.data.trajectory import write_trajectories
    from ibisagent.evaluate import format_table, write_results

    _prepare_dir(args.out)
    meta = _meta(args, args.policy)
    if args.policy == "oracle":
        records, results = _run_oracle(args)
    else:
        from ibisagent.evaluate import run_policy

        policy = _load_policy(args.policy, args.device, progress=not args.no_progress)
        config = _agent_config(args, args.max_turns)
        meta["show_points"] = config.env_for(policy).show_points  # the flag, or as the policy was trained
        records, results = run_policy(args.manifest, policy, _load_tool(args.tool, args.device), config,
                                      prompts=_prompts(args), progress=not args.no_progress)
    summary = write_results(args.out, results, meta, args.max_clicks)
    if args.trajectories:
        write_trajectories(args.out / "trajectories.jsonl", records)
    print(format_table(summary))
    print(f"\nresults → {args.out / 'results.json'}")
    return _report_errors(results)


def _agent_config(args: argparse.Namespace, max_turns: int):  # noqa: ANN202 - AgentConfig, imported lazily
    from ibisagent.agent import AgentConfig
    from ibisagent.policies import GenerationOptions

    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return AgentConfig(max_steps=max_turns, history=args.history, time_limit=args.time_limit, options=options,
                       show_points=args.show_points)


def _prompts(args: argparse.Namespace):  # noqa: ANN202 - Prompts | None
    from ibisagent.prompts import load_prompts

    return load_prompts(args.prompts) if args.prompts else None


def _default_policy() -> str:
    """The policy used without ``--policy``: ``bundled``, or ``tiny`` in an installation without it."""
    from ibisagent.policies import has_bundled_policy

    return "bundled" if has_bundled_policy() else "tiny"


def _load_policy(spec: str | None, device: str, progress: bool = True):  # noqa: ANN202 - Policy
    from ibisagent.policies import load_policy

    from ibisagent.policies import has_bundled_policy

    if spec is None and has_bundled_policy():
        log.warning("no --policy given: using the bundled policy, a 1.8 M-parameter model trained on real-MRI "
                    "slices and the sample data on a CPU (docs/TRAINING.md has its measured figures); pass hf:PATH / openai:URL#MODEL / "
                    "vllm:PATH for a real checkpoint")
        spec = "bundled"
    elif spec is None:
        log.warning("no --policy given and no bundled policy installed: using the offline tiny Qwen2.5-VL, which is "
                    "UNTRAINED (it wires the loop, it does not segment)")
        spec = "tiny"
    return load_policy(spec, device=None if device == "cpu" and spec in ("tiny", "bundled") else device,
                       progress=progress)


def _output_paths(out: Path, targets: Sequence[str]) -> dict[str, Path]:
    """One mask file per target: ``out`` itself for one target, ``out`` with ``_<target>`` before the suffix else.
    (A DICOM-SEG holds every target as a segment of one file.)"""
    if len(targets) == 1 or out.name.lower().endswith(".dcm"):
        return {targets[0]: out}
    suffix = "".join(out.suffixes)
    stem = out.name[: len(out.name) - len(suffix)] if suffix else out.name
    safe = {t: "".join(c if c.isalnum() or c in "-_" else "_" for c in t) for t in targets}
    return {t: out.with_name(f"{stem}_{safe[t]}{suffix}") for t in targets}


def _write_masks(masks: dict[str, object], image, out: Path, targets: Sequence[str],  # noqa: ANN001
                 provenance) -> list[Path]:  # noqa: ANN001
    """Write the masks with the library's one writer: a DICOM-SEG with every target as a segment, or one file per
    target."""
    import numpy as np

    from ibisagent.imaging import save_mask_like

    if out.name.lower().endswith(".dcm"):
        labels = np.zeros(np.shape(masks[targets[0]]), dtype=np.uint16)
        for index, name in enumerate(targets, start=1):
            labels[np.asarray(masks[name], dtype=bool) & (labels == 0)] = index
        mask = labels.astype(bool) if len(targets) == 1 else labels
        return [save_mask_like(mask, image, out, label_names=list(targets), provenance=provenance)]
    return [save_mask_like(masks[name], image, path) for name, path in _output_paths(out, targets).items()]


def cmd_segment(args: argparse.Namespace) -> int:
    from ibisagent.data.trajectory import TrajectoryRecord, write_trajectories
    from ibisagent.imaging import ImageError, Provenance, check_mask_output, display_window, load_image, slice_of
    from ibisagent.outcome import empty_mask_notes, failures, with_errors
    from ibisagent.policies.base import PolicyError
    from ibisagent.protocol import target_names
    from ibisagent.render import render_trajectory
    from ibisagent.volume import slice_rgb

    targets = target_names(args.prompt, args.target)
    image = load_image(args.image, modality=args.modality or None)
    try:
        check_mask_output(args.out, image)
    except ImageError as exc:
        raise ValueError(f"--out {exc}") from exc
    policy = _load_policy(args.policy, args.device)
    tool = _load_tool(args.tool, args.device)
    config = _agent_config(args, args.max_steps)
    provenance = Provenance(policy=args.policy or _default_policy(), tool=args.tool, person=False)
    try:
        runs, masks, key, summary = _run_segment(args, image, policy, tool, targets, config)
    except PolicyError:
        raise
    except Exception as exc:  # the tool (or the image pipeline) failed mid-run: say so, in the trace too
        why = f"tool_error: {type(exc).__name__}: {exc}"
        log.debug("segment failed", exc_info=True)
        if args.trace is not None:
            write_trajectories(args.trace, [TrajectoryRecord(
                id=args.image.name, instruction=args.prompt, image=str(args.image), target=t, tool=tool.name,
                source="policy", modality=image.modality, stop_reason="tool_error", error=why) for t in targets])
        print(f"ibisagent: the agent failed: {why}", file=sys.stderr)
        return 1
    written = _write_masks(masks, image, args.out, targets, provenance)
    windows = {k: display_window(slice_of(image, k), image.modality) for k, _ in runs}
    records = {k: with_errors(t.to_records(args.image.name, str(args.image), tool.name, modality=image.modality,
                                            slice=k if image.is_volume else None, window=windows[k].to_dict()), t)
               for k, t in runs}
    if args.trace is not None:
        write_trajectories(args.trace, [r for k, _ in runs for r in records[k]])
    if args.viz is not None and records[key]:
        render_trajectory(slice_rgb(image, key), records[key][0], args.viz)
    trace = f"; trace → {args.trace}" if args.trace is not None else ""
    print(f"{summary}\nmodality {image.modality or 'unknown'}, display {windows[key].describe()}\n"
          f"mask → {', '.join(str(p) for p in written)}{trace}")
    failed = failures((k if image.is_volume else None, t) for k, t in runs)
    for why in failed:
        print(f"ibisagent: the agent failed: {why}", file=sys.stderr)
    empty = empty_mask_notes(masks, dict(runs)[key], targets)  # the key slice's answer speaks for the volume
    for _, text in empty.values():
        print(f"ibisagent: {text}", file=sys.stderr)
    unexplained = [name for name, (explained, _) in empty.items() if not explained]
    return 1 if failed or unexplained else 0


def _run_segment(args: argparse.Namespace, image, policy, tool, targets, config):  # noqa: ANN001, ANN202
    """The agent on a 2D image or through a volume: ``(runs, masks, key slice, summary)``, ``runs`` being
    ``[(slice, trajectory)]`` (slice 0 for 2D)."""
    from ibisagent.agent import run_agent
    from ibisagent.volume import segment_volume, slice_rgb

    if image.is_volume:
        deadline = time.monotonic() + args.time_limit if args.time_limit is not None else None  # the whole volume
        result = segment_volume(policy, tool, image, args.prompt, targets, key_slice=args.slice,
                                slice_range=tuple(args.range) if args.range else None, config=config,
                                prompts=_prompts(args), propagation=args.propagation, deadline=deadline)
        runs = sorted(result.slices.items())
        masks, key = result.masks, result.key_slice
        summary = (f"key slice {key}; {len(result.slices)} slices visited; "
                   + "; ".join(f"{d}: {why}" for d, why in result.stops.items()))
    else:
        if args.slice is not None:
            log.warning("--slice ignored: %s is a 2D image", args.image)
        rgb = slice_rgb(image, 0)
        trajectory = run_agent(policy, tool.encode(rgb), rgb, args.prompt, targets, config=config,
                               prompts=_prompts(args))
        runs, masks, key = [(0, trajectory)], dict(trajectory.masks), 0
        summary = f"{len(trajectory.steps)} steps, stop: {trajectory.stop_reason}, answer: {trajectory.answer!r}"
    return runs, masks, key, summary


def cmd_render(args: argparse.Namespace) -> int:
    from ibisagent.data.trajectory import read_trajectories
    from ibisagent.imaging import load_image, slice_of, to_display_rgb
    from ibisagent.render import render_trajectory

    records = [r for r in read_trajectories(args.trajectory)
               if (args.case is None or r.id == args.case) and (args.target is None or r.target == args.target)]
    if not records:
        print(f"ibisagent: no trajectory for case={args.case!r} target={args.target!r} in {args.trajectory}",
              file=sys.stderr)
        return 2
    record = records[0]
    image = load_image(record.image)
    plane = slice_of(image, record.slice) if image.is_volume else image.array
    rgb = to_display_rgb(plane, record.modality or image.modality)
    render_trajectory(rgb, record, args.out)
    print(f"{record.id}/{record.target}: {len(record.steps)} steps → {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ibisagent.bench import DEFAULT_TOOL_SPECS, bench_agent, bench_tools, format_agent_bench, format_tool_bench

    if args.what == "agent":
        print(format_agent_bench(bench_agent(args.policy, size=args.size, steps=args.steps, cases=args.cases,
                                             device=args.device)))
        return 0
    rows = bench_tools(args.tools or list(DEFAULT_TOOL_SPECS), sizes=tuple(args.sizes), repeats=args.repeats)
    print(format_tool_bench(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ibisagent.data.trajectory import write_trajectories
    from ibisagent.evaluate import format_table, write_results

    out: Path = args.out
    _prepare_dir(out)
    records, results = _run_oracle(args)
    summary = write_results(out, results, _meta(args, "oracle"), args.max_clicks)
    write_trajectories(out / "trajectories.jsonl", records)
    # picture of the longest trajectory: the most instructive one to look at
    longest = max(records, key=lambda r: len(r.steps), default=None)
    if longest is not None:
        args_render = argparse.Namespace(trajectory=out / "trajectories.jsonl", out=out / "trajectory.png",
                                         case=longest.id, target=longest.target)
        cmd_render(args_render)
    print(format_table(summary))
    print(f"\nresults → {out / 'results.json'}, {out / 'results.md'}; picture → {out / 'trajectory.png'}")
    failed = _report_errors(results)
    from ibisagent.policies import has_bundled_policy

    if args.policy != "none" and (args.policy != "bundled" or has_bundled_policy()):
        failed = max(failed, _demo_agent(args, out / "agent"))
    return failed


def _demo_agent(args: argparse.Namespace, out: Path) -> int:
    """The agent itself (``--policy``) on the demo manifest: results, trajectories and a trajectory picture."""
    from ibisagent.agent import AgentConfig
    from ibisagent.data.trajectory import write_trajectories
    from ibisagent.evaluate import AGENT_STOPPED, format_table, run_policy, write_results
    from ibisagent.policies.base import GenerationOptions

    policy = _load_policy(args.policy, args.device, progress=not args.no_progress)
    config = AgentConfig(max_steps=args.agent_steps, options=GenerationOptions(max_new_tokens=160))
    records, results = run_policy(args.manifest, policy, _load_tool(args.tool, args.device), config,
                                  progress=not args.no_progress)
    applied = argparse.Namespace(**{"history": "off", "temperature": 0.0, "time_limit": None, "prompts": None,
                                    **vars(args), "max_turns": args.agent_steps, "max_new_tokens": 160})
    summary = write_results(out, results, _meta(applied, args.policy), args.max_clicks)
    write_trajectories(out / "trajectories.jsonl", records)
    longest = max(records, key=lambda r: len(r.steps), default=None)
    if longest is not None:
        cmd_render(argparse.Namespace(trajectory=out / "trajectories.jsonl", out=out / "trajectory.png",
                                      case=longest.id, target=longest.target))
    print(f"\nthe agent ({args.policy}) on the same cases:")
    print(format_table(summary))
    shares = {k: summary.get(k) for k in ("format_valid", "first_click_inside", "absent_not_present")}
    print("policy metrics: " + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in shares.items()))
    print(f"agent results → {out / 'results.json'}; picture → {out / 'trajectory.png'}")
    _report_errors(results)
    # a case where the agent gave no usable answer is the agent's result (reported above and in results.json, with
    # its stop reason); the demo itself fails only when a case could not be run at all
    return 1 if any(r.error and not r.error.startswith(AGENT_STOPPED) for r in results) else 0


def _prepare_dir(path: Path) -> None:
    """Create an output folder before any work, so a bad ``--out`` fails at once rather than after the whole run."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)


def _report_errors(results: Sequence[object]) -> int:
    failed = [r for r in results if getattr(r, "error", None)]
    for r in failed:
        print(f"FAILED {r.id}: {r.error}", file=sys.stderr)  # type: ignore[attr-defined]
    return 1 if failed else 0


def cmd_build_sft(args: argparse.Namespace) -> int:
    from ibisagent.data.reflect import ReflectiveRatios
    from ibisagent.data.sft import TeacherSpec, build_sft, format_stats

    teacher = None
    if args.teacher:
        from ibisagent.policies.openai import parse_openai_spec

        if not args.teacher.startswith("openai:"):
            raise ValueError(f"--teacher must be openai:URL#MODEL, got {args.teacher!r}")
        url, model = parse_openai_spec(args.teacher[len("openai:"):])
        cache = args.teacher_cache or args.out.parent / "teacher-cache"
        teacher = TeacherSpec(url=url, model=model, cache_dir=str(cache.resolve()), per_second=args.teacher_rate,
                              retries=args.teacher_retries)
    ratios = ReflectiveRatios(
        args.reflective if args.self_correction is None else args.self_correction,
        args.reflective if args.inconsistency is None else args.inconsistency)
    _prepare_dir(args.out)
    stats = build_sft(args.trajectories, args.out, history=args.history, reflective=ratios, max_steps=args.max_steps,
                      min_dice=args.min_dice, seed=args.seed, tool=args.tool, device=args.device,
                      manifest=args.manifest, teacher=teacher, prompts=args.prompts,
                      instruction_ratio=args.instruction_ratio, refinement_ratio=args.refinement_ratio,
                      min_pixels=args.min_pixels, max_pixels=args.max_pixels, workers=args.workers,
                      engine=args.engine, progress=not args.no_progress, llamafactory=args.llamafactory,
                      show_points=args.show_points)
    print(format_stats(stats))
    print(f"\n{stats['rows']} rows → {args.out} (datasets.load_from_disk); skipped and filtered cases: "
          f"{args.out / 'report.jsonl'}")
    return 0


def cmd_build_rl(args: argparse.Namespace) -> int:
    from ibisagent.data.rl import build_rl

    _prepare_dir(args.out)
    stats = build_rl(args.manifest, args.out, modes=args.modes, tool=args.tool, device=args.device,
                     iou_stop=args.iou_stop, max_steps=args.max_steps, rule=args.rule, prompts=args.prompts,
                     min_pixels=args.min_pixels, max_pixels=args.max_pixels, workers=args.workers,
                     engine=args.engine, progress=not args.no_progress, verl=args.verl,
                     show_points=args.show_points)
    lines = ["| modality | " + " | ".join(stats["rows"]) + " |", "|---|" + "---|" * len(stats["rows"])]
    for modality, counts in stats["per_modality"].items():
        lines.append(f"| {modality or '(none)'} | " + " | ".join(str(counts.get(m, 0)) for m in stats["rows"]) + " |")
    lines.append("| **all** | " + " | ".join(str(n) for n in stats["rows"].values()) + " |")
    print("\n".join(lines))
    print(f"\nparquet → {args.out}; {stats['skipped']} case(s) skipped (reasons in {args.out / 'report.jsonl'})")
    for mode, why in stats["empty"].items():
        print(f"no {mode}.parquet: {why}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``train sft|grpo|tiny``: the training entry points (also what the MONAI Label train tasks run)."""
    if args.stage == "tiny":
        from ibisagent.train.recipe import run_recipe

        report = run_recipe(args.manifest, args.out, minutes=args.minutes, extra=args.extra, seed=args.seed,
                            progress=not args.no_progress)
        print(f"policy: {report['policy']}  (report: {args.out / 'report.json'})")
        return 0
    from ibisagent.train.config import GRPORunConfig, SFTRunConfig, load_config

    overrides: dict[str, object] = {"model": args.model, "max_steps": args.max_steps,
                                    "max_seconds": args.minutes * 60 if args.minutes is not None else None}
    if args.stage == "sft":
        from ibisagent.train.sft import run_sft

        result = run_sft(load_config(SFTRunConfig, args.config, overrides), args.data, args.out,
                         resume=not args.no_resume)
        print(f"policy: {result.policy}  (dataset: {result.summary()})")
        return 0
    from ibisagent.train.grpo import run_grpo

    overrides["mode"] = args.mode
    overrides.update({"anchor_from": str(args.anchor_from) if args.anchor_from else None,
                      "anchor_modes": args.anchor_modes, "anchor_clicks": args.anchor_clicks,
                      "expert_max_clicks": args.expert_max_clicks})
    policy, _ = run_grpo(load_config(GRPORunConfig, args.config, overrides), args.manifest, args.out,
                         resume=not args.no_resume)
    print(f"policy: {policy}")
    return 0


COMMANDS = {"simulate": cmd_simulate, "eval": cmd_eval, "segment": cmd_segment, "render": cmd_render,
            "bench": cmd_bench, "demo": cmd_demo, "build-sft": cmd_build_sft, "build-rl": cmd_build_rl,
            "train": cmd_train}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ibisagent.policies.base import PolicyError

    try:
        return COMMANDS[args.command](args)
    except PolicyError as exc:
        print(f"ibisagent: the policy failed: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        from ibisagent.data.reasoning import TeacherUnavailable

        if not isinstance(exc, TeacherUnavailable):
            raise
        print(f"ibisagent: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"ibisagent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
