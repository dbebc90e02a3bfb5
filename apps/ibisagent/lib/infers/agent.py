"""Infer task ``ibisagent``: instruction (+ optional clicks) → the agent's mask, its reasoning per step and its answer.

Pipeline: load image → pick slice and clicks → display RGB (``ibisagent.volume.slice_rgb``) → tool.encode (once) →
[user clicks → starting mask] → ``ibisagent.agent.run_agent`` / ``ibisagent.volume.segment_volume`` → mask file in the
image's geometry (``ibisagent.imaging.save_mask_like``) + JSON (``ibisagent.outcome``). The agent's mask is kept
(``ibisagent.corrections.AgentOutputStore``) so that saving the radiologist's corrected label later yields a correction
trajectory. A run that failed (unparseable output, failing policy or tool) answers with its mask so far, ``failed``,
the ``stop_reason`` and the last ``error`` text.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ibisagent.server.limits import check_text
from ibisagent.specs import public_spec
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from .common import (
    Runtime,
    bad_request,
    display_json,
    load_request_image,
    request_clicks,
    request_modality,
    request_result_extension,
    slice_or_none,
    write_result,
)

logger = logging.getLogger(__name__)


class IbisAgentInfer(InferTask):
    """MONAI Label infer task over :func:`ibisagent.agent.run_agent` (type ``deepgrow`` so clients show clicks)."""

    def __init__(self, runtime: Runtime, outputs: Any, dimension: int = 3) -> None:
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
        from ibisagent.clicks import predict_in_order
        from ibisagent.imaging import Provenance
        from ibisagent.outcome import empty_mask_notes, failures, last_error, trajectory_json
        from ibisagent.protocol import target_names
        from ibisagent.volume import segment_volume, slice_rgb

        start = time.perf_counter()
        opts = self.runtime.options
        deadline = time.monotonic() + opts.time_limit  # one deadline for the whole request, all slices together
        policy_spec = self.runtime.policy_spec()  # a finished train run may have published a new policy
        instruction = request.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise bad_request("missing instruction: send params {\"instruction\": \"Segment the ...\"}")
        instruction = check_text(instruction, "instruction", opts.max_instruction_chars)
        target = check_text(str(request.get("target") or ""), "target", opts.max_instruction_chars)
        target = target_names(instruction, [target])[0]
        max_steps = _max_steps(request.get("max_steps"), opts.max_steps)
        image = load_request_image(request["image"], request_modality(request, opts.modality), opts.max_pixels)
        request_result_extension(request, image)
        where = request_clicks(image, request)
        rgb = slice_rgb(image, where.slice)
        loaded = time.perf_counter()

        try:
            session = self.runtime.tool().encode(rgb)  # the key slice, encoded once for the clicks and the agent
            encoded = time.perf_counter()
            initial = None
            if where.clicks:
                initial = {target: predict_in_order(session, list(where.clicks)).mask}
            policy = self.runtime.policy()
            config = AgentConfig(max_steps=max_steps, history=opts.history,  # type: ignore[arg-type]
                                 time_limit=max(0.0, deadline - time.monotonic()))
            stops = None
            if image.is_volume and _flag(request.get("propagate", True)):
                volume = segment_volume(policy, self.runtime.tool(), image, instruction, [target],
                                        key_slice=where.slice, config=config, initial_masks=initial,
                                        key_session=session, deadline=deadline)
                per_slice = dict(sorted(volume.slices.items()))
                mask, stops = volume.masks[target], volume.stops
            else:
                trajectory = run_agent(policy, session, rgb, instruction, [target], config=config,
                                       initial_masks=initial)
                if trajectory.stop_reason == "tool_error":  # a broken tool is a server error, not an empty mask
                    raise RuntimeError(trajectory.error)
                per_slice = {where.slice: trajectory}
                mask = trajectory.masks[target]
        except Exception as exc:  # a broken model or tool answers with a JSON error, not a traceback
            logger.exception("ibisagent infer failed")
            raise bad_request(self.runtime.paths.scrub(f"agent failed: {type(exc).__name__}: {exc}"), 500) from exc

        trajectory = per_slice[where.slice]
        public_policy, public_tool = public_spec(policy_spec), self.runtime.public_tool()
        provenance = Provenance(policy=public_policy, tool=public_tool, person=bool(where.clicks))
        label_file = write_result(mask, image, where.slice, request, [target], provenance)
        key = trajectory_json(trajectory, image, where.slice)
        failed = failures((k if image.is_volume else None, t) for k, t in per_slice.items())
        empty = empty_mask_notes({target: mask}, trajectory, [target]).get(target)  # never a silent empty mask
        result: dict[str, Any] = {
            "label_names": {target: 1},
            "instruction": instruction,
            "target": target,
            "slice": slice_or_none(image, where.slice),
            "steps": key["steps"],
            "slices": {str(k): trajectory_json(t, image, k) for k, t in per_slice.items()}
            if image.is_volume else None,
            "stops": stops,
            "answer": trajectory.answer,
            "stop_reason": trajectory.stop_reason,
            "error": last_error(trajectory),
            "failed": bool(failed),
            "failures": failed,
            "empty_mask": {"explained": empty[0], "note": empty[1]} if empty else None,
            **display_json(image, where.slice),
            "user_clicks": len(where.clicks),
            "ignored_clicks": list(where.ignored),
            "policy": public_policy,
            "tool": public_tool,
            "timings": {
                "load": round(loaded - start, 4),
                "encode": round(encoded - loaded, 4),
                "agent": {k: round(float(v), 4) for k, v in trajectory.seconds.items()},
                "total": round(time.perf_counter() - start, 4),
            },
        }
        if failed:
            logger.warning("ibisagent: the agent failed: %s", "; ".join(failed))
        if policy_spec == "tiny":
            result["warning"] = "policy 'tiny' is untrained: the mask shows the wiring, not a diagnosis"
        image_id = request.get("ibisagent_image_id")
        if self.outputs is not None and image_id:
            for k, t in per_slice.items():
                if t.masks[target].any() or k == where.slice:
                    self.outputs.put(image_id, k, {
                        "instruction": instruction, "targets": [target], "tool": opts.tool, "policy": policy_spec,
                        "modality": image.modality, "answer": t.answer, "stop_reason": t.stop_reason,
                        "user_clicks": len(where.clicks) if k == where.slice else 0,
                    }, {target: t.masks[target]})
            result["stored_for_corrections"] = True
        return label_file, self.runtime.paths.scrub_json(result)  # errors may quote a checkpoint or server path


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
    except (TypeError, ValueError, OverflowError) as exc:
        raise bad_request(f"max_steps must be an integer, got {value!r}") from exc
    if not 1 <= steps:
        raise bad_request(f"max_steps must be >= 1, got {steps}")
    return min(steps, limit)
