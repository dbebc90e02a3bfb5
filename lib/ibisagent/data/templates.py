"""Instruction library: the paper's taxonomy of user requests and answers, in the project's own wording.

The IBISAgent paper (§3.3, "instruction construction") varies what the user asks and how the agent answers so that the
policy learns the task rather than one sentence. The categories here follow its taxonomy:

* **initialization** prompts, from direct commands to goal-oriented statements: ``direct``, ``descriptive``,
  ``clinical``, ``goal`` — and the **interrogative** sub-templates: ``conditional`` ("is there … if so segment it"),
  ``compound``, ``protocol`` (clinical-protocol tone), ``conversational`` (indirect) and ``concise`` checks;
* **refinement** prompts (the user turn shown with each overlay): ``next_step``, ``error_correction``,
  ``verification``; they are prompt templates with the same placeholders as ``refine`` in
  :mod:`ibisagent.prompts` (``{instruction}``), so an episode can run with one of them instead of the default;
* **answer** styles of the final ``<answer>``: ``concise``, ``confident``, ``referencing`` (object-referencing),
  ``qa`` (question-answering), ``conversational``;
* **absent** answers: what the agent says when a requested target is not in the image. Every one of them is read as
  "absent" by :func:`ibisagent.agent.absent_targets` (a test checks it), so the mask of that target stays empty.

Templates are :meth:`str.format` strings with the placeholders ``{target}`` (target names joined with "and"),
``{modality}`` (a readable modality, e.g. "CT scan"), ``{it}``/``{is}`` ("them"/"are" for several targets) and,
for refinement, ``{instruction}``. Every choice takes a
:class:`random.Random`, so a seeded generator gives the same text every time. :func:`category_counts` lists the
number of templates per category (documented in ``docs/DATA.md``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

InitCategory = Literal["direct", "descriptive", "clinical", "goal", "conditional", "compound", "protocol",
                       "conversational", "concise"]
RefineCategory = Literal["next_step", "error_correction", "verification"]
AnswerStyle = Literal["concise", "confident", "referencing", "qa", "conversational"]

#: Initialization prompts per category. ``{target}``, ``{modality}``.
INITIALIZATION: dict[str, tuple[str, ...]] = {
    "direct": (
        "Segment the {target}.",
        "Segment the {target} in this {modality}.",
        "Outline the {target}.",
        "Draw a mask of the {target}.",
        "Mark the {target} on this image.",
        "Delineate the {target}.",
        "Create a segmentation of the {target}.",
        "Label the {target} in the image.",
    ),
    "descriptive": (
        "This is a {modality}. Segment the {target} shown in it.",
        "The image is a {modality}; produce a mask that covers the {target} and nothing else.",
        "Find the {target} in this {modality} and mark the full extent.",
        "Locate the {target} and trace the boundary as a mask.",
        "Identify the region occupied by the {target} and segment {it}.",
        "Separate the {target} from the surrounding tissue in this {modality}.",
    ),
    "clinical": (
        "Contour the {target} on this {modality} for the report.",
        "Please delineate the {target}; the contour will be used for measurement.",
        "Provide a segmentation of the {target} suitable for volumetry.",
        "Annotate the {target} on this {modality} for the radiology record.",
        "Contour the {target} as you would for treatment planning.",
        "Segment the {target} so that the size can be measured.",
    ),
    "goal": (
        "I need to know how large the {target} {is}; give me the mask.",
        "To follow up this patient I need the {target} outlined.",
        "I want to measure the {target}. Segment {it} for me.",
        "We are tracking the {target} over time; mark it on this {modality}.",
        "For the quantitative analysis, the {target} has to be segmented.",
        "My goal is an accurate outline of the {target} on this image.",
    ),
    "conditional": (
        "Is there a {target} in this {modality}? If so, segment {it}.",
        "Check whether the {target} {is} visible; if so, outline {it}.",
        "If the {target} can be seen in this image, segment {it}; otherwise say {it} {is} not present.",
        "Does this {modality} show the {target}? Segment {it} if so.",
        "Look for the {target}. Should you find {it}, draw the mask.",
    ),
    "compound": (
        "Where {is} the {target}, and can you outline {it}?",
        "Find the {target} and segment {it} completely.",
        "Locate the {target}, then mark the full extent with a mask.",
        "Tell me whether the {target} {is} present and segment {it}.",
        "Identify the {target} in this {modality} and produce its segmentation.",
    ),
    "protocol": (
        "Per protocol, assess the {modality} for the {target} and contour {it} if present.",
        "As part of the standard read, segment the {target} when visible.",
        "Following the reporting protocol, delineate the {target} on this image.",
        "Structured report item: {target}. Contour {it} if present.",
        "Protocol step: evaluate and segment the {target}.",
    ),
    "conversational": (
        "Could you help me find the {target} on this image?",
        "I'm not sure where the {target} {is} here; can you show me?",
        "Would you mind marking the {target} for me?",
        "Can you point out the {target} in this {modality}?",
        "I'd like to see the {target} highlighted, please.",
        "Show me where the {target} {is}.",
    ),
    "concise": (
        "{target}?",
        "{target}: segment.",
        "Segment: {target}.",
        "{target}, if present.",
        "Mask the {target}.",
    ),
}

#: The categories that ask a question (the paper's interrogative sub-templates).
INTERROGATIVE: tuple[str, ...] = ("conditional", "compound", "protocol", "conversational", "concise")

#: Refinement prompts (the user turn with each overlay), same placeholders as ``refine`` in the prompt file.
REFINEMENT: dict[str, tuple[str, ...]] = {
    "next_step": (
        "{instruction}\nThe current mask is drawn over the image in semi-transparent green. What is your next step? "
        "Add a Positive Point where the structure is missed, a Negative Point where the mask covers something else, "
        "Undo, Reset, or Terminate when it fits.",
        "{instruction}\nHere is the image with the current mask in green. Decide on the next action: a Positive Point, "
        "a Negative Point, Undo, Reset, or Terminate.",
        "{instruction}\nThe green region is the mask so far. Continue: place the next point, Undo or Reset if needed, "
        "or Terminate when the mask is right.",
    ),
    "error_correction": (
        "{instruction}\nThe mask so far is shown in green over the image. Look for errors: parts of the structure "
        "that are missed (fix with a Positive Point) or other tissue inside the mask (fix with a Negative Point). "
        "Undo a step that made it worse, Reset if it is wrong as a whole, Terminate when there is nothing to fix.",
        "{instruction}\nCheck the green mask for mistakes and correct the largest one with a Positive or Negative "
        "Point; Undo or Reset if needed, or Terminate if it is already correct.",
        "{instruction}\nThe current result is overlaid in green. Correct whatever is wrong with it (Positive Point, "
        "Negative Point, Undo, Reset), or Terminate if it is right.",
    ),
    "verification": (
        "{instruction}\nThe green overlay is the current mask. Does it cover the structure exactly? If yes, Terminate "
        "and answer; if not, place a Positive or Negative Point, or Undo or Reset.",
        "{instruction}\nVerify the green mask against the image. Terminate if it matches the structure; otherwise "
        "correct it with a point, Undo or Reset.",
        "{instruction}\nIs the green mask finished? Terminate with an answer if so, otherwise keep refining with "
        "Positive or Negative Points, Undo or Reset.",
    ),
}

#: Final-answer styles for a present target. ``{target}``, ``{modality}``.
ANSWERS: dict[str, tuple[str, ...]] = {
    "concise": (
        "{target}.",
        "{target} segmented.",
        "Done: {target}.",
    ),
    "confident": (
        "The {target} is segmented.",
        "The {target} has been fully delineated.",
        "The mask now covers the {target}.",
    ),
    "referencing": (
        "The mask outlines the {target} on this {modality}.",
        "The highlighted region is the {target}.",
        "The segmented region corresponds to the {target}.",
    ),
    "qa": (
        "Yes, the {target} is present; it is segmented.",
        "Yes. The {target} is visible and has been outlined.",
        "The {target} is present, and its mask is complete.",
    ),
    "conversational": (
        "Here is the {target} you asked for.",
        "I have outlined the {target} for you.",
        "The {target} is marked on the image now.",
    ),
}

#: Answers for a target that is not in the image; each is read as absent by ``agent.absent_targets``.
ABSENT_ANSWERS: tuple[str, ...] = (
    "not present",
    "The {target} is not present in this image.",
    "No {target} is visible on this {modality}.",
    "There is no {target} in this image.",
    "The {target} cannot be seen in this {modality}.",
    "The {target} is absent.",
    "No, the {target} is not present.",
)

#: Readable modality names for the ``{modality}`` placeholder (manifest modality, case-insensitive).
MODALITY_NAMES: dict[str, str] = {
    "ct": "CT scan",
    "mr": "MR image",
    "mri": "MR image",
    "us": "ultrasound image",
    "fundus": "fundus photograph",
    "xray": "radiograph",
    "x-ray": "radiograph",
    "cxr": "chest radiograph",
    "pet": "PET image",
    "endoscopy": "endoscopy frame",
    "dermoscopy": "dermoscopy image",
    "oct": "OCT scan",
    "histology": "histology slide",
}


def modality_name(modality: str) -> str:
    """A readable name for a manifest modality ("CT" → "CT scan"; unknown or empty → "image")."""
    key = modality.strip().casefold()
    if not key:
        return "image"
    return MODALITY_NAMES.get(key, f"{modality.strip()} image")


def join_targets(targets: Sequence[str]) -> str:
    """Target names as a phrase: "liver"; "right kidney and left kidney"; "a, b and c"."""
    names = list(targets)
    if not names:
        raise ValueError("at least one target name is needed")
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _fill(template: str, targets: Sequence[str], modality: str) -> str:
    plural = len(targets) > 1
    text = template.format(target=join_targets(targets), modality=modality_name(modality),
                           it="them" if plural else "it", **{"is": "are" if plural else "is"})
    return text[0].upper() + text[1:]


def _pick(rng: random.Random, table: dict[str, tuple[str, ...]], category: str | None) -> tuple[str, str]:
    if category is None:
        category = rng.choice(sorted(table))
    if category not in table:
        raise ValueError(f"unknown template category {category!r}; expected one of {sorted(table)}")
    return category, rng.choice(table[category])


def initialization(targets: Sequence[str], modality: str, rng: random.Random,
                   category: str | None = None) -> tuple[str, str]:
    """A user request for ``targets``: ``(category, text)``; the category is drawn uniformly when not given.

    Raises:
        ValueError: an unknown category or no targets.
    """
    category, template = _pick(rng, INITIALIZATION, category)
    return category, _fill(template, targets, modality)


def refinement(rng: random.Random, category: str | None = None) -> tuple[str, str]:
    """A refinement prompt template (placeholder ``{instruction}``, like ``refine`` in the prompt file):
    ``(category, template)``."""
    return _pick(rng, REFINEMENT, category)


def answer(targets: Sequence[str], modality: str, rng: random.Random, style: str | None = None,
           absent: Sequence[str] = ()) -> tuple[str, str]:
    """The final ``<answer>`` for a finished episode: ``(style, text)``.

    Args:
        targets: every target of the request, in order.
        modality: manifest modality, for ``{modality}``.
        rng: the seeded generator.
        style: an answer style (:data:`ANSWERS`), drawn when ``None``.
        absent: the targets that are not in the image; they get an :data:`ABSENT_ANSWERS` clause each.

    Returns:
        ``(style, text)``; ``style`` is ``"absent"`` when every target is absent. With several targets the clauses
        are joined with "; " and each names its target.
    """
    present = [t for t in targets if t not in set(absent)]
    missing = [t for t in targets if t in set(absent)]
    clauses: list[str] = []
    chosen = "absent"
    if present:
        chosen, template = _pick(rng, ANSWERS, style)
        clauses.append(_fill(template, present, modality))
    for name in missing:
        template = rng.choice(ABSENT_ANSWERS[1:]) if len(targets) > 1 else rng.choice(ABSENT_ANSWERS)
        clauses.append(_fill(template, [name], modality) if "{" in template else template)
    if len(clauses) == 1:
        return chosen, clauses[0]
    return chosen, "; ".join(c.rstrip(".") for c in clauses) + "."


def category_counts() -> dict[str, dict[str, int]]:
    """Number of templates per category: ``{"initialization": {...}, "refinement": {...}, "answer": {...},
    "absent": {"absent": n}}``."""
    return {
        "initialization": {k: len(v) for k, v in INITIALIZATION.items()},
        "refinement": {k: len(v) for k, v in REFINEMENT.items()},
        "answer": {k: len(v) for k, v in ANSWERS.items()},
        "absent": {"absent": len(ABSENT_ANSWERS)},
    }


__all__ = [
    "ABSENT_ANSWERS", "ANSWERS", "AnswerStyle", "INITIALIZATION", "INTERROGATIVE", "InitCategory", "MODALITY_NAMES",
    "REFINEMENT", "RefineCategory", "answer", "category_counts", "initialization", "join_targets", "modality_name",
    "refinement",
]
