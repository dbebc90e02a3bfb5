"""What reading the image is worth for the first click, and what small learners reach from a manifest in minutes.

For a train/test manifest pair (cases loaded as the product loads them, :func:`ibisagent.data.manifest.load_case`),
each present target's expert first click is :func:`ibisagent.clicks.next_click` on an empty mask (the paper's rule:
the target's deepest point, no anchor). The figure is the share of the test targets that a first click lands inside,
the click coming from:

* ``blind_mean``: each target name's mean training click (the rule of the recipe's image-blind baseline, here over
  the deepest-point clicks);
* ``blind_anchor``: each name's click anchor (:func:`ibisagent.clicks.click_anchor`, the strongest blind click);
* ``nearest_image``: the click of the training image (same name) whose 8 × 8 :func:`ibisagent.clicks.image_layout`
  is nearest — memory, no learning: what the pixels say, at the recipe model's token grid;
* ``mlp``: a two-layer perceptron on that 8 × 8 layout and a name embedding, regressing the click (L1);
* ``vit`` / ``vit_no_position``: a 2-block, 64-wide transformer over 28-px patches of the 224-px grey image (8 × 8
  tokens, the recipe model's merged grid) with a name token, with and without a learned absolute position
  embedding (Qwen2.5-VL has none: its towers use rotary positions only);
* ``tiny_qwen`` (not run by default): the recipe's Qwen2.5-VL (:func:`ibisagent.policies.tiny.build_tiny_qwen2_5_vl`
  with :mod:`ibisagent.train.recipe`'s sizes, tokenizer trained on the requests), taught to answer "Segment the
  NAME." with the click's action line (``Positive Point (x, y)``, :func:`ibisagent.protocol.format_action`), the
  loss on the answer alone (AdamW, lr 2e-3, batch 8), read back greedily.

The learners train from scratch for ``--minutes`` each on one thread (the same seed; the small ones AdamW, batch 16),
evaluated every 250 steps (``tiny_qwen``: half-way and at the end); each reports its final figure and the mean over
the second half of its evaluations (a hundred test targets make single evaluations noisy). Used to tell whether a policy's first click is held back by what the
manifest's pixels can say or by the learner (docs/TRAINING.md, *What the pixels say*).

Run: ``PYTHONPATH=lib .venv/bin/python benchmarks/first_click_ceiling.py TRAIN TEST [--minutes 3]
[--learners mlp,vit,vit_no_position,tiny_qwen] [--work DIR]``. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from ibisagent.clicks import click_anchor, image_layout, next_click
from ibisagent.data.manifest import load_case, read_cases
from ibisagent.observation import GRID_FACTOR
from ibisagent.protocol import Action, ProtocolError, format_action, parse_action_line, to_pixel, to_relative
from ibisagent.train import recipe

SIZE = math.isqrt(recipe.MAX_PIXELS)  # the recipe model's image side: 8 × 8 merged tokens of GRID_FACTOR px
PATCH = GRID_FACTOR
GRID = SIZE // PATCH


@dataclass(frozen=True)
class FirstClick:
    """One present target: ``rgb`` the (H, W, 3) uint8 display image, ``grey`` it as (SIZE, SIZE) float32 in 0–1,
    ``name`` case-folded, ``click`` the expert's first click as relative ``(x, y)``, ``mask`` (H, W) bool."""

    rgb: np.ndarray
    grey: np.ndarray
    name: str
    click: tuple[float, float]
    mask: np.ndarray


def first_clicks(manifest: Path) -> list[FirstClick]:
    """Every present target of ``manifest`` with the expert's first click (the deepest point)."""
    found = []
    for case in read_cases(manifest):
        loaded = load_case(case)
        grey = cv2.resize(loaded.rgb.mean(axis=2).astype(np.float32) / 255.0, (SIZE, SIZE),
                          interpolation=cv2.INTER_AREA)
        for name, mask in loaded.targets.items():
            if mask is not None:
                click = next_click(mask, np.zeros_like(mask))
                h, w = mask.shape
                found.append(FirstClick(loaded.rgb, grey, name.casefold(), to_relative(click.x, click.y, w, h), mask))
    return found


