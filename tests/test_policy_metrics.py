"""The policy metrics of `ibisagent eval` (format validity, first click inside, absent answered not present, mean
reward per component), from real environment episodes driven by written turns."""

from __future__ import annotations

import numpy as np
import pytest

from ibisagent.env import SegmentationEnv
from ibisagent.evaluate import CaseResult, policy_metrics, policy_turn_counts
from ibisagent.rewards import episode_from_env, iou_points, score_episode
from ibisagent.tools import load_tool


def _image_and_truth():
    image = np.full((56, 56, 3), 30, np.uint8)
    image[20:36, 20:36] = 220
    truth = np.zeros((56, 56), bool)
    truth[20:36, 20:36] = True
    return image, truth


def _run(turns, target="lesion", truth=None):
    image, square = _image_and_truth()
    gt = square if truth is None else truth
    tool = load_tool("embedded")
    env = SegmentationEnv(image, f"Segment the {target}.", [target], tool.encode(image),
                          ground_truth={target: gt if gt.any() else None})
    env.reset()
    for text in turns:
        if env.done:
            break
        env.step(text)
    return env


INSIDE = "<think>\nThe bright square.\n</think>\n<action>\nPositive Point (0.5000, 0.5000)\n</action>"
OUTSIDE = "<think>\nThe corner.\n</think>\n<action>\nPositive Point (0.0500, 0.0500)\n</action>"
STOP = "<think>\nDone.\n</think>\n<action>\nTerminate\n</action>\n<answer>\nThe lesion is segmented.\n</answer>"
ABSENT = "<think>\nNo polyp.\n</think>\n<action>\nTerminate\n</action>\n<answer>\nnot present\n</answer>"


def test_counts_and_rewards_of_a_good_episode():
    env = _run([INSIDE, STOP])
    counts = policy_turn_counts(env.trajectory())
    assert counts["turns"] == 2 and counts["valid_turns"] == 2
    assert counts["present"] == 1 and counts["first_inside"] == 1 and counts["absent"] == 0
    rewards = counts["rewards"]
    assert rewards == score_episode(episode_from_env(env))
    assert rewards["format"] == 1.0 and rewards["click"] == 1.0 and rewards["progress"] == 1.0
    final = env.steps[-1].scores[0].iou_after
    assert final > 0.5 and rewards["answer"] == iou_points(final)


def test_wrong_first_click_and_termination_spelling_count_against():
    env = _run([OUTSIDE, INSIDE, STOP.replace("Terminate", "Termination")])
    counts = policy_turn_counts(env.trajectory())
    assert counts["first_inside"] == 0 and counts["valid_turns"] == 2 and counts["turns"] == 3
    assert counts["rewards"]["click"] == 0.0  # (−1 + 1) / 2


def test_absent_target_answered_not_present():
    env = _run([ABSENT], target="polyp", truth=np.zeros((56, 56), bool))
    counts = policy_turn_counts(env.trajectory())
    assert counts["absent"] == 1 and counts["answered_absent"] == 1 and counts["rewards"]["answer"] == 3.0
    env = _run([INSIDE, STOP], target="polyp", truth=np.zeros((56, 56), bool))
    assert policy_turn_counts(env.trajectory())["answered_absent"] == 0


def test_shares_over_cases():
    good = policy_turn_counts(_run([INSIDE, STOP]).trajectory())
    bad = policy_turn_counts(_run([OUTSIDE, STOP.replace("Terminate", "Termination")]).trajectory())
    absent = policy_turn_counts(_run([ABSENT], target="polyp", truth=np.zeros((56, 56), bool)).trajectory())
    rows = [CaseResult(id=str(i), modality="MR", iou=0.5, dice=0.5, f1=1.0, steps=1, turns=t)
            for i, t in enumerate([good, bad, absent])]
    metrics = policy_metrics(rows)
    assert metrics["format_valid"] == pytest.approx(4 / 5)
    assert metrics["first_click_inside"] == pytest.approx(1 / 2)
    assert metrics["absent_not_present"] == 1.0
    assert metrics["reward_format"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert policy_metrics([CaseResult(id="o", iou=1.0)]) == {}


def test_results_md_has_the_policy_table(tmp_path):
    from ibisagent.evaluate import write_results

    good = policy_turn_counts(_run([INSIDE, STOP]).trajectory())
    rows = [CaseResult(id="a", modality="MR", iou=0.5, dice=0.5, f1=1.0, steps=2, turns=good)]
    summary = write_results(tmp_path, rows, {"manifest": "m", "policy": "p", "tool": "embedded"})
    text = (tmp_path / "results.md").read_text()
    assert "| modality | format_valid |" in text and "| **all** | 1.00 | 1.00 |" in text
    assert summary["per_modality"]["MR"]["format_valid"] == 1.0
