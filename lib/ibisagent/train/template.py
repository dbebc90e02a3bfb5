"""One chat template and one response template for SFT, GRPO and inference (NOTES-trl (B)).

* :data:`CHAT_TEMPLATE` (``chat_template.jinja`` beside this module) renders system / user / assistant turns exactly
  as Qwen2.5-VL's own template does, wraps assistant turns in ``{% generation %}`` markers unless the message has
  ``train: false`` (SFT's assistant-only loss then skips them), renders tool results as user turns (image +
  text) and writes the ``act`` tool call back as the turn text it was parsed from. It is prefix-preserving, which
  trl's multi-turn GRPO requires.
* :data:`RESPONSE_TEMPLATE` (transformers ≥ 5.13 ``response_template``) makes trl's ``parse_response`` turn an
  action turn — ``<think>…</think>`` then an ``<action>`` block whose first line is a Positive/Negative Point, Undo
  or Reset — into one call of the environment's ``act`` tool whose ``turn`` argument is the whole text from
  ``<think>`` through ``</action>``. A ``Terminate`` turn (or any malformed text) stays plain content, so it calls no
  tool and the rollout ends there. The grammar is the released checkpoint's: nothing about JSON tool calls reaches
  the model.

:func:`apply_templates` installs both on a processor (and its tokenizer); saving the processor saves them, so a
trained checkpoint renders prompts with the same template at inference (``hf:PATH``).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

#: Name of the environment method a parsed action turn calls (see :mod:`ibisagent.train.environment`).
ACT_TOOL = "act"

CHAT_TEMPLATE: str = resources.files("ibisagent.train").joinpath("chat_template.jinja").read_text(encoding="utf-8")

#: Opens an action turn: zero-width, so the tool call's text starts at ``<think>``; only turns whose first action is
#: a click, Undo or Reset (not Terminate) become tool calls.
_ACTION_TURN_OPEN = (
    r"\s*(?=<think>(?:(?!</?think>).)*</think>\s*<action>\s*(?i:positive\s+point|negative\s+point|undo|reset))"
)

RESPONSE_TEMPLATE: dict[str, Any] = {
    "version": 1,
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {
            "open_pattern": _ACTION_TURN_OPEN,
            "close_pattern": r"(?<=</action>)",
            "repeats": True,
            "content": "text",
            "transform": {"type": "function", "function": {"name": ACT_TOOL, "arguments": {"turn": "{content}"}}},
        },
        "content": {"close_pattern": r"\s*(?:<\|im_end\|>|<\|endoftext\|>)", "content": "text"},
    },
}


def apply_templates(processing_class: Any) -> Any:
    """Install :data:`CHAT_TEMPLATE` and :data:`RESPONSE_TEMPLATE` on a processor (and its tokenizer) or a tokenizer.

    Returns the same object. Idempotent.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    processing_class.chat_template = CHAT_TEMPLATE
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.response_template = RESPONSE_TEMPLATE
    return processing_class
