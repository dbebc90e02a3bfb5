"""Infer task ``ibisagent_clicks``: the user's own clicks straight to the tool (hand correction, no model).

The clicks are fed in order by :func:`ibisagent.clicks.predict_in_order`, each tool call getting all clicks so far
and the previous call's logits (the same chaining the agent and the click simulator use).
"""

from __future__ import annotations

import time
from typing import Any

from ibisagent.server.limits import check_text
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ibisagent.clicks import predict_in_order
from ibisagent.imaging import Provenance
from ibisagent.volume import slice_rgb

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


class IbisClicksInfer(InferTask):
    """MONAI Label infer task: foreground/background voxel clicks → the tool's mask on the clicked slice."""

    def __init__(self, runtime: Runtime, dimension: int = 3) -> None:
        super().__init__(
            type=InferType.DEEPGROW,
            labels=None,
            dimension=dimension,
            description="Click-driven segmentation with the IBISAgent tool alone (no language model)",
            config={"target": "target", "slice": ""},
        )
        self.runtime = runtime

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        start = time.perf_counter()
        opts = self.runtime.options
        target = check_text(str(request.get("target") or "target"), "target", opts.max_instruction_chars) or "target"
        image = load_request_image(request["image"], request_modality(request, opts.modality), opts.max_pixels)
        request_result_extension(request, image)
        where = request_clicks(image, request)
        if not where.clicks:
            raise bad_request("no click on the image: send foreground/background voxel clicks [[i, j, k], ...]")
        rgb = slice_rgb(image, where.slice)
        try:
            session = self.runtime.tool().encode(rgb)
            encoded = time.perf_counter()
            clicks = list(where.clicks)
            prediction = predict_in_order(session, clicks)
        except Exception as exc:
            raise bad_request(self.runtime.paths.scrub(f"tool failed: {type(exc).__name__}: {exc}"), 500) from exc
        label_file = write_result(prediction.mask, image, where.slice, request, [target],
                                  Provenance(tool=self.runtime.public_tool(), person=True))
        return label_file, {
            "label_names": {target: 1},
            "slice": slice_or_none(image, where.slice),
            "clicks": [{"px": c.x, "py": c.y, "positive": c.positive} for c in clicks],
            **display_json(image, where.slice),
            "ignored_clicks": list(where.ignored),
            "tool": self.runtime.public_tool(),
            "timings": {"encode": round(encoded - start, 4), "total": round(time.perf_counter() - start, 4)},
        }
