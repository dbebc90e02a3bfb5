"""Policy and tool specs (DESIGN §4) as others may see them: what a spec names on this machine, and a description of
it without those paths or addresses.

A spec such as ``hf:/models/qwen`` or ``medsam2:/ckpt/MedSAM2.pt`` tells the server where its checkpoint lives; a
client of the server (and a DICOM-SEG sent to a PACS) gets :func:`public_spec` instead — the spec's kind and the
checkpoint's file or folder name (``hf:qwen``, ``medsam2:MedSAM2.pt``), or for an OpenAI-compatible server the
model's name without the server's address (``openai:IBISAgent-7B``).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

#: Spec kinds whose remainder is one local path (``hf:PATH``, ``medsam2:CKPT``, …).
_PATH_KINDS = frozenset({"hf", "vllm", "medsam2", "medsam"})
#: Spec kinds whose remainder is ``A@CKPT`` (``sam2:CONFIG@CKPT``, ``sam:TYPE@CKPT``).
_AT_KINDS = frozenset({"sam2", "sam"})


def _name(path: str) -> str:
    """The last component of a path (``/models/qwen/`` → ``qwen``); the text itself when it has none."""
    return os.path.basename(path.rstrip("/")) or path


def public_spec(spec: str) -> str:
    """A policy or tool spec without the server's paths or addresses.

    ``hf:/models/qwen`` → ``hf:qwen``; ``sam2:configs/sam2.1/t.yaml@/ckpt/t.pt`` → ``sam2:t.yaml@t.pt``;
    ``openai:http://10.0.0.5:8000/v1#IBISAgent-7B`` → ``openai:IBISAgent-7B`` (a model named by its path, as
    ``vllm serve /models/x`` names it, → ``openai:x``; no model name → ``openai``); specs without a path
    (``embedded``, ``bundled``, ``tiny``, ``oracle``) unchanged; ``""`` → ``""``.
    """
    kind, sep, rest = spec.partition(":")
    if not sep:
        return spec
    if kind == "openai":
        model = rest.partition("#")[2].strip()
        return f"openai:{_name(model)}" if model else "openai"
    return f"{kind}:{'@'.join(_name(p) for p in rest.split('@'))}"


def spec_locations(spec: str) -> tuple[str, ...]:
    """The local paths and network addresses a policy or tool spec names (for taking them out of text a client
    sees): ``hf:/models/qwen`` → ``("/models/qwen",)``; ``openai:http://h:8000/v1#/models/x`` →
    ``("http://h:8000", "/models/x")``; ``sam2:CONFIG@CKPT`` → ``(CKPT,)`` (the config is a name inside the sam2
    package); ``medsam2:random`` and specs without a path → ``()``."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        return ()
    if kind == "openai":
        url, _, model = rest.partition("#")
        parts = urlsplit(url.strip() if "://" in url else f"http://{url.strip()}")
        found = [f"{parts.scheme}://{parts.netloc}"] if parts.netloc else []
        if "/" in model:
            found.append(model.strip())
        return tuple(found)
    if kind in _AT_KINDS:
        rest = rest.rpartition("@")[2]
    elif kind not in _PATH_KINDS:
        return ()
    return () if rest == "random" else (rest,)
