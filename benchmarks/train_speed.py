"""Tokens/s and peak memory of SFT and GRPO steps of the recipe's small model (1.8 M parameters) on this CPU.

    PYTHONPATH=lib python benchmarks/train_speed.py --steps 5 [--out runs/bench_train]

SFT: full fine-tuning on conversations of the oracle stepping the environment on small synthetic cases (default
prompts, history off, the recipe's image budget), once with the recipe's tokenizer (each fixed prompt text one token,
``train.recipe.prompt_phrases``) and once with a plain BPE of the same size (``sft-plain``), side by side. GRPO:
rollout mode with the recipe's executed turns per rollout, 4 generations, one prompt per step (the recipe takes 8).
Tokens/s is trl's ``num_tokens`` (prompt + completion tokens the step trained on) over the step wall time; rows/s
the conversations (SFT) or prompts (GRPO) trained per second (batch 1); peak memory is the process's maximum resident
set size. Each stage runs in its own child process so peaks do not mix, and builds its model afresh.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "lib"), str(ROOT / "tests")]


def stage(name: str, out: Path, steps: int) -> dict:
    from train_data import write_manifest

    from ibisagent.policies.tiny import build_tiny_qwen2_5_vl
    from ibisagent.train.config import GRPORunConfig, LoraSettings, SFTRunConfig
    from ibisagent.train.environment import EnvSettings
    from ibisagent.train.recipe import (
        GRPO_MAX_TURNS,
        HIDDEN_SIZE,
        MAX_PIXELS,
        NUM_LAYERS,
        VISION_HIDDEN_SIZE,
        prompt_phrases,
    )

    manifest = write_manifest(out / "data", cases=3, size=224)
    model = out / ("model_plain" if name == "sft-plain" else "model")
    shutil.rmtree(model, ignore_errors=True)
    build_tiny_qwen2_5_vl(model, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS, max_pixels=MAX_PIXELS,
                          vision_hidden_size=VISION_HIDDEN_SIZE,
                          phrases=() if name == "sft-plain" else prompt_phrases())
    start = time.perf_counter()
    if name.startswith("sft"):
        from train_data import oracle_sft_dataset

        from ibisagent.train.sft import run_sft

        data = oracle_sft_dataset(manifest, out / f"{name}_data", EnvSettings(max_steps=6, max_pixels=MAX_PIXELS),
                                  repeat=steps)
        result = run_sft(SFTRunConfig(model=str(model), lora=LoraSettings(enabled=False), max_steps=steps,
                                      save_steps=10**6), data, out / name, resume=False)
        log = result.log_history
    else:
        from ibisagent.train.grpo import run_grpo

        _, log = run_grpo(GRPORunConfig(model=str(model), mode="rollout", lora=LoraSettings(enabled=False),
                                        max_steps=steps, num_generations=4, max_turns=GRPO_MAX_TURNS,
                                        max_completion_length=1024,
                                        max_pixels=MAX_PIXELS, save_steps=10**6), manifest, out / "grpo",
                          resume=False, progress=False)
    wall = time.perf_counter() - start
    train = next(h for h in log if "train_runtime" in h)
    tokens = max(h.get("num_tokens", 0) for h in log)
    return {"stage": name, "steps": steps, "tokens": tokens, "train_seconds": round(train["train_runtime"], 2),
            "tokens_per_s": round(tokens / train["train_runtime"], 1),
            "seconds_per_step": round(train["train_runtime"] / steps, 2), "wall_seconds": round(wall, 1),
            "rows_per_s": round(steps / train["train_runtime"], 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_train")
    parser.add_argument("--stage", choices=("sft-plain", "sft", "grpo"))
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.out, args.steps)))
        return 0
    rows = []
    for name in ("sft-plain", "sft", "grpo"):
        proc = subprocess.run([sys.executable, __file__, "--stage", name, "--steps", str(args.steps), "--out",
                               str(args.out)], capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print("| stage | steps | tokens/step | tokens/s | rows/s | s/step | peak RSS (MiB) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['steps']} | {round(r['tokens'] / r['steps'])} | {r['tokens_per_s']} | "
              f"{r['rows_per_s']} | {r['seconds_per_step']} | {r['peak_rss_mib']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
