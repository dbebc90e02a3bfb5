"""What one request may ask of the server, checked before any work: the server's options (``--conf``) and pure checks
that raise :class:`RequestError` (an HTTP 4xx with a message) for a client's mistake.

All limits are options of :class:`ServerOptions`; their defaults are the one place they are defined.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from collections.abc import Mapping
from typing import Any

import numpy as np
from fastapi import HTTPException

#: Request keys the server sets itself; a client sending one gets a 400 (``ibisagent_*`` are internal too).
RESERVED_PARAMS = frozenset({"image", "model", "label", "session", "save_label", "label_tag", "description"})

#: Prefix of internal request keys (e.g. ``ibisagent_image_id``); never accepted from a client.
INTERNAL_PREFIX = "ibisagent_"

#: Request key under which the serving layer marks an ``image`` path it wrote itself (an upload, a session image).
SERVER_INPUT_KEY = "ibisagent_server_input"

#: The mark: an object no JSON request can carry, so a client cannot forge it.
SERVER_INPUT = object()

#: File name endings accepted for uploaded images and labels.
UPLOAD_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".png", ".jpg", ".jpeg", ".dcm")

#: Result extensions a 2D picture / a volume can be written as (``.dcm`` needs a DICOM source as well).
RESULT_EXTENSIONS_2D = (".nii.gz", ".nii", ".nrrd", ".png")
RESULT_EXTENSIONS_3D = (".nii.gz", ".nii", ".nrrd", ".dcm")


class RequestError(HTTPException):
    """A client's mistake: ``status`` is the HTTP status (4xx), ``message`` says what to change. An HTTP exception,
    so that MONAI Label's FastAPI app answers it as such (JSON ``{"detail": message}``) wherever it is raised."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(status_code=status, detail=message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


def conf_values(options_class: type, conf: Mapping[str, str]) -> dict[str, Any]:
    """The fields of the dataclass ``options_class`` found in MONAI Label's string ``conf``, converted to the field's
    type (``int``, ``float``, else ``str``); unknown keys are ignored.

    Raises:
        ValueError: a value that does not convert, naming the option.
    """
    values: dict[str, Any] = {}
    for f in fields(options_class):
        if f.name not in conf:
            continue
        raw = conf[f.name]
        kind = {"int": int, "float": float}.get(str(f.type), str)
        try:
            values[f.name] = kind(raw)
        except ValueError as exc:
            raise ValueError(f"--conf {f.name} {raw!r}: expected {kind.__name__}") from exc
    return values


