"""Per-slice 3D: run the agent on a key slice, then propagate slice by slice through the volume.

The agent segments the key slice (the slice the user is on, ``--slice``, or the centre of a requested range). Each
neighbouring slice then starts in refinement mode from the mask of the slice before it, so the agent reasons per
slice (it may correct, undo, or answer that the target has ended). Propagation runs in both directions at once —
the two fronts go through :func:`ibisagent.agent.run_agents` together, one batched policy call per round — and a
direction stops where the agent answers that the target is absent, where every mask vanishes, or where the agent
gives no usable answer (unparseable output, time limit, a tool error on that slice: the neighbour's mask is not copied
on unconfirmed). A ``deadline`` bounds the whole volume: each slice's trajectory gets the time left (and at most
``config.time_limit``), and propagation stops when none is left, keeping the slices done. A failing policy backend raises :class:`~ibisagent.policies.base.PolicyError`; a tool failing on the
key slice raises ``RuntimeError`` with the tool's message.

With a SAM 2 / MedSAM2 tool, ``propagation="sam2-video"`` is the alternative: the agent segments the key slice and
SAM 2's video memory carries the mask through the slices (:mod:`ibisagent.tools.sam2_video`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ibisagent.agent import AgentConfig, AgentJob, AgentTrajectory, absent_targets, run_agents
from ibisagent.imaging import Image, num_slices, slice_of, to_display_rgb
from ibisagent.policies.base import Policy, PolicyError
from ibisagent.prompts import Prompts
from ibisagent.tools.base import ImageSession, SegmentationTool

log = logging.getLogger(__name__)

#: Stops after which a propagated slice's mask is only its neighbour's, unconfirmed: propagation ends there.
UNRELIABLE_STOPS = frozenset({"unparseable", "time_limit", "tool_error"})


@dataclass
class VolumeResult:
    """Outcome of a volume run.

    Attributes:
        masks: target name → (Z, Y, X) bool, in the canonical grid of ``Image.array``.
        key_slice: the slice the agent started on.
        slices: slice index → the agent's trajectory on that slice (per-slice reasoning).
        stops: direction (``"up"``: increasing index, ``"down"``) → why propagation ended there.
    """

    masks: dict[str, np.ndarray]
    key_slice: int
    slices: dict[int, AgentTrajectory] = field(default_factory=dict)
    stops: dict[str, str] = field(default_factory=dict)


def slice_rgb(image: Image, k: int, window: tuple[float, float] | str | None = None) -> np.ndarray:
    """Axial slice ``k`` of a volume as the (Y, X, 3) uint8 display image the policy and the tool see."""
    return to_display_rgb(slice_of(image, k), image.modality, window=window)


def _ended(trajectory: AgentTrajectory, targets: Sequence[str]) -> bool:
    """A slice ends its direction when the agent calls every target absent or no mask is left."""
    absent = absent_targets(trajectory.answer, targets) if trajectory.answer else frozenset()
    return set(targets) <= set(absent) or not any(m.any() for m in trajectory.masks.values())


def segment_volume(
    policy: Policy,
    tool: SegmentationTool,
    image: Image,
    instruction: str,
    targets: Sequence[str],
    *,
    key_slice: int | None = None,
    slice_range: tuple[int, int] | None = None,
    config: AgentConfig | None = None,
    prompts: Prompts | None = None,
    window: tuple[float, float] | str | None = None,
    initial_masks: Mapping[str, np.ndarray] | None = None,
    propagation: str = "agent",
    key_session: ImageSession | None = None,
    deadline: float | None = None,
) -> VolumeResult:
    """Segment ``targets`` through a volume (see the module docstring).

    Args:
        policy, tool: the agent's policy and segmenter.
        image: a volume (:func:`ibisagent.imaging.load_image`); ``image.array`` is (Z, Y, X).
        instruction: the user's request.
        targets: target names.
        key_slice: where to start; default: centre of ``slice_range``, else the middle slice.
        slice_range: inclusive (first, last) slice indices to stay within; default: the whole volume.
        config, prompts: agent settings.
        window: display window for CT (see :func:`ibisagent.imaging.to_display_rgb`).
        initial_masks: target name → (Y, X) bool mask on the key slice to start from (e.g. from the user's clicks).
        propagation: ``"agent"`` (the agent refines every slice from its neighbour's mask) or ``"sam2-video"`` (the
            agent segments the key slice, SAM 2's video memory propagates it; needs a SAM 2 / MedSAM2 tool).
        key_session: the tool's encoding of the key slice when the caller has it already (e.g. to turn a user's
            clicks into ``initial_masks``), so the key slice is encoded once.
        deadline: ``time.monotonic()`` value by which the whole volume must be done (e.g. a server request's
            ``--conf time_limit`` counted from its arrival); ``None``: only ``config.time_limit`` per slice. Each
            slice's trajectory gets the seconds left; when none are left, the directions still open stop with
            ``"request time limit reached before slice K"``.
    """
    if propagation not in ("agent", "sam2-video"):
        raise ValueError(f"propagation must be 'agent' or 'sam2-video', got {propagation!r}")
    if propagation == "sam2-video":
        from ibisagent.tools.sam2 import Sam2Tool

        if not isinstance(tool, Sam2Tool):
            raise ValueError(f"sam2-video propagation needs a SAM 2 / MedSAM2 tool, got {type(tool).__name__}")
    if not image.is_volume:
        raise ValueError(f"{image.source} is a 2D image; use run_agent for 2D")
    depth = num_slices(image)
    lo, hi = slice_range if slice_range is not None else (0, depth - 1)
    if not 0 <= lo <= hi < depth:
        raise ValueError(f"slice range ({lo}, {hi}) is outside the volume's {depth} slices")
    key = key_slice if key_slice is not None else (lo + hi) // 2
    if not lo <= key <= hi:
        raise ValueError(f"key slice {key} is outside the range ({lo}, {hi}) of a {depth}-slice volume")
    targets = tuple(targets)
    masks = {t: np.zeros(image.array.shape[:3], dtype=bool) for t in targets}
    result = VolumeResult(masks=masks, key_slice=key)

    def job(k: int, previous: dict[str, np.ndarray] | None) -> AgentJob:
        rgb = slice_rgb(image, k, window)
        initial = {t: m for t, m in (previous or {}).items() if m.any()} or None
        session = key_session if k == key and key_session is not None else tool.encode(rgb)
        return AgentJob(session=session, image=rgb, instruction=instruction, targets=targets,
                        initial_masks=initial)

    config = config or AgentConfig()

    def within_deadline() -> AgentConfig:
        """``config`` with ``time_limit`` cut to the seconds left before ``deadline``."""
        if deadline is None:
            return config
        left = max(0.0, deadline - time.monotonic())
        limit = config.time_limit if config.time_limit is not None else math.inf
        return replace(config, time_limit=min(limit, left))

    first = run_agents(policy, [job(key, dict(initial_masks or {}))], within_deadline(), prompts)[0]
    if first.stop_reason == "policy_error":
        raise PolicyError(f"key slice {key}: {first.error or 'the policy backend failed'}")
    if first.stop_reason == "tool_error":
        raise RuntimeError(f"key slice {key}: {first.error or 'the tool failed'}")
    _store(result, key, first)
    if deadline is not None and first.stop_reason == "time_limit" and time.monotonic() >= deadline:
        result.stops = {d: f"request time limit reached at key slice {key}" for d in ("up", "down")}
        return result
    if _ended(first, targets):
        result.stops = {"up": "absent at key slice", "down": "absent at key slice"}
        return result
    if propagation == "sam2-video":
        from ibisagent.tools.sam2_video import propagate_masks

        frames = [slice_rgb(image, k, window) for k in range(lo, hi + 1)]
        for name, propagated in propagate_masks(tool, frames, key - lo, first.masks).items():  # type: ignore[arg-type]
            result.masks[name][lo : hi + 1] = propagated
        _store(result, key, first)  # the agent's exact key-slice mask
        result.stops = {"up": "sam2-video: " + ("volume edge" if hi == depth - 1 else "range edge"),
                        "down": "sam2-video: " + ("volume edge" if lo == 0 else "range edge")}
        return result
    fronts = {"up": (key + 1, first.masks), "down": (key - 1, first.masks)}
    while fronts:
        for direction, (k, _) in list(fronts.items()):
            if not lo <= k <= hi:
                result.stops[direction] = "volume edge" if k in (-1, depth) else "range edge"
                del fronts[direction]
        if not fronts:
            break
        if deadline is not None and time.monotonic() >= deadline:
            for direction, (k, _) in fronts.items():
                result.stops[direction] = f"request time limit reached before slice {k}"
            break
        order = list(fronts)
        trajectories = run_agents(policy, [job(fronts[d][0], fronts[d][1]) for d in order], within_deadline(),
                                  prompts)
        for direction, trajectory in zip(order, trajectories):
            k = fronts[direction][0]
            if trajectory.stop_reason == "policy_error":
                raise PolicyError(f"slice {k}: {trajectory.error or 'the policy backend failed'}")
            if trajectory.stop_reason in UNRELIABLE_STOPS:
                # the slice kept its neighbour's mask without the agent confirming it: do not copy it onward
                result.slices[k] = trajectory
                out_of_time = (trajectory.stop_reason == "time_limit" and deadline is not None
                               and time.monotonic() >= deadline)
                result.stops[direction] = (f"request time limit reached at slice {k}" if out_of_time else
                                           f"agent gave no usable answer at slice {k} ({trajectory.stop_reason})")
                del fronts[direction]
                continue
            if _ended(trajectory, targets):
                result.slices[k] = trajectory
                result.stops[direction] = f"target ended at slice {k} ({trajectory.stop_reason})"
                del fronts[direction]
                continue
            _store(result, k, trajectory)
            fronts[direction] = (k + 1 if direction == "up" else k - 1, trajectory.masks)
    log.info("volume %s: key slice %d, %d slices segmented, stops %s", image.source, key,
             sum(any(m[k].any() for m in result.masks.values()) for k in range(depth)), result.stops)
    return result


def _store(result: VolumeResult, k: int, trajectory: AgentTrajectory) -> None:
    result.slices[k] = trajectory
    for name, mask in trajectory.masks.items():
        result.masks[name][k] = mask
