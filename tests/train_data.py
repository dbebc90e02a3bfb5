"""Small hand-made SFT datasets in the data issue's layout (``messages`` with per-message ``train``, ``images``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SYSTEM = "You segment medical images with points."


def turn(x: float, y: float) -> str:
    return f"<think>\nThe target is there.\n</think>\n<action>\nPositive Point ({x:.4f}, {y:.4f})\n</action>"


STOP = "<think>\nDone.\n</think>\n<action>\nTerminate\n</action>\n<answer>\nThe lesion is segmented.\n</answer>"


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image_part() -> dict:
    return {"type": "image", "text": None}


def square_image(size: int, cx: int, cy: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * 40).astype(np.uint8)
    arr[max(cy - 6, 0):cy + 6, max(cx - 6, 0):cx + 6] = 220
    return Image.fromarray(arr)


def conversation(wrong: bool = False) -> list[dict]:
    """System, first image + instruction, (optionally a wrong click marked train: false + overlay + Undo), a click,
    an overlay, Terminate."""
    msgs = [
        {"role": "system", "content": [text(SYSTEM)], "train": None},
        {"role": "user", "content": [image_part(), text("Segment the lesion.")], "train": None},
    ]
    if wrong:
        msgs += [
            {"role": "assistant", "content": [text(turn(0.05, 0.05))], "train": False},
            {"role": "user", "content": [image_part(), text("Refine.")], "train": None},
            {"role": "assistant", "content": [text("<think>\nWrong spot.\n</think>\n<action>\nUndo\n</action>")],
             "train": True},
            {"role": "user", "content": [image_part(), text("Refine.")], "train": None},
        ]
    msgs += [
        {"role": "assistant", "content": [text(turn(0.5, 0.5))], "train": True},
        {"role": "user", "content": [image_part(), text("Refine.")], "train": None},
        {"role": "assistant", "content": [text(STOP)], "train": True},
    ]
    return msgs


def write_sft_dataset(out: Path, rows: int = 4, size: int = 56, bad_rows: bool = False) -> Path:
    """A ``save_to_disk`` dataset of ``rows`` conversations (every other one reflective); with ``bad_rows`` one row
    whose images do not match its placeholders is appended."""
    from datasets import Dataset

    records = {"messages": [], "images": []}
    for i in range(rows):
        msgs = conversation(wrong=i % 2 == 1)
        n = sum(1 for m in msgs for p in m["content"] if p["type"] == "image")
        records["messages"].append(msgs)
        records["images"].append([square_image(size, 28, 28, seed=i) for _ in range(n)])
    if bad_rows:
        records["messages"].append(conversation())
        records["images"].append([square_image(size, 28, 28)])  # 2 placeholders, 1 image
    Dataset.from_dict(records).save_to_disk(str(out))
    return out


def write_manifest(out: Path, cases: int = 2, size: int = 56, absent: bool = True) -> Path:
    """A manifest of ``cases`` PNG images with a bright square and its mask (plus one absent-target case); the
    squares move along a row, then down to the next one (five per row)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(cases):
        cx, cy = 16 + 8 * (i % 5), 28 + 8 * (i // 5)
        image = square_image(size, cx, cy, seed=i)
        image.save(out / f"img{i}.png")
        mask = np.zeros((size, size), np.uint8)
        mask[max(cy - 6, 0):cy + 6, max(cx - 6, 0):cx + 6] = 255
        Image.fromarray(mask).save(out / f"mask{i}.png")
        lines.append({"id": f"c{i}", "image": f"img{i}.png", "modality": "MR", "instruction": "Segment the lesion.",
                      "targets": [{"name": "lesion", "mask": f"mask{i}.png"}]})
    if absent:
        lines.append({"id": "absent", "image": "img0.png", "modality": "MR", "instruction": "Segment the polyp.",
                      "targets": [{"name": "polyp", "mask": None}]})
    path = out / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def oracle_sft_dataset(manifest: Path, out: Path, settings, repeat: int = 1) -> Path:
    """A full-history SFT dataset of the oracle's episodes on the environment (a stand-in for ``build-sft`` in
    tests): every assistant turn trained."""
    from datasets import Dataset

    from ibisagent.data.manifest import read_cases
    from ibisagent.train.environment import make_env
    from ibisagent.train.grpo import oracle_turns, prompt_of

    records = {"messages": [], "images": []}
    for case in read_cases(manifest):
        env = make_env(str(manifest), case.id, settings)
        env.reset()
        turns = oracle_turns(env)
        history, images = prompt_of(env.observation.messages)
        for m in history:
            m["train"] = True if m["role"] == "assistant" else None
        history.append({"role": "assistant", "content": [text(turns[-1])], "train": True})
        for _ in range(repeat):
            records["messages"].append(history)
            records["images"].append(images)
    Dataset.from_dict(records).save_to_disk(str(out))
    return out


SHORT_PROMPTS = '''system = "Segment with points."
first = "{instruction}"
first_multi = "{instruction} {targets}"
refine = "{instruction} Refine."
refine_multi = "{instruction} {legend}"
'''


def short_prompts(out: Path) -> str:
    """A prompts file with one-line wording (short sequences keep CPU training tests fast)."""
    path = out / "short.toml"
    path.write_text(SHORT_PROMPTS)
    return str(path)
