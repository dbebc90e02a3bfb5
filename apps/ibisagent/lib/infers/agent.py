"""Infer task ``ibisagent``: instruction (+ optional clicks) → the agent's mask, its reasoning per step and its answer.

Pipeline: load image → pick slice and clicks → display RGB → tool.encode → [user clicks → starting mask] →
``ibisagent.agent.run_agent`` → mask file in the image's geometry + JSON. The agent's mask is kept (see
:class:`AgentOutputs`) so that saving the radiologist's corrected label later yields a correction trajectory.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from .common import (
    AgentOutputs,
    Runtime,
    bad_request,
    canonical_to_voxel,
    display_slice,
    load_request_image,
    request_clicks,
    slice_or_none,
    write_result,
)

logger = logging.getLogger(__name__)

_LEADING = re.compile(r"^\s*(?:please\s+)?(?:segment|delineate|outline|find|mark|show)?\s*(?:the|a|an|all)?\s*",
                      re.IGNORECASE)


def target_from_instruction(instruction: str) -> str:
    """A short target name from the instruction ("Segment the left kidney." → "left kidney")."""
    name = _LEADING.sub("", instruction).strip().rstrip(".!?").strip()
    return (name or "target")[:48]


class IbisAgentInfer(InferTask):
    """MONAI Label infer task over :func:`ibisagent.agent.run_agent` (type ``deepgrow`` so clients show clicks)."""

    def __init__(self, runtime: Runtime, outputs: AgentOutputs | None, dimension: int = 3) -> None:
        super().__init__(
            type=InferType.DEEPGROW,
            labels=None,
            dimension=dimension,
            description="IBISAgent: type an instruction, the agent clicks and reasons until the mask is done",
            config={"instruction": "", "target": "", "slice": "", "max_steps": "", "propagate": True},
        )
        self.runtime = runtime
        self.outputs = outputs

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        from ibisagent.agent import AgentConfig, run_agent
        from ibisagent.volume import segment_volume

        start = time.perf_counter()
        instruction = request.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise bad_request("missing instruction: send params {\"instruction\": \"Segment the ...\"}")
        instruction = instruction.strip()
        target = str(request.get("target") or "").strip() or target_from_instruction(instruction)
        image = load_request_image(request["image"])
        where = request_clicks(image, request)
        rgb = display_slice(image, where.slice)
        loaded = time.perf_counter()

        opts = self.runtime.options
        max_steps = _max_steps(request.get("max_steps"), opts.max_steps)
        try:
            session = self.runtime.tool().encode(rgb)
            encoded = time.perf_counter()
            initial = None
            if where.clicks:
                initial = {target: session.predict(list(where.clicks)).mask}
            policy = self.runtime.policy()
            config = AgentConfig(max_steps=max_steps, history=opts.history)  # type: ignore[arg-type]
            if image.is_volume and _flag(request.get("propagate", True)):
                volume = segment_volume(policy, self.runtime.tool(), image, instruction, [target],
                                        key_slice=where.slice, config=config, initial_masks=initial)
                per_slice = dict(sorted(volume.slices.items()))
                mask = volume.masks[target]
            else:
                trajectory = run_agent(policy, session, rgb, instruction, [target], config=config,
                                       initial_masks=initial)
                per_slice = {where.slice: trajectory}
                mask = trajectory.masks[target]
        except Exception as exc:  # a broken model or tool answers with a JSON error, not a traceback
            logger.exception("ibisagent infer failed")
            raise bad_request(f"agent failed: {type(exc).__name__}: {exc}", 500) from exc

        trajectory = per_slice[where.slice]
        label_file = write_result(mask, image, where.slice, request, [target])
        steps = [_step_json(step, image, where.slice) for step in trajectory.steps]
        result: dict[str, Any] = {
            "label_names": {target: 1},
            "instruction": instruction,
            "target": target,
            "slice": slice_or_none(image, where.slice),
            "steps": steps,
            "slices": {str(k): {"answer": t.answer, "stop_reason": t.stop_reason,
                                "steps": [_step_json(step, image, k) for step in t.steps]}
                       for k, t in per_slice.items()} if image.is_volume else None,
            "answer": trajectory.answer,
            "stop_reason": trajectory.stop_reason,
            "error": trajectory.error,
            "user_clicks": len(where.clicks),
            "ignored_clicks": list(where.ignored),
            "policy": opts.policy,
            "tool": opts.tool,
            "timings": {
                "load": round(loaded - start, 4),
                "encode": round(encoded - loaded, 4),
                "agent": {k: round(float(v), 4) for k, v in trajectory.seconds.items()},
                "total": round(time.perf_counter() - start, 4),
            },
        }
        if self.runtime.policy_spec() == "tiny":
            result["warning"] = "policy 'tiny' is untrained: the mask shows the wiring, not a diagnosis"
        image_id = request.get("ibisagent_image_id")
        if self.outputs is not None and image_id:
            for k, t in per_slice.items():
                if t.masks[target].any() or k == where.slice:
                    self.outputs.put(image_id, k, {
                        "instruction": instruction, "targets": [target], "tool": opts.tool, "policy": opts.policy,
                        "modality": image.modality, "answer": t.answer, "stop_reason": t.stop_reason,
                    }, {target: t.masks[target]})
            result["stored_for_corrections"] = True
        return label_file, result


def _flag(value: Any) -> bool:
    """A boolean request option as Slicer sends it (bool, or a string such as "false")."""
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


def _max_steps(value: Any, limit: int) -> int:
    """A request's ``max_steps`` (1..the server's ``--conf max_steps``); the server's value when absent."""
    if value is None or value == "":
        return limit
    try:
        steps = int(value)
    except (TypeError, ValueError) as exc:
        raise bad_request(f"max_steps must be an integer, got {value!r}") from exc
    if not 1 <= steps:
        raise bad_request(f"max_steps must be >= 1, got {steps}")
    return min(steps, limit)


def _step_json(step: Any, image: Any, k: int) -> dict[str, Any]:
    return {
        "index": step.index,
        "attempt": step.attempt,
        "think": step.response.think if step.response is not None else None,
        "raw": step.raw,
        "error": step.error,
        "actions": [_action_text(a) for a in step.actions],
        "clicks": [
            {"target": c.target, "x": float(c.action.x), "y": float(c.action.y), "px": c.click.x, "py": c.click.y,
             "positive": c.click.positive, "voxel": canonical_to_voxel(image, k, c.click.y, c.click.x)}
            for c in step.clicks
        ],
        "seconds": round(step.timings.total, 4),
    }


def _action_text(action: Any) -> str:
    from ibisagent.protocol import format_action

    return format_action(action)