@dataclass(frozen=True)
class ServerOptions:
    """Serving options, set with ``--conf NAME VALUE`` on the start command (listed in ``/info`` under
    ``config.server``)."""

    infer_workers: int = 2
    """Infer requests running at once, each on a worker thread off the event loop."""
    infer_queue: int = 16
    """Infer requests that may wait for a worker; more get 503 (retry later)."""
    max_upload_mb: int = 512
    """Largest request body in MiB (uploads of images and labels); larger gets 413 before it is read."""
    cors_origins: str = ""
    """Comma-separated browser origins (``https://viewer.hospital.org``) allowed to call the server; the server's own
    origin (its bundled OHIF) is always allowed. Empty: no other origin."""

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> ServerOptions:
        """Parse MONAI Label's string ``conf`` (unknown keys ignored); a bad value raises ``ValueError``."""
        opts = cls(**conf_values(cls, conf))
        for name in ("infer_workers", "max_upload_mb"):
            if getattr(opts, name) < 1:
                raise ValueError(f"--conf {name} must be >= 1, got {getattr(opts, name)}")
        if opts.infer_queue < 0:
            raise ValueError(f"--conf infer_queue must be >= 0, got {opts.infer_queue}")
        return opts

    @property
    def origins(self) -> tuple[str, ...]:
        return tuple(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    def as_info(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# checks (pure; each raises RequestError)


def check_params(params: Any) -> dict[str, Any]:
    """A request's ``params`` (a JSON text or an already parsed value) → a dict; 400 when not a JSON object or when it
    carries a key the server sets itself (:data:`RESERVED_PARAMS`, ``ibisagent_*``)."""
    if isinstance(params, str | bytes):
        try:
            params = json.loads(params or "{}", parse_constant=_reject_constant)
        except ValueError as exc:
            raise RequestError(f"params must be a JSON object: {exc}") from None
    if not isinstance(params, dict):
        raise RequestError(f"params must be a JSON object, got {type(params).__name__}")
    for key in params:
        if key in RESERVED_PARAMS or str(key).startswith(INTERNAL_PREFIX):
            raise RequestError(f"params key {key!r} is set by the server and may not be sent by a client")
    return params


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a request may carry")


def check_text(value: Any, what: str, max_chars: int) -> str:
    """An instruction or a target name: one line of text without ``[``/``]`` (the action grammar's brackets), at most
    ``max_chars`` characters (413 beyond); leading/trailing blanks removed."""
    if not isinstance(value, str):
        raise RequestError(f"{what} must be text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise RequestError(f"{what} is {len(value)} characters long; at most {max_chars} are accepted", 413)
    text = value.strip()
    bad = sorted({c for c in text if c in "[]" or (not c.isprintable())})
    if bad:
        raise RequestError(f"{what} may not contain {', '.join(repr(c) for c in bad)} (one line, no brackets)")
    return text


def check_pixels(shape: tuple[int, ...], max_pixels: int) -> None:
    """413 when an image of ``shape`` has more than ``max_pixels`` pixels (colour channels not counted)."""
    dims = shape[:-1] if len(shape) == 3 and shape[-1] in (3, 4) else shape
    count = int(np.prod(dims, dtype=np.int64))
    if count > max_pixels:
        raise RequestError(f"image of shape {tuple(shape)} has {count} pixels; at most {max_pixels} are accepted", 413)


def check_finite(array: np.ndarray) -> None:
    """422 when a floating-point image holds NaN or infinite values (a mask of them would be meaningless)."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise RequestError(f"the image holds {bad} NaN or infinite values; replace them before segmenting", 422)


def result_extension(value: Any, *, is_volume: bool, is_dicom: bool, sheared: bool = False) -> str:
    """The ``result_extension`` a client asked for, checked against the input: ``.png`` only for 2D pictures, ``.dcm``
    (DICOM-SEG) only for DICOM sources; 400 otherwise. When absent: ``.nii.gz``, or ``.nrrd`` for a ``sheared``
    (gantry-tilted) grid, which NRRD holds exactly and NIfTI only in its sform (3D Slicer and other ITK-based
    readers refuse such a NIfTI)."""
    ext = str(value or (".nrrd" if sheared else ".nii.gz")).strip().lower()
    if not ext.startswith("."):
        ext = "." + ext
    allowed = RESULT_EXTENSIONS_3D if is_volume else RESULT_EXTENSIONS_2D + (".dcm",)
    if ext not in allowed:
        raise RequestError(f"result_extension {ext!r} is not available for a {'volume' if is_volume else '2D image'}"
                           f" (use one of {', '.join(allowed)})")
    if ext == ".dcm" and not is_dicom:
        raise RequestError("result_extension '.dcm' (DICOM-SEG) needs a DICOM source image")
    return ext


def check_label_shape(label_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> None:
    """400 when a saved label's shape differs from its image's (both as :func:`ibisagent.imaging.load_image` gives
    them; colour channels of a 2D picture ignored)."""
    def plane(shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[:2] if len(shape) == 3 and shape[-1] in (3, 4) else shape

    if plane(tuple(label_shape)) != plane(tuple(image_shape)):
        raise RequestError(f"label shape {tuple(label_shape)} does not match its image's shape {tuple(image_shape)}")


def check_voxel(value: Any) -> list[int]:
    """A click ``[i, j(, k)]`` of finite numbers → integer indices; 400 for ``Infinity``, ``1e400``, NaN, text."""
    if not isinstance(value, list | tuple):
        raise RequestError(f"click {value!r} is not a list of voxel indices [i, j, k]")
    out = []
    for v in value:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RequestError(f"click {value!r} is not a list of voxel indices [i, j, k]") from None
        if not math.isfinite(f) or abs(f) > 2**31:
            raise RequestError(f"click {value!r} holds a non-finite or out-of-range index")
        out.append(int(round(f)))
    return out
