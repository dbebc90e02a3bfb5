"""Can the recipe's small policy point? A synthetic first-click probe for ``ibisagent train tiny``'s model.

Each image is a textured grey background with one bright disk (radius 12–28 px, centre anywhere in the middle 70 % of
a 224 × 224 image) and the request "Segment the lesion."; the simulated expert's first click is the disk's centre
(its deepest point, no anchor). The recipe's model (:func:`ibisagent.policies.tiny.build_tiny_qwen2_5_vl` with the
recipe's sizes and SFT settings) is trained for ``--minutes`` on the first turns only and evaluated on unseen disks:
the share of first clicks inside the disk. A policy that ignores the image clicks one place for every image and is
inside a few per cent of the disks. The task is harder than it looks: the background is smoothed noise whose bright
blobs are the disk's size, and with 1600 training disks the from-scratch learners tried here do poorly in minutes
— a small ViT with learned absolute positions clicks one place too, a thumbnail MLP is inside 0.22
(``benchmarks/first_click_ceiling.py``, docs/BENCHMARKS.md) — so a policy's failure here says the data are too few
for a from-scratch model, not that it cannot point.

Run: ``PYTHONPATH=lib .venv/bin/python benchmarks/pointing_probe.py OUT [--minutes 12] [--train 1600] [--test 150]``
(one thread; about ``minutes`` + 3 minutes). Prints one JSON line: ``first_click_inside``, the number of distinct
first clicks, training steps and the last loss.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

SIZE = 224


def disk_manifest(out: Path, n: int, seed: int) -> Path:
    """``n`` disk images and masks under ``out`` and their manifest ``out/manifest.jsonl``."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    lines = []
    for i in range(n):
        background = gaussian_filter(rng.normal(0.0, 1.0, (SIZE, SIZE)), 6)
        background = 80 + 40 * background / (background.std() + 1e-6)
        radius = rng.uniform(12, 28)
        cx, cy = rng.uniform(0.15, 0.85, 2) * SIZE
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        image = np.clip(background + 90 * disk + rng.normal(0, 5, disk.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(out / "images" / f"{i}.png")
        Image.fromarray(disk.astype(np.uint8) * 255).save(out / "images" / f"{i}_mask.png")
        lines.append({"id": f"disk{i}", "image": f"images/{i}.png", "modality": "MRI",
                      "instruction": "Segment the lesion.",
                      "targets": [{"name": "lesion", "mask": f"images/{i}_mask.png"}]})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return manifest


def first_turns(sft_data: Path, out: Path) -> Path:
    """The SFT dataset's first-turn rows (:func:`ibisagent.train.sft.first_turn_rows`) as a dataset of their own."""
    from datasets import load_from_disk
    from ibisagent.train.sft import first_turn_rows

    dataset = load_from_disk(str(sft_data))
    keep = sorted(first_turn_rows(sft_data, len(dataset)))
    dataset.select(keep).save_to_disk(str(out))
    rows = (sft_data / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    (out / "rows.jsonl").write_text("".join(rows[i] + "\n" for i in keep), encoding="utf-8")
    shutil.copy(sft_data / "ibisagent.json", out / "ibisagent.json")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--train", type=int, default=1600)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--vision", choices=("train", "frozen"), default="train")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    args = parser.parse_args(argv)

    import torch
    from ibisagent.data.sft import build_sft
    from ibisagent.data.trajectory import write_trajectories
    from ibisagent.evaluate import run_oracle
    from ibisagent.policies.tiny import TINY_MIN_PIXELS, build_tiny_qwen2_5_vl
    from ibisagent.tools import load_tool
    from ibisagent.train import recipe
    from ibisagent.train.config import LoraSettings, SFTRunConfig
    from ibisagent.train.sft import run_sft

    torch.set_num_threads(1)
    out: Path = args.out
    train = disk_manifest(out / "train", args.train, seed=0)
    test = disk_manifest(out / "test", args.test, seed=1)
    records, _ = run_oracle(train, load_tool("embedded"), progress=False, max_steps=1)
    write_trajectories(out / "trajectories.jsonl", records)
    build_sft(out / "trajectories.jsonl", out / "sft_all", history="off", reflective=None, seed=0, manifest=train,
              min_pixels=TINY_MIN_PIXELS, max_pixels=recipe.MAX_PIXELS, workers=1, progress=False,
              show_points=recipe.SHOW_POINTS)
    data = first_turns(out / "sft_all", out / "sft_first")
    base = build_tiny_qwen2_5_vl(out / "base", seed=0, hidden_size=recipe.HIDDEN_SIZE, num_layers=recipe.NUM_LAYERS,
                                 max_pixels=recipe.MAX_PIXELS, corpus=recipe.tokenizer_corpus(data),
                                 vocab_size=recipe.VOCAB_SIZE, vision_hidden_size=recipe.VISION_HIDDEN_SIZE,
                                 phrases=recipe.prompt_phrases())
    config = SFTRunConfig(model=str(base), lora=LoraSettings(enabled=False), train_vision=args.vision == "train",
                          learning_rate=2e-3, weight_decay=args.weight_decay,
                          epochs=1000, batch_size=4, max_seconds=args.minutes * 60, time_decay=True, save_steps=100000,
                          max_length=4096, first_turn_repeats=1, seed=0)
    run_sft(config, data, out / "sft")
    summary = recipe.evaluate_policy(out / "sft" / "policy", test, out / "eval", max_steps=1, progress=False)
    firsts = set()
    for line in (out / "eval" / "trajectories.jsonl").read_text(encoding="utf-8").splitlines():
        steps = json.loads(line)["steps"]
        if steps and steps[0]["clicks"]:
            firsts.add((steps[0]["clicks"][0]["x"], steps[0]["clicks"][0]["y"]))
    log = json.loads((out / "sft" / "sft_log.json").read_text(encoding="utf-8"))
    result = {"first_click_inside": summary["first_click_inside"], "distinct_first_clicks": len(firsts),
              "format_valid": summary["format_valid"], "steps": max(h.get("step", 0) for h in log),
              "last_loss": next(h["loss"] for h in reversed(log) if "loss" in h), "minutes": args.minutes}
    print(json.dumps(result))
    (out / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
