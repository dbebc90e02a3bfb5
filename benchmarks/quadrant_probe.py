"""Does the recipe's small model learn *where* at all? A 4-way quadrant probe, stripped of the agent's grammar.

The pointing probe's disks (:func:`pointing_probe.disk_manifest`), but the answer is only the disk's quadrant —
"upper left", "upper right", "lower left" or "lower right" — after "Where is the lesion?": no reasoning text, no
coordinates, the loss on the answer tokens alone. The model is the recipe's (:mod:`ibisagent.train.recipe` sizes,
:func:`ibisagent.policies.tiny.build_tiny_qwen2_5_vl`), trained with AdamW (batch 8) for ``--minutes`` on one thread;
the accuracy is over unseen disks, each answer chosen as the likeliest of the four (chance 0.25). A model that can
point passes this within minutes; the measured figures are in docs/TRAINING.md (*Is the vision tower the obstacle?*).

Run: ``PYTHONPATH=lib:benchmarks python benchmarks/quadrant_probe.py OUT [--minutes 5] [--vision train|frozen]
[--rope-theta 10]``. Prints one JSON line: ``accuracy``, ``steps``, the settings.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

ANSWERS = ("upper left", "upper right", "lower left", "lower right")
QUESTION = "Where is the lesion?"


def quadrant_cases(manifest: Path) -> list[tuple[Image.Image, str]]:
    """``(image, answer)`` per manifest line: the quadrant of the target mask's centroid."""
    cases = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        mask = np.asarray(Image.open(manifest.parent / case["targets"][0]["mask"])) > 0
        ys, xs = np.nonzero(mask)
        row = "upper" if ys.mean() < mask.shape[0] / 2 else "lower"
        col = "left" if xs.mean() < mask.shape[1] / 2 else "right"
        cases.append((Image.open(manifest.parent / case["image"]).convert("RGB"), f"{row} {col}"))
    return cases


def encode(processor, cases: list[tuple[Image.Image, str]]):
    """The batch's model inputs and labels (-100 everywhere but the answer tokens)."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
         {"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False)
        for _, answer in cases]
    enc = processor(text=texts, images=[image for image, _ in cases], return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone().fill_(-100)
    for b, (_, answer) in enumerate(cases):
        n = len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
        last = int(enc["attention_mask"][b].nonzero()[-1])  # the template ends "<|im_end|>\n"
        labels[b, last - 1 - n:last - 1] = enc["input_ids"][b, last - 1 - n:last - 1]
    return enc, labels


def accuracy(model, processor, cases: list[tuple[Image.Image, str]]) -> float:
    """Share of cases whose likeliest answer of :data:`ANSWERS` is the right one."""
    import torch

    right = 0
    with torch.no_grad():
        for image, answer in cases:
            enc, labels = encode(processor, [(image, a) for a in ANSWERS])
            logits = model(**enc).logits[:, :-1]
            target = labels[:, 1:]
            logp = torch.log_softmax(logits.float(), -1).gather(2, target.clamp(min=0)[..., None])[..., 0]
            scores = (logp * (target != -100)).sum(1)
            right += ANSWERS[int(scores.argmax())] == answer
    return right / len(cases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--train", type=int, default=1600)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--vision", choices=("train", "frozen"), default="train")
    parser.add_argument("--rope-theta", type=float, default=None, help="language RoPE base (default: the recipe's)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    args = parser.parse_args(argv)

    import torch
    from ibisagent.policies.tiny import TINY_ROPE_THETA, build_tiny_qwen2_5_vl
    from ibisagent.train import recipe
    from ibisagent.train.common import freeze_vision
    from pointing_probe import disk_manifest
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    out: Path = args.out
    train = quadrant_cases(disk_manifest(out / "train", args.train, seed=0))
    test = quadrant_cases(disk_manifest(out / "test", args.test, seed=1))
    theta = TINY_ROPE_THETA if args.rope_theta is None else args.rope_theta
    build_tiny_qwen2_5_vl(out / "base", seed=0, hidden_size=recipe.HIDDEN_SIZE, num_layers=recipe.NUM_LAYERS,
                          max_pixels=recipe.MAX_PIXELS, corpus=[QUESTION, *ANSWERS], vocab_size=recipe.VOCAB_SIZE,
                          vision_hidden_size=recipe.VISION_HIDDEN_SIZE, rope_theta=theta)
    processor = AutoProcessor.from_pretrained(out / "base")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "base")
    if args.vision == "frozen":
        freeze_vision(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=0.0)
    model.train()
    steps, start = 0, time.monotonic()
    while time.monotonic() - start < args.minutes * 60:
        enc, labels = encode(processor, rng.sample(train, 8))
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    model.eval()
    result = {"accuracy": accuracy(model, processor, test), "steps": steps, "minutes": args.minutes,
              "vision": args.vision, "rope_theta": theta, "learning_rate": args.learning_rate}
    print(json.dumps(result))
    (out / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
