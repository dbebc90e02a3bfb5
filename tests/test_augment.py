"""Augmented training cases: masks move with their picture, laterality is never flipped, variants are reproducible
and load as ordinary cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ibisagent.data.augment import AugmentSettings, augment_case, augment_manifest, has_laterality

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "manifest.jsonl"


def _disc_case(h: int = 96, w: int = 120) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - 40) ** 2 + (xx - 35) ** 2 < 15**2
    grey = np.where(mask, 200, 40).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), mask


def test_masks_move_with_the_picture():
    rgb, mask = _disc_case()
    rng = np.random.default_rng(3)
    for _ in range(10):
        out, masks = augment_case(rgb, {"disc": mask, "absent": None}, rng)
        assert out.shape == rgb.shape and out.dtype == np.uint8
        assert masks["absent"] is None
        moved = masks["disc"]
        assert moved.shape == mask.shape and moved.dtype == bool and moved.sum() > 0.5 * mask.sum()
        grey = out[:, :, 0].astype(float)
        assert grey[moved].mean() > grey[~moved].mean() + 80  # the bright disc is where its mask went
        assert np.all(out[:, :, 0] == out[:, :, 2])  # grey stays grey


def test_flip_only_when_allowed():
    rgb, mask = _disc_case()
    fixed = AugmentSettings(rotation=0.0, scale=(1.0, 1.0), shift=0.0, flip=1.0, gamma=(1.0, 1.0),
                            contrast=(1.0, 1.0), noise=0.0)
    flipped, masks = augment_case(rgb, {"disc": mask}, np.random.default_rng(0), settings=fixed)
    assert np.array_equal(masks["disc"], np.fliplr(mask)) and np.array_equal(flipped, np.fliplr(rgb))
    kept, masks = augment_case(rgb, {"disc": mask}, np.random.default_rng(0), allow_flip=False, settings=fixed)
    assert np.array_equal(masks["disc"], mask) and np.array_equal(kept, rgb)
    assert has_laterality("Segment the left kidney.") and has_laterality(None, "Right lung")
    assert has_laterality("Segment the liver.") and has_laterality(None, "spleen")
    assert has_laterality("liver lesion") and not has_laterality("Segment the brain.", "white matter", "deliverance")


def test_manifest_variants_are_reproducible_and_load_as_cases(tmp_path):
    from ibisagent.data.manifest import load_case, read_cases

    lines = [json.loads(x) for x in SAMPLE.read_text().splitlines() if x.strip()]
    pick = [x for x in lines if x["id"] in {"ct_kidneys", "mr_tumour_absent", "mr_ventricles"}]
    for line in pick:
        line["image"] = str(SAMPLE.parent / line["image"])
        for t in line["targets"]:
            t["mask"] = t["mask"] and str(SAMPLE.parent / t["mask"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in pick))
    first = augment_manifest(manifest, tmp_path / "a", 2, seed=5, progress=False)
    second = augment_manifest(manifest, tmp_path / "b", 2, seed=5, progress=False)
    cases = read_cases(first)
    assert sorted(c.id for c in cases) == sorted(f"{x['id']}.aug{k}" for x in pick for k in range(2))
    originals = {x["id"]: load_case(c) for x, c in zip(pick, read_cases(manifest), strict=True)}
    for case, twin in zip(cases, read_cases(second), strict=True):
        loaded, again = load_case(case), load_case(twin)
        assert np.array_equal(loaded.rgb, again.rgb)  # same seed, same variant
        original = originals[case.id.rsplit(".aug", 1)[0]]
        assert loaded.rgb.shape == original.rgb.shape and case.instruction == original.case.instruction
        for name, truth in original.targets.items():
            if truth is None:
                assert loaded.targets[name] is None
            else:
                assert loaded.targets[name].sum() >= 0.5 * truth.sum()
    # the kidneys keep their sides: the right kidney (image left) stays in the image's left part
    for case in cases:
        if case.id.startswith("ct_kidneys"):
            right = load_case(case).targets["right kidney"]
            assert np.nonzero(right)[1].mean() < right.shape[1] / 2
    again = augment_manifest(manifest, tmp_path / "a", 2, seed=5, progress=False)  # finished, same settings: reused
    assert again == first and [c.id for c in read_cases(again)] == [c.id for c in cases]
    more = augment_manifest(manifest, tmp_path / "a", 3, seed=5, progress=False)  # other settings: rebuilt
    assert len(read_cases(more)) == 3 * len(pick)


@pytest.mark.parametrize("n_cases, minutes, expected", [(200, 45, 6), (13, 50, 20), (2000, 45, 0), (0, 45, 0)])
def test_variants_follow_the_budget(n_cases, minutes, expected):
    from ibisagent.train.recipe import variants_per_case

    assert variants_per_case(n_cases, minutes) == expected
