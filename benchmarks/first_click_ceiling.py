"""What reading the image is worth for the first click, and what small learners reach from a manifest in minutes.

For a train/test manifest pair (cases loaded as the product loads them, :func:`ibisagent.data.manifest.load_case`),
each present target's expert first click is :func:`ibisagent.clicks.next_click` on an empty mask (the paper's rule:
the target's deepest point, no anchor). The figure is the share of the test targets that a first click lands inside,
the click coming from:

* ``blind_mean``: each target name's mean training click (the recipe's image-blind baseline);
* ``blind_anchor``: each name's click anchor (:func:`ibisagent.clicks.click_anchor`, the strongest blind click);
* ``nearest_image``: the click of the training image (same name) whose 8 × 8 :func:`ibisagent.clicks.image_layout`
  is nearest — memory, no learning: what the pixels say, at the recipe model's token grid;
* ``mlp``: a two-layer perceptron on that 8 × 8 layout and a name embedding, regressing the click (L1);
* ``vit`` / ``vit_no_position``: a 2-block, 64-wide transformer over 28-px patches of the 224-px grey image (8 × 8
  tokens, the recipe model's merged grid) with a name token, with and without a learned absolute position
  embedding (Qwen2.5-VL has none: its towers use rotary positions only).

The learners train from scratch for ``--minutes`` each on one thread (AdamW, batch 16, the same seed), evaluated
every 250 steps; each reports its final figure and the mean over the second half of its evaluations (a hundred test
targets make single evaluations noisy). Used to tell whether a policy's first click is held back by what the
manifest's pixels can say or by the learner (docs/TRAINING.md, *What the pixels say*).

Run: ``PYTHONPATH=lib .venv/bin/python benchmarks/first_click_ceiling.py TRAIN TEST [--minutes 3]
[--learners mlp,vit,vit_no_position]``. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from ibisagent.clicks import click_anchor, image_layout, next_click
from ibisagent.data.manifest import load_case, read_cases

SIZE = 224  # the recipe model's image side (MAX_PIXELS = 224 * 224): 8 × 8 merged tokens of 28 px
PATCH = 28
GRID = SIZE // PATCH


def first_clicks(manifest: Path) -> list[tuple[np.ndarray, str, tuple[float, float], np.ndarray]]:
    """``(grey, name, click, mask)`` per present target: the (SIZE, SIZE) float32 grey display image in 0–1, the
    case-folded target name, the expert's first click as relative ``(x, y)`` and the (H, W) bool mask."""
    found = []
    for case in read_cases(manifest):
        loaded = load_case(case)
        grey = cv2.resize(loaded.rgb.mean(axis=2).astype(np.float32) / 255.0, (SIZE, SIZE),
                          interpolation=cv2.INTER_AREA)
        for name, mask in loaded.targets.items():
            if mask is None:
                continue
            click = next_click(mask, np.zeros_like(mask))
            found.append((grey, name.casefold(), ((click.x + 0.5) / mask.shape[1], (click.y + 0.5) / mask.shape[0]),
                          mask))
    return found


def inside(mask: np.ndarray, click: tuple[float, float]) -> bool:
    """Whether relative ``(x, y)`` falls on a pixel of the (H, W) mask."""
    h, w = mask.shape
    return bool(mask[min(max(int(click[1] * h), 0), h - 1), min(max(int(click[0] * w), 0), w - 1)])


def share_inside(test, clicks: list[tuple[float, float]]) -> float:
    return round(float(np.mean([inside(mask, c) for (_, _, _, mask), c in zip(test, clicks)])), 3)


def blind(train, test) -> dict[str, float]:
    points: dict[str, list[tuple[float, float]]] = {}
    for _, name, click, _ in train:
        points.setdefault(name, []).append(click)
    everything = tuple(np.mean([c for cs in points.values() for c in cs], axis=0))
    mean = {name: tuple(np.mean(cs, axis=0)) for name, cs in points.items()}
    anchor = {name: click_anchor(m for _, n, _, m in train if n == name) for name in points}
    return {"blind_mean": share_inside(test, [mean.get(n, everything) for _, n, _, _ in test]),
            "blind_anchor": share_inside(test, [anchor.get(n) or (0.5, 0.5) for _, n, _, _ in test])}


def nearest_image(train, test) -> float:
    layouts = [image_layout(g, GRID) for g, _, _, _ in train]
    clicks = []
    for grey, name, _, _ in test:
        query = image_layout(grey, GRID)
        same = [i for i, (_, n, _, _) in enumerate(train) if n == name] or list(range(len(train)))
        clicks.append(train[min(same, key=lambda i: float(((layouts[i] - query) ** 2).sum()))][2])
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
            layout = nn.functional.avg_pool2d(grey, PATCH).flatten(1)
            layout = (layout - layout.mean(1, keepdim=True)) / (layout.std(1, keepdim=True) + 1e-6)
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


def train_learner(kind: str, train, test, minutes: float, seed: int = 0) -> dict[str, float | int]:
    """Train one learner from scratch for ``minutes`` (one thread); its final and late-mean share inside."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    names = sorted({n for _, n, _, _ in train})

    def index(name: str) -> int:
        return names.index(name) if name in names else 0

    x_train = torch.tensor(np.stack([g for g, _, _, _ in train]))[:, None]
    n_train = torch.tensor([index(n) for _, n, _, _ in train])
    y_train = torch.tensor(np.array([c for _, _, c, _ in train], dtype=np.float32))
    x_test = torch.tensor(np.stack([g for g, _, _, _ in test]))[:, None]
    n_test = torch.tensor([index(n) for _, n, _, _ in test])
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
    late = figures[len(figures) // 2:] or [float("nan")]
    return {"final": figures[-1] if figures else float("nan"), "late_mean": round(float(np.mean(late)), 3),
            "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("--minutes", type=float, default=3.0, help="training time of each learner")
    parser.add_argument("--learners", default="mlp,vit,vit_no_position")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    train, test = first_clicks(args.train), first_clicks(args.test)
    result: dict[str, object] = {"train_targets": len(train), "test_targets": len(test), **blind(train, test),
                                 "nearest_image": nearest_image(train, test), "minutes": args.minutes}
    for kind in filter(None, args.learners.split(",")):
        result[kind] = train_learner(kind, train, test, args.minutes)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
