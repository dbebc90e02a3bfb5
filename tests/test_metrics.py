"""IoU, Dice and entity F1, including the absent-target convention the evaluation relies on."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent.metrics import dice, entity_f1, iou


def _box(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_iou_and_dice_of_overlapping_boxes() -> None:
    a = _box((10, 10), 0, 4, 0, 4)  # 16 px
    b = _box((10, 10), 0, 4, 2, 6)  # 16 px, 8 shared
    assert iou(a, b) == pytest.approx(8 / 24)
    assert dice(a, b) == pytest.approx(16 / 32)
    assert iou(a, a) == 1.0 and dice(a, ~a) == 0.0


def test_absent_target_empty_prediction_scores_one_and_any_pixel_scores_zero() -> None:
    empty = np.zeros((8, 8), dtype=bool)
    assert iou(empty, empty) == 1.0 and dice(empty, empty) == 1.0
    speck = empty.copy()
    speck[3, 3] = True
    assert iou(speck, empty) == 0.0 and dice(speck, empty) == 0.0


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        iou(np.zeros((3, 3)), np.zeros((3, 4)))


def test_entity_f1() -> None:
    g1 = _box((20, 20), 0, 10, 0, 10)
    g2 = _box((20, 20), 10, 20, 10, 20)
    empty = np.zeros((20, 20), dtype=bool)
    assert entity_f1([g1, g2], [g1, g2]) == 1.0
    # one found, one missed (empty prediction): TP 1, FN 1 → F1 2/3
    assert entity_f1([g1, empty], [g1, g2]) == pytest.approx(2 / 3)
    # an absent target answered empty is right; answered with a mask is a false positive
    assert entity_f1([g1, empty], [g1, empty]) == 1.0
    assert entity_f1([g1, g2], [g1, empty]) == pytest.approx(2 / 3)
    # IoU below 0.5 is not found
    assert entity_f1([_box((20, 20), 0, 10, 0, 4)], [g1]) == 0.0
    assert entity_f1([empty], [empty]) == 1.0
    with pytest.raises(ValueError):
        entity_f1([g1], [g1, g2])
