"""Instruction templates, the offline reasoning writer and the leak filter (ibisagent.data.templates / reasoning)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ibisagent.agent import absent_targets
from ibisagent.data import reasoning, templates
from ibisagent.protocol import Action


def test_every_absent_answer_is_read_as_absent_and_present_answers_are_not() -> None:
    for modality in ("CT", "MR", "fundus", ""):
        for seed in range(40):
            rng = random.Random(seed)
            _, single = templates.answer(["kidney stone"], modality, rng, absent=["kidney stone"])
            assert absent_targets(single, ["kidney stone"]) == {"kidney stone"}, single
            _, mixed = templates.answer(["liver", "gallstone"], modality, rng, absent=["gallstone"])
            assert absent_targets(mixed, ["liver", "gallstone"]) == {"gallstone"}, mixed
    for style, options in templates.ANSWERS.items():
        for template in options:
            text = template.format(target="liver", modality="CT scan")
            assert absent_targets(text, ["liver"]) == frozenset(), (style, text)


def test_templates_fill_every_placeholder_and_are_seeded() -> None:
    for category in templates.INITIALIZATION:
        for seed in range(10):
            cat, text = templates.initialization(["right kidney", "left kidney"], "CT", random.Random(seed), category)
            assert cat == category and "{" not in text and "right kidney and left kidney" in text.casefold()
            assert text[0].isupper()
    first = [templates.initialization(["liver"], "MR", random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    drawn = {templates.initialization(["liver"], "MR", random.Random(s))[0] for s in range(200)}
    assert drawn == set(templates.INITIALIZATION)
    for category in templates.REFINEMENT:
        _, template = templates.refinement(random.Random(0), category)
        assert template.format(instruction="Segment the liver.").startswith("Segment the liver.")
    with pytest.raises(ValueError, match="unknown template category"):
        templates.initialization(["liver"], "CT", random.Random(0), "shouting")
    counts = templates.category_counts()
    assert set(counts["initialization"]) >= {"direct", "goal", "conditional", "compound", "protocol",
                                              "conversational", "concise"}
    assert set(counts["answer"]) == {"concise", "confident", "referencing", "qa", "conversational"}
    assert all(n >= 3 for group in counts.values() for n in group.values())


def _masks() -> tuple[np.ndarray, np.ndarray]:
    reference = np.zeros((80, 80), bool)
    reference[10:40, 5:35] = True  # upper left
    current = np.zeros_like(reference)
    current[12:25, 8:30] = True  # misses the lower part
    return reference, current


def test_writer_describes_position_size_and_side() -> None:
    reference, current = _masks()
    text = reasoning.write_think([Action("positive", 0.1, 0.1)], {"t": reference}, {"t": np.zeros_like(current)},
                                 ["t"], "CT", random.Random(0))
    assert "upper left" in text and "patient's right" in text and "large" in text
    text = reasoning.write_think([Action("positive", 0.25, 0.45)], {"t": reference}, {"t": current}, ["t"], "CT",
                                 random.Random(0))
    assert "lower" in text and "positive point" in text.lower()
    fundus = reasoning.write_think([Action("positive", 0.1, 0.1)], {"t": reference}, {"t": np.zeros_like(current)},
                                   ["t"], "fundus", random.Random(0))
    assert "patient" not in fundus  # anatomical sides only for radiological views


def test_writer_never_leaks_and_varies() -> None:
    reference, current = _masks()
    texts = set()
    for seed in range(60):
        rng = random.Random(seed)
        for actions, cur in (([Action("positive", 0.2, 0.45)], current), ([Action("negative", 0.6, 0.6)], current),
                             ([Action("positive", 0.2, 0.2)], np.zeros_like(current)),
                             ([Action("terminate")], current)):
            text = reasoning.write_think(actions, {"t": reference}, {"t": cur}, ["t"], "MR", rng)
            assert reasoning.leaks(text) == [], text
            texts.add(text)
        assert reasoning.leaks(reasoning.undo_think(current, current | reference, "t", rng)) == []
        assert reasoning.leaks(reasoning.reset_think(np.roll(reference, 40, 1), reference, "t", "CT", rng)) == []
        assert reasoning.leaks(reasoning.done_think(None, "t", "CT", rng)) == []
    assert len(texts) >= 8


@pytest.mark.parametrize("text, reason", [
    ("The green part is right but the red part spills over.", "oracle colour"),
    ("Compared with the ground truth the mask is too small.", "ground truth"),
    ("There are many FN pixels at the bottom.", "TP/FP/FN"),
    ("These false positives must go.", "true/false positive/negative"),
    ("The oracle says to click here.", "oracle"),
    ("The correct action is a positive point.", "the correct action"),
    ("The reference mask extends further down.", "reference/annotation"),
    ("The IoU is still 0.62.", "score"),
    ("In the second image the missed part is marked.", "second view"),
])
def test_leak_filter_rejects_the_oracle_vocabulary(text: str, reason: str) -> None:
    assert reason in reasoning.leaks(text)


def test_leak_filter_keeps_plain_reasoning() -> None:
    assert reasoning.leaks("The mask misses the lower pole of the left kidney; I add a positive point there.") == []
    assert reasoning.leaks("Reduce the leak toward the spleen with a negative point.") == []


def test_oracle_view_colours_each_error_part() -> None:
    reference, current = _masks()
    image = np.full((80, 80, 3), 100, np.uint8)
    view = reasoning.oracle_view(image, current, reference, click=(0.25, 0.45))
    tp, fn = view[15, 15], view[35, 10]
    assert tp[1] > tp[0] and tp[1] > tp[2]  # correct part: green
    assert fn[2] > fn[0] and fn[2] > fn[1]  # missed part: blue
    fp_mask = np.zeros_like(current)
    fp_mask[60:70, 60:70] = True
    fp = reasoning.oracle_view(image, fp_mask, reference)[65, 65]
    assert fp[0] > fp[1] and fp[0] > fp[2]  # over-segmentation: red
    assert tuple(view[36, 20]) == reasoning.ORACLE_CLICK
    assert (image == 100).all()


def test_docs_list_the_template_counts() -> None:
    """docs/DATA.md states the number of templates per category; it must match the library."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "DATA.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2].isdigit() and cells[0].split(" ")[0] in templates.category_counts():
            rows[(cells[0].split(" ")[0], cells[1].split(" ")[0])] = int(cells[2])
    expected = {(group, category): n for group, counts in templates.category_counts().items()
                for category, n in counts.items()}
    assert rows == expected


def test_qwen_grid_is_transformers_smart_resize() -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from ibisagent.observation import qwen_grid

    for budget in ((56 * 56, 64 * 64), (3136, 262144), (3136, 128 * 28 * 28)):
        for h in range(8, 601, 7):
            for w in range(8, 601, 11):
                assert qwen_grid(h, w, *budget) == smart_resize(h, w, 28, *budget), (h, w, budget)
