"""The five rewards on hand-made masks: every branch of each, Terminate vs Termination, weights, the trl signature."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent.clicks import error_regions
from ibisagent.metrics import iou
from ibisagent.rewards import (
    REWARD_FUNCTIONS,
    REWARD_NAMES,
    ClickOutcome,
    Episode,
    RewardWeights,
    Turn,
    answer_reward,
    answer_score,
    click_score,
    format_reward,
    format_score,
    iou_points,
    length_score,
    progress_score,
    score_episode,
    weighted_total,
)

CLICK = "<think>\nThe mask misses the target.\n</think>\n<action>\nPositive Point (0.2500, 0.2500)\n</action>"
STOP = "<think>\nDone.\n</think>\n<action>\nTerminate\n</action>\n<answer>\nThe liver is segmented.\n</answer>"


def square(lo: int, hi: int, size: int = 8) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[lo:hi, lo:hi] = True
    return m


def outcome(truth: np.ndarray, before: np.ndarray, x: int, y: int, positive: bool) -> ClickOutcome:
    fn, fp = error_regions(truth, before)
    return ClickOutcome(positive=positive, in_error_region=bool((fn if positive else fp)[y, x]))


def test_format_is_strict_and_termination_is_not():
    assert format_score(Episode(turns=(Turn(CLICK), Turn(STOP)))) == 1.0
    termination = STOP.replace("Terminate", "Termination")
    assert format_score(Episode(turns=(Turn(CLICK), Turn(termination)))) == 0.5
    no_newlines = CLICK.replace("\n", "")
    assert format_score(Episode(turns=(Turn(no_newlines),))) == 0.0
    assert format_score(Episode(turns=())) == 0.0


@pytest.mark.parametrize(("value", "points"), [(0.95, 3), (0.81, 3), (0.8, 2), (0.75, 2), (0.7, 1), (0.6, 1),
                                               (0.5, 0), (0.1, 0)])
def test_iou_points_piecewise(value, points):
    assert iou_points(value) == points


def test_answer_from_final_masks_and_absent_targets():
    truth = square(2, 6)  # 16 px
    close = square(2, 6)
    close[2, 2] = False  # IoU 15/16
    half = square(2, 4)  # IoU 4/16
    ep = Episode(turns=(Turn(STOP),), final_iou={"liver": iou(close, truth)}, answer="The liver is segmented.")
    assert answer_score(ep) == 3.0
    ep = Episode(turns=(Turn(STOP),), final_iou={"liver": iou(half, truth)})
    assert answer_score(ep) == 0.0
    # absent target: empty mask AND an answer declaring it absent is a match; either alone is not
    assert answer_score(Episode(turns=(), absent={"polyp": True}, absent_declared=frozenset({"polyp"}))) == 3.0
    assert answer_score(Episode(turns=(), absent={"polyp": True}, absent_declared=frozenset())) == 0.0
    assert answer_score(Episode(turns=(), absent={"polyp": False}, absent_declared=frozenset({"polyp"}))) == 0.0
    # mixed request: mean over targets
    ep = Episode(turns=(), final_iou={"liver": 0.75}, absent={"polyp": True}, absent_declared=frozenset({"polyp"}))
    assert answer_score(ep) == pytest.approx(2.5)


def test_answer_closed_vqa_exact_match():
    assert answer_score(Episode(turns=(), answer="Yes.", expected_answer="yes")) == 3.0
    assert answer_score(Episode(turns=(), answer="No", expected_answer="yes")) == 0.0
    assert answer_score(Episode(turns=(), answer=None, expected_answer="yes")) == 0.0


def test_click_placement_on_error_regions():
    truth = square(2, 6)
    before = square(2, 4)  # misses the lower-right part
    good_pos = outcome(truth, before, x=5, y=5, positive=True)  # inside FN
    bad_pos = outcome(truth, before, x=0, y=0, positive=True)  # background
    wrong_neg = outcome(truth, before, x=5, y=5, positive=False)  # negative on the target
    over = square(1, 7)
    good_neg = outcome(truth, over, x=1, y=1, positive=False)  # inside FP
    assert (good_pos.in_error_region, bad_pos.in_error_region) == (True, False)
    assert (wrong_neg.in_error_region, good_neg.in_error_region) == (False, True)
    ep = Episode(turns=(Turn(CLICK, clicks=(good_pos, bad_pos)), Turn(CLICK, clicks=(good_neg,))))
    assert click_score(ep) == pytest.approx((1 - 1 + 1) / 3)
    assert click_score(Episode(turns=(Turn(STOP),))) == 0.0


def test_progress_counts_click_turns_where_iou_rose():
    truth = square(2, 6)
    m0, m1, m2 = np.zeros_like(truth), square(2, 4), square(2, 6)
    c = (ClickOutcome(True, True),)
    rise1 = Turn(CLICK, {"t": iou(m0, truth)}, {"t": iou(m1, truth)}, c)
    rise2 = Turn(CLICK, {"t": iou(m1, truth)}, {"t": iou(m2, truth)}, c)
    fall = Turn(CLICK, {"t": iou(m2, truth)}, {"t": iou(m1, truth)}, c)
    same = Turn(CLICK, {"t": iou(m2, truth)}, {"t": iou(m2, truth)}, c)
    assert progress_score(Episode(turns=(rise1, rise2, Turn(STOP)))) == 1.0
    assert progress_score(Episode(turns=(rise1, fall, same))) == pytest.approx(1 / 3)
    assert progress_score(Episode(turns=(Turn(STOP),))) == 0.0


def test_length_up_to_optimal_then_penalty():
    turns = tuple(Turn(CLICK) for _ in range(5))
    assert length_score(Episode(turns=turns[:3], optimal_steps=3)) == 1.0
    assert length_score(Episode(turns=turns[:2], optimal_steps=3)) == 1.0
    assert length_score(Episode(turns=turns, optimal_steps=3)) == pytest.approx(0.6)
    assert length_score(Episode(turns=turns), optimal_steps=4) == pytest.approx(0.8)


def test_trl_signature_weights_and_names():
    ep = Episode(turns=(Turn(CLICK, {"t": 0.2}, {"t": 0.9}, (ClickOutcome(True, True),)), Turn(STOP)),
                 final_iou={"t": 0.9}, answer="The t is segmented.", optimal_steps=2)
    assert format_reward(["a"], episodes=[ep]) == [1.0]
    assert answer_reward(["a"], episodes=[ep]) == [3.0]
    assert [f.__name__ for f in REWARD_FUNCTIONS] == [f"{n}_reward" for n in REWARD_NAMES]
    scores = score_episode(ep)
    assert scores == {"format": 1.0, "answer": 3.0, "click": 1.0, "progress": 1.0, "length": 1.0}
    assert weighted_total(scores) == 7.0
    assert weighted_total(scores, RewardWeights(answer=0.0, length=2.0)) == 5.0
    with pytest.raises(ValueError, match="unknown reward name"):
        RewardWeights.from_mapping({"answr": 1.0})
    with pytest.raises(ValueError, match="environments"):
        format_reward(["a"])


def test_environments_are_read_through_episode():
    class Env:
        def __init__(self, ep):
            self.ep, self.seen = ep, None

        def episode(self, completion):
            self.seen = completion
            return self.ep

    env = Env(Episode(turns=(Turn(STOP),)))
    assert format_reward(["done"], environments=[env]) == [1.0]
    assert env.seen == "done"