def inside(mask: np.ndarray, click: tuple[float, float]) -> bool:
    """Whether relative ``(x, y)`` (clipped to [0, 1]) falls on a pixel of the (H, W) mask."""
    h, w = mask.shape
    x, y = to_pixel(min(max(click[0], 0.0), 1.0), min(max(click[1], 0.0), 1.0), w, h)
    return bool(mask[y, x])


def share_inside(test: list[FirstClick], clicks: list[tuple[float, float] | None]) -> float:
    """Share of ``test`` whose click (``None``: none given) is inside its mask."""
    return round(float(np.mean([c is not None and inside(t.mask, c) for t, c in zip(test, clicks)])), 3)


def blind(train: list[FirstClick], test: list[FirstClick]) -> dict[str, float]:
    points: dict[str, list[tuple[float, float]]] = {}
    for t in train:
        points.setdefault(t.name, []).append(t.click)
    everything = tuple(np.mean([c for cs in points.values() for c in cs], axis=0))
    mean = {name: tuple(np.mean(cs, axis=0)) for name, cs in points.items()}
    anchor = {name: click_anchor(t.mask for t in train if t.name == name) for name in points}
    return {"blind_mean": share_inside(test, [mean.get(t.name, everything) for t in test]),
            "blind_anchor": share_inside(test, [anchor.get(t.name) or (0.5, 0.5) for t in test])}


def nearest_image(train: list[FirstClick], test: list[FirstClick]) -> float:
    layouts = [image_layout(t.grey, GRID) for t in train]
    clicks = []
    for t in test:
        query = image_layout(t.grey, GRID)
        same = [i for i, u in enumerate(train) if u.name == t.name] or list(range(len(train)))
        clicks.append(train[min(same, key=lambda i: float(((layouts[i] - query) ** 2).sum()))].click)
    return share_inside(test, clicks)


def _learner(kind: str, n_names: int):
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.name = nn.Embedding(n_names, 64)
            self.net = nn.Sequential(nn.Linear(GRID * GRID + 64, 256), nn.GELU(), nn.Linear(256, 2))

        def forward(self, grey, name):
            layout = nn.functional.avg_pool2d(grey, PATCH).flatten(1)  # image_layout's standardised thumbnail
            layout = (layout - layout.mean(1, keepdim=True)) / layout.std(1, unbiased=False, keepdim=True).clamp(1e-6)
            return torch.sigmoid(self.net(torch.cat([layout, self.name(name)], 1)))

    class ViT(nn.Module):
        def __init__(self, position: bool, width: int = 64) -> None:
            super().__init__()
            self.patches = nn.Conv2d(1, width, PATCH, PATCH)
            self.position = nn.Parameter(torch.randn(GRID * GRID, width) * 0.02) if position else None
            self.name = nn.Embedding(n_names, width)
            layer = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(width, 2)

        def forward(self, grey, name):
            tokens = self.patches(grey).flatten(2).transpose(1, 2)
            if self.position is not None:
                tokens = tokens + self.position
            tokens = torch.cat([self.name(name)[:, None], tokens], 1)
            return torch.sigmoid(self.head(self.blocks(tokens)[:, 0]))

    return {"mlp": MLP, "vit": lambda: ViT(True), "vit_no_position": lambda: ViT(False)}[kind]()


