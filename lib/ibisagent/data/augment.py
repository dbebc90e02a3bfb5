"""Data augmentation for the training corpora: more images from the same cases, with their masks moved alike.

A small policy trained on a few dozen images learns the training images' click positions instead of reading the
image (the image-blind failure). :func:`augment_case` makes a new picture of a case the way scans differ between
patients and acquisitions — a random similarity transform (rotation, scale, shift), a left–right flip, a gamma and
contrast change and sensor noise — and moves every mask with the same transform (nearest neighbour), so the simulated
expert's clicks on the new picture are right for it. :func:`augment_manifest` writes the copies as PNG cases of a
new manifest, which then go through the same simulation and SFT builder as the originals.

The flip is skipped when the instruction or a target name carries laterality (``left``/``right``, or an organ of
one side such as the liver): a flipped "left kidney" would be the right one. Sources: the usual geometric and intensity augmentations of medical image
segmentation (e.g. MONAI's ``RandAffine``, ``RandFlip``, ``RandAdjustContrast``, ``RandGaussianNoise``), done here on
the 8-bit display picture with OpenCV because the cases are already in display space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_LATERAL = re.compile(r"\b(left|right)\b", re.IGNORECASE)
#: Organs that lie on one side of the body: a flipped picture of them teaches mirrored anatomy.
ONE_SIDED = ("liver", "spleen", "stomach", "heart", "aorta", "gallbladder", "gall bladder", "pancreas", "appendix",
             "caecum", "cecum", "sigmoid", "vena cava", "duodenum")
_ONE_SIDED = re.compile(r"\b(" + "|".join(re.escape(o) for o in ONE_SIDED) + r")\b", re.IGNORECASE)


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random transforms (uniform draws). Angles in degrees; shift as a fraction of the image side;
    noise as a standard deviation in grey levels (0–255)."""

    rotation: float = 12.0
    scale: tuple[float, float] = (0.88, 1.12)
    shift: float = 0.06
    flip: float = 0.5
    gamma: tuple[float, float] = (0.75, 1.35)
    contrast: tuple[float, float] = (0.85, 1.15)
    noise: float = 3.0


def is_variant(case_id: str) -> bool:
    """Whether ``case_id`` names a variant written by :func:`augment_manifest` (``<id>.aug<k>``)."""
    return re.search(r"\.aug\d+$", case_id) is not None


def source_id(case_id: str) -> str:
    """The case a variant was made from (``<id>`` of ``<id>.aug<k>``); other ids unchanged."""
    return re.sub(r"\.aug\d+$", "", case_id)


def has_laterality(*texts: str | None) -> bool:
    """Whether any of ``texts`` names a side (``left``/``right`` as a word) or an organ that lies on one side of the
    body (:data:`ONE_SIDED`)."""
    return any(bool(t) and bool(_LATERAL.search(t) or _ONE_SIDED.search(t)) for t in texts)


