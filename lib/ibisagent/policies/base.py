"""The one interface every policy implements: conversations in, model text out.

A conversation is a list of chat messages in the Hugging Face / OpenAI shape, images as numpy arrays::

    [{"role": "system", "content": [{"type": "text", "text": "…"}]},
     {"role": "user", "content": [{"type": "image", "image": rgb}, {"type": "text", "text": "…"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "<think>…"}]}, …]

``rgb`` is (H, W, 3) uint8, already resized by the agent to the policy's pixel grid (:meth:`Policy.image_size`),
so that the model, the tool and the overlay agree on pixels. Policies are stateless between calls and safe to share
between threads; :meth:`Policy.generate` takes a batch so that engines that batch (vLLM, an OpenAI server with
concurrency) can.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from ibisagent.clicks import Click

Message = dict[str, Any]
Conversation = list[Message]


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings shared by all policies."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    deadline: float | None = None
    """``time.monotonic()`` instant by which a call must return (the agent's time limit); ``None`` = the policy's own
    timeout only. Policies that cannot stop a call in progress may ignore it."""


@dataclass(frozen=True)
class Observation:
    """What the agent knows at a step, for policies that act on state rather than pixels (the oracle).

    Attributes:
        image: (H, W, 3) uint8, the image the policy sees.
        masks: target name → current (H, W) bool mask.
        targets: target names in request order.
        step: 0-based step index.
        clicks: target name → the clicks of the current state (after any ``Undo``/``Reset``), in pixels of
            ``image`` (x = column), in order; empty when the caller does not track them.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    targets: tuple[str, ...]
    step: int
    clicks: Mapping[str, tuple[Click, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyRequest:
    """One conversation to continue, with the agent's observation alongside."""

    messages: Conversation
    observation: Observation | None = None


@dataclass(frozen=True)
class Generation:
    """A policy's reply and where its time went."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds


class Policy(ABC):
    """A policy: reads conversations (and observations), writes turns in the action grammar."""

    #: Short name for reports, e.g. ``"oracle"``, ``"hf:/models/ibis7b"``.
    name: str
    #: What the policy's checkpoint folder records of how it observes (:func:`checkpoint_observation`), set by
    #: policies that load one; :meth:`observation_settings` returns a copy.
    observation: Mapping[str, Any] = MappingProxyType({})

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) this policy wants images resized to (default: unchanged)."""
        return height, width

    def observation_settings(self) -> Mapping[str, Any]:
        """The environment settings this policy was trained to observe with (fields of
        :data:`ibisagent.env.OBSERVATION_FIELDS`, e.g. ``{"show_points": True}``); drivers apply them unless told
        otherwise. Default: none (the environment's defaults); a checkpoint policy, what its folder records."""
        return dict(self.observation)

    @abstractmethod
    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        """One reply per request, in order. Raises ``PolicyError`` for an unreachable or failing backend."""


class PolicyError(RuntimeError):
    """A policy backend failed (server down, timeout, out of memory); the message names the backend."""


def checkpoint_observation(path: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """The observation settings a checkpoint folder records (:func:`ibisagent.env.read_observation`; ``{}`` when it
    records none), for a policy's :meth:`Policy.observation_settings`.

    Raises:
        PolicyError: the record is malformed (the message names the policy and the file).
    """
    from ibisagent.env import read_observation

    try:
        return read_observation(path)
    except ValueError as exc:
        raise PolicyError(f"{name}: {exc}") from exc