def train_learner(kind: str, train: list[FirstClick], test: list[FirstClick], minutes: float,
                  seed: int = 0) -> dict[str, float | int]:
    """Train one small learner from scratch for ``minutes`` (one thread); its final and late-mean share inside."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    names = sorted({t.name for t in train})

    def index(name: str) -> int:
        return names.index(name) if name in names else 0

    x_train = torch.tensor(np.stack([t.grey for t in train]))[:, None]
    n_train = torch.tensor([index(t.name) for t in train])
    y_train = torch.tensor(np.array([t.click for t in train], dtype=np.float32))
    x_test = torch.tensor(np.stack([t.grey for t in test]))[:, None]
    n_test = torch.tensor([index(t.name) for t in test])
    model = _learner(kind, len(names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    figures, steps, start = [], 0, time.monotonic()
    while time.monotonic() - start < minutes * 60:
        batch = torch.tensor(rng.choice(len(train), 16))
        loss = (model(x_train[batch], n_train[batch]) - y_train[batch]).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
        if steps % 250 == 0:
            model.eval()
            with torch.no_grad():
                figures.append(share_inside(test, [tuple(c) for c in model(x_test, n_test).tolist()]))
            model.train()
    return _summary(figures, steps)


def _summary(figures: list[float], steps: int) -> dict[str, float | int]:
    late = figures[len(figures) // 2:] or [float("nan")]
    return {"final": figures[-1] if figures else float("nan"), "late_mean": round(float(np.mean(late)), 3),
            "steps": steps}


def train_tiny_qwen(train: list[FirstClick], test: list[FirstClick], minutes: float, work: Path,
                    seed: int = 0) -> dict[str, float | int]:
    """The recipe's tiny Qwen2.5-VL taught the first click alone (see the module docstring)."""
    import torch
    from ibisagent.policies.tiny import build_tiny_qwen2_5_vl
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    rng = random.Random(seed)

    def request(name: str) -> str:
        return f"Segment the {name}."

    def answer(t: FirstClick) -> str:
        return format_action(Action("positive", *t.click))

    build_tiny_qwen2_5_vl(work, seed=seed, hidden_size=recipe.HIDDEN_SIZE, num_layers=recipe.NUM_LAYERS,
                          max_pixels=recipe.MAX_PIXELS, vocab_size=recipe.VOCAB_SIZE,
                          vision_hidden_size=recipe.VISION_HIDDEN_SIZE,
                          corpus=[request(t.name) for t in train] + [answer(t) for t in train])
    processor = AutoProcessor.from_pretrained(work)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(work)
    images = {id(t.rgb): Image.fromarray(t.rgb) for t in train + test}

    def chat(t: FirstClick, with_answer: bool) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request(t.name)}]}]
        if with_answer:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer(t)}]})
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=not with_answer)

    def evaluate() -> float:
        model.eval()
        clicks: list[tuple[float, float] | None] = []
        with torch.no_grad():
            for t in test:
                enc = processor(text=[chat(t, False)], images=[images[id(t.rgb)]], return_tensors="pt")
                out = model.generate(**enc, max_new_tokens=32, do_sample=False)
                text = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                try:
                    action = parse_action_line(text.strip().splitlines()[0] if text.strip() else "")
                    clicks.append((action.x, action.y) if action.is_click else None)
                except ProtocolError:
                    clicks.append(None)
        model.train()
        return share_inside(test, clicks)

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    figures, steps, start, halfway = [], 0, time.monotonic(), False
    while time.monotonic() - start < minutes * 60:
        batch = rng.sample(train, min(8, len(train)))
        enc = processor(text=[chat(t, True) for t in batch], images=[images[id(t.rgb)] for t in batch],
                        return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone().fill_(-100)
        for b, t in enumerate(batch):  # the answer's tokens and the <|im_end|> after it
            n = len(processor.tokenizer(answer(t), add_special_tokens=False)["input_ids"])
            last = int(enc["attention_mask"][b].nonzero()[-1])  # the template ends "<|im_end|>\n"
            labels[b, last - 1 - n:last] = enc["input_ids"][b, last - 1 - n:last]
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
        if not halfway and time.monotonic() - start >= minutes * 30:
            figures.append(evaluate())
            halfway = True
    figures.append(evaluate())
    return _summary(figures, steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("--minutes", type=float, default=3.0, help="training time of each learner")
    parser.add_argument("--learners", default="mlp,vit,vit_no_position")
    parser.add_argument("--work", type=Path, default=None, help="folder for the tiny model (default: a temporary one)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    train, test = first_clicks(args.train), first_clicks(args.test)
    result: dict[str, object] = {"train_targets": len(train), "test_targets": len(test), **blind(train, test),
                                 "nearest_image": nearest_image(train, test), "minutes": args.minutes}
    for kind in filter(None, args.learners.split(",")):
        if kind == "tiny_qwen":
            with tempfile.TemporaryDirectory() as tmp:
                result[kind] = train_tiny_qwen(train, test, args.minutes, args.work or Path(tmp) / "model")
        else:
            result[kind] = train_learner(kind, train, test, args.minutes)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
