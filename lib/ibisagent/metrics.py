"""Segmentation metrics as the paper reports them: IoU, Dice and entity F1.

Conventions (shared by evaluation, rewards and data checks):

* **IoU** = |P ∩ G| / |P ∪ G| and **Dice** = 2|P ∩ G| / (|P| + |G|), both in [0, 1].
* **Absent target** (empty ground truth): an empty prediction is the right answer and scores IoU = Dice = 1;
  any predicted pixel scores 0. The same rule makes two empty masks agree everywhere.
* **Entity F1** over the targets of a request: a target counts as *found* when its IoU ≥ 0.5 (:data:`ENTITY_IOU`).
  Present targets are the positives: a present target that is found is a true positive, one that is not found is a
  false negative — and if its prediction is non-empty, that wrong region is also a false positive (as in detection:
  a missed object plus a spurious one); an absent target with a non-empty prediction is a false positive (it
  hallucinated an entity).
  Precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean; a request whose targets are all
  absent and all answered empty scores 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: IoU at which a predicted entity counts as found (entity F1).
ENTITY_IOU = 0.5


def _pair(prediction: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(prediction).astype(bool, copy=False), np.asarray(target).astype(bool, copy=False)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} != target shape {g.shape}")
    return p, g


def iou(prediction: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two boolean masks of equal shape; 1.0 when both are empty."""
    p, g = _pair(prediction, target)
    union = np.count_nonzero(p | g)
    if union == 0:
        return 1.0
    return np.count_nonzero(p & g) / union


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient of two boolean masks of equal shape; 1.0 when both are empty."""
    p, g = _pair(prediction, target)
    total = np.count_nonzero(p) + np.count_nonzero(g)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(p & g) / total


def entity_counts(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int, int]:
    """(TP, FP, FN) over ``(prediction, target)`` pairs, one pair per requested target (see the module docstring)."""
    tp = fp = fn = 0
    for prediction, target in pairs:
        p, g = _pair(prediction, target)
        if g.any():
            if iou(p, g) >= ENTITY_IOU:
                tp += 1
            else:
                fn += 1
                if p.any():
                    fp += 1
        elif p.any():
            fp += 1
    return tp, fp, fn


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """F1 from entity counts; 1.0 when there was nothing to find and nothing was claimed."""
    if tp + fp + fn == 0:
        return 1.0
    return 2.0 * tp / (2.0 * tp + fp + fn)


def entity_f1(predictions: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """Entity F1 of one request: ``predictions[i]`` answers ``targets[i]``."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    return f1_from_counts(*entity_counts(zip(predictions, targets)))
