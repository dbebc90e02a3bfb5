"""Click-driven segmentation tools behind one interface (:class:`SegmentationTool`).

Tool specs (DESIGN §4):

=============================  ==========================================================================
``embedded``                   CPU, no weights (see :mod:`ibisagent.tools.embedded`)
``sam2:CONFIG@CKPT``           SAM 2 / 2.1 from a sam2 config name (e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``)
``medsam2:CKPT``               MedSAM2 (SAM2.1-tiny at 512 px)
``sam:TYPE@CKPT``              Segment Anything, ``TYPE`` in ``vit_b | vit_l | vit_h``
``medsam:CKPT``                MedSAM (SAM ViT-B fine-tune)
=============================  ==========================================================================

``CKPT`` is a local file path. The word ``random`` instead of a path builds the model from its config with
random weights: useless for segmenting, right for shape tests and latency benchmarks. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from ibisagent.tools.base import ImageSession, Prediction, SegmentationTool

__all__ = ["ImageSession", "Prediction", "SegmentationTool", "load_tool", "parse_checkpoint"]


def parse_checkpoint(value: str) -> Path | None:
    """``"random"`` → ``None`` (random init); otherwise an existing local file path (else ``FileNotFoundError``)."""
    if value == "random":
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (tools load local checkpoints only; nothing is downloaded)")
    return path


def load_tool(spec: str, device: str = "cpu") -> SegmentationTool:
    """Build a tool from its spec string (see the module docstring). Raises ``ValueError`` for an unknown spec."""
    kind, _, rest = spec.partition(":")
    if kind == "embedded" and not rest:
        from ibisagent.tools.embedded import EmbeddedTool

        return EmbeddedTool()
    if kind == "sam2" and "@" in rest:
        from ibisagent.tools.sam2 import Sam2Tool

        config, _, ckpt = rest.rpartition("@")
        return Sam2Tool(config=config, checkpoint=parse_checkpoint(ckpt), device=device)
    if kind == "medsam2" and rest:
        from ibisagent.tools.sam2 import Sam2Tool

        return Sam2Tool.medsam2(checkpoint=parse_checkpoint(rest), device=device)
    if kind == "sam" and "@" in rest:
        from ibisagent.tools.sam import SamTool

        model_type, _, ckpt = rest.partition("@")
        return SamTool(model_type=model_type, checkpoint=parse_checkpoint(ckpt), device=device)
    if kind == "medsam" and rest:
        from ibisagent.tools.sam import SamTool

        return SamTool.medsam(checkpoint=parse_checkpoint(rest), device=device)
    raise ValueError(
        f"unknown tool spec {spec!r}; expected one of: embedded, sam2:CONFIG@CKPT, medsam2:CKPT, "
        "sam:TYPE@CKPT, medsam:CKPT (CKPT a local path or 'random')"
    )