def augment_case(
    rgb: np.ndarray,
    masks: dict[str, np.ndarray | None],
    rng: np.random.Generator,
    *,
    allow_flip: bool = True,
    settings: AugmentSettings = AugmentSettings(),
) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """One random variant of a case.

    Args:
        rgb: display picture (H, W, 3) uint8.
        masks: target name → (H, W) bool mask, or ``None`` for an absent target (kept ``None``).
        rng: the random generator (the variant is a function of its state).
        allow_flip: whether a left–right flip may be drawn (``False`` for targets with laterality).
        settings: the transform ranges.

    Returns:
        ``(rgb, masks)`` of the same shapes and dtypes; a present mask may come back empty when the transform moved
        it out of the picture (the caller decides whether to draw again).
    """
    import cv2

    h, w = rgb.shape[:2]
    angle = float(rng.uniform(-settings.rotation, settings.rotation))
    scale = float(rng.uniform(*settings.scale))
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
    matrix[0, 2] += float(rng.uniform(-settings.shift, settings.shift)) * w
    matrix[1, 2] += float(rng.uniform(-settings.shift, settings.shift)) * h
    flip = allow_flip and rng.uniform() < settings.flip
    if flip:  # x → w - 1 - x after the similarity transform
        matrix = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([matrix, [0.0, 0.0, 1.0]])
    border = tuple(int(v) for v in np.median(np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]), axis=0))
    out = cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    grey = out.astype(np.float64) / 255.0
    grey = grey ** float(rng.uniform(*settings.gamma))
    grey = 0.5 + (grey - 0.5) * float(rng.uniform(*settings.contrast))
    grey = grey * 255.0 + rng.normal(0.0, float(rng.uniform(0.0, settings.noise)), size=(h, w, 1))
    if np.all(rgb == rgb[:, :, :1]):  # keep grey pictures grey (one noise field for the three channels)
        grey = np.repeat(grey[:, :, :1], 3, axis=2)
    out = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    moved: dict[str, np.ndarray | None] = {}
    for name, mask in masks.items():
        if mask is None:
            moved[name] = None
            continue
        warped = cv2.warpAffine(mask.astype(np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        moved[name] = warped.astype(bool)
    return out, moved


def augment_manifest(
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    copies: int,
    *,
    seed: int = 0,
    min_kept: float = 0.5,
    settings: AugmentSettings = AugmentSettings(),
    progress: bool = True,
) -> Path:
    """Write ``copies`` random variants of every case of ``manifest`` as PNG cases under ``out_dir`` and return the
    new manifest (``out_dir/manifest.jsonl``; ids ``<id>.aug<k>``).

    A variant is drawn again (up to 5 times, then left out) when a present target keeps under ``min_kept`` of its
    pixels. Cases with an ``initial_mask`` are not augmented (the prior would need the same transform). A finished
    output made from the same manifest (path and content), ``copies``, ``seed`` and settings (``out_dir/stamp.json``)
    is reused; any
    other output is rebuilt (a killed run starts its variants again). Raises
    :class:`~ibisagent.data.manifest.CaseError` for an unloadable case, like the simulator.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from ibisagent.data.manifest import load_case, read_cases
    from ibisagent.fileio import atomic_write_text

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    target = out / "manifest.jsonl"
    source = Path(manifest).resolve()
    stamp = json.dumps({"manifest": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                        "copies": copies, "seed": seed,
                        "min_kept": min_kept, "settings": dataclasses.asdict(settings)}, sort_keys=True)
    if target.is_file() and (out / "stamp.json").is_file() and (out / "stamp.json").read_text() == stamp:
        return target
    target.unlink(missing_ok=True)
    lines: list[str] = []
    for case in tqdm(read_cases(manifest), desc="augment", unit="case", disable=not progress):
        if case.initial_mask is not None:
            continue
        loaded = load_case(case)
        rng = np.random.default_rng([seed, zlib.crc32(case.id.encode())])
        names = [t.name for t in case.targets]
        allow_flip = not has_laterality(case.instruction, *names)
        for k in range(copies):
            for _attempt in range(5):
                rgb, masks = augment_case(loaded.rgb, dict(loaded.targets), rng, allow_flip=allow_flip,
                                          settings=settings)
                if all(m is None or loaded.targets[n] is None or m.sum() >= min_kept * loaded.targets[n].sum()
                       for n, m in masks.items()):
                    break
            else:
                continue
            stem = f"{case.id}.aug{k}"
            Image.fromarray(rgb).save(out / "images" / f"{stem}.png")
            targets: list[dict[str, Any]] = []
            for i, name in enumerate(names):
                mask = masks[name]
                if mask is None:
                    targets.append({"name": name, "mask": None})
                    continue
                mask_file = f"images/{stem}.t{i}.png"
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / mask_file)
                targets.append({"name": name, "mask": mask_file})
            line: dict[str, Any] = {"id": stem, "image": f"images/{stem}.png", "modality": case.modality,
                                    "instruction": case.instruction, "targets": targets}
            if case.answer is not None:
                line["answer"] = case.answer
            lines.append(json.dumps(line))
    atomic_write_text(out / "stamp.json", stamp)
    atomic_write_text(target, "".join(line + "\n" for line in lines))
    logger.info("augment: %d variants of the cases of %s → %s", len(lines), manifest, target)
    return target


__all__ = ["ONE_SIDED", "AugmentSettings", "augment_case", "augment_manifest", "has_laterality", "is_variant"]
