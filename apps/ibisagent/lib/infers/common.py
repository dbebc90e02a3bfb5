"""What the app's tasks share: options (defaults in one place), the lazily built models, request parsing, and input
checks that answer 4xx instead of a traceback. The logic behind them (display slices, mask writers, the store of
agent outputs awaiting a correction, target names, per-step JSON) is the library's.

Coordinates: MONAI Label clients send clicks as voxel indices ``[i, j, k]`` of the image *file* (Slicer's IJK, the
file's storage order). :func:`voxel_to_canonical` maps them to ``(z, y, x)`` of :attr:`ibisagent.imaging.Image.array`
(volumes reoriented to LPS, ``array[z]`` an axial slice) with the image's :class:`~ibisagent.imaging.Geometry`. 2D
pictures are stored ``(W, H, 1)``: ``[i, j]`` is ``[x, y]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException

from ibisagent.clicks import Click
from ibisagent.imaging import Image, ImageError, display_window, load_image, num_slices, slice_of
from ibisagent.server.limits import check_finite, check_pixels, check_voxel, conf_values, result_extension
from ibisagent.server.redact import ServerPaths, conf_locations
from ibisagent.specs import public_spec

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class Options:
    """The app's ``--conf`` options and their defaults (the one place they are defined; all listed in ``/info``)."""

    policy: str = "bundled"
    """Policy spec: ``bundled`` (the small policy the project trained and ships), ``hf:PATH``, ``openai:URL#MODEL``,
    ``vllm:PATH`` or ``tiny`` (offline, untrained). A policy published by a finished train task replaces it."""
    tool: str = "embedded"
    """Tool spec: ``embedded``, ``sam2:CONFIG@CKPT``, ``medsam2:CKPT``, ``sam:TYPE@CKPT``, ``medsam:CKPT``."""
    device: str = "cpu"
    """Torch device for the policy and the tool."""
    history: str = "off"
    """Agent history mode: ``off`` (as the released checkpoint was run) or ``full``."""
    max_steps: int = 10
    """Most agent steps per request."""
    auto_train_every: int = 0
    """Start ``ibisagent_sft`` after this many new corrections (0 = never)."""
    modality: str = ""
    """Modality of the served images (``CT``, ``MR``, ...) overriding the files' own; a request's ``modality``
    overrides it. ``""``: the file's (DICOM tags), else ``CT`` for Hounsfield-range volumes (docs/INPUTS.md)."""
    modalities: str = "CT,MR"
    """DICOMweb studies: the modalities whose series the app lists, comma-separated (MONAI Label's own default lists
    only CT)."""
    train_minutes: int = 0
    """Time budget of a train request in minutes (0 = the run config's own)."""
    train_trajectories: str = ""
    """Extra trajectory JSONL files (comma-separated) for ``ibisagent_sft`` beside the corrections."""
    train_manifest: str = ""
    """Manifest(s) with ground truth (comma-separated) for ``ibisagent_grpo``."""
    threads: int = 0
    """CPU threads for torch in this server process (0 = torch's default). On a shared or small CPU host set 1 per
    worker: oversubscribed threads made one infer swing from 0.9 s to 29 s in our measurements."""
    policy_timeout: float = 120.0
    """Overall seconds one call of a remote (``openai:``) policy may take, retries and slow replies included."""
    time_limit: float = 600.0
    """Wall-clock seconds of one agent request, counted from its arrival: the key slice and every propagated slice
    together (each slice gets the time left; propagation stops when none is left, keeping the slices done); also
    bounds a remote policy call in progress."""
    max_instruction_chars: int = 500
    """Longest instruction or target name a request may send (longer: 413)."""
    max_pixels: int = 64_000_000
    """Most pixels (voxels) of an image to segment (more: 413)."""

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> Options:
        """Parse MONAI Label's string ``conf``; unknown keys are ignored, bad values raise ``ValueError``."""
        opts = cls(**conf_values(cls, conf))
        if opts.history not in ("off", "full"):
            raise ValueError(f"--conf history must be 'off' or 'full', got {opts.history!r}")
        if not opts.modality_list:
            raise ValueError(f"--conf modalities must name at least one modality, e.g. CT,MR; got {opts.modalities!r}")
        if opts.max_steps < 1 or opts.auto_train_every < 0 or opts.threads < 0:
            raise ValueError("--conf max_steps must be >= 1, auto_train_every and threads >= 0")
        if min(opts.policy_timeout, opts.time_limit, opts.max_instruction_chars, opts.max_pixels) <= 0:
            raise ValueError("--conf policy_timeout, time_limit, max_instruction_chars and max_pixels must be > 0")
        return opts

    @property
    def modality_list(self) -> tuple[str, ...]:
        """``modalities`` as upper-case codes: ``"ct, mr"`` → ``("CT", "MR")``."""
        return tuple(m.strip().upper() for m in self.modalities.split(",") if m.strip())

    def as_info(self) -> dict[str, Any]:
        """All options as the server uses them (checkpoint and data paths included: for the server's own log and
        its train tasks, never for a reply)."""
        return dataclasses.asdict(self)

    def public_info(self) -> dict[str, Any]:
        """The options as a client may see them (``/info``): policy and tool as :func:`ibisagent.specs.public_spec`,
        training data as file names — no server path."""
        info = self.as_info()
        info["policy"], info["tool"] = public_spec(self.policy), public_spec(self.tool)
        for key in ("train_trajectories", "train_manifest"):
            info[key] = ",".join(os.path.basename(p.strip().rstrip("/")) for p in info[key].split(",") if p.strip())
        return info


# ----------------------------------------------------------------------------------------------------------------
# lazily built models


class Runtime:
    """The tool and the policy, built on first use (never at import or app start), once, thread-safely."""

    def __init__(self, options: Options, model_dir: str | os.PathLike[str] | None = None,
                 private: tuple[str | os.PathLike[str], ...] = ()) -> None:
        self.options = options
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.paths = ServerPaths([*conf_locations(options.as_info()), tempfile.gettempdir(),
                                  *(str(p) for p in (model_dir, *private) if p is not None)])
        """Scrubs the server's paths (``private`` folders, the model folder, the temporary folder, the checkpoints,
        data and policy server of the options) out of the texts a reply carries."""
        self._lock = threading.Lock()
        self._tool: Any = None
        self._policy: Any = None
        self._policy_spec: str | None = None

    def policy_spec(self) -> str:
        """The policy to use now: the newest one a train task published, else ``--conf policy`` (``bundled`` falls
        back to ``tiny`` in an installation without it)."""
        from ibisagent.policies import has_bundled_policy
        from ibisagent.train.service import latest_policy

        trained = latest_policy(self.model_dir) if self.model_dir is not None else None
        if trained is not None:
            return f"hf:{trained}"
        if self.options.policy == "bundled" and not has_bundled_policy():
            return "tiny"
        return self.options.policy

    def public_policy(self) -> str:
        """:meth:`policy_spec` as a reply may name it (:func:`ibisagent.specs.public_spec`)."""
        return public_spec(self.policy_spec())

    def public_tool(self) -> str:
        """``--conf tool`` as a reply may name it."""
        return public_spec(self.options.tool)

    def tool(self) -> Any:
        if self._tool is None:
            with self._lock:
                if self._tool is None:
                    from ibisagent.tools import load_tool

                    self._set_threads()
                    logger.info("building tool %s on %s", self.options.tool, self.options.device)
                    self._tool = load_tool(self.options.tool, device=self.options.device)
        return self._tool

    def policy(self) -> Any:
        spec = self.policy_spec()
        if self._policy is None or spec != self._policy_spec:
            with self._lock:
                if self._policy is None or spec != self._policy_spec:
                    from ibisagent.policies import load_policy

                    self._set_threads()
                    if spec == "tiny":
                        logger.warning("policy 'tiny' is an UNTRAINED offline model: it shows the wiring, not "
                                       "useful masks; pass --conf policy hf:PATH (or openai:URL#MODEL, vllm:PATH)")
                    logger.info("building policy %s on %s", spec, self.options.device)
                    device = None if spec in ("tiny", "bundled") and self.options.device == "cpu" else \
                        self.options.device
                    self._policy = load_policy(spec, device=device, timeout=self.options.policy_timeout)
                    self._policy_spec = spec
        return self._policy

    def _set_threads(self) -> None:
        """Apply ``--conf threads`` when the first model is built (not at app start, which must stay cheap)."""
        if self.options.threads:
            import torch

            torch.set_num_threads(self.options.threads)


# ----------------------------------------------------------------------------------------------------------------
# input checks

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]*$")


def bad_request(message: str, status: int = 400) -> HTTPException:
    """An HTTP error the client sees as a 4xx with ``message`` (MONAI Label maps other exceptions to 500)."""
    return HTTPException(status_code=status, detail=message)


def check_name(value: Any, what: str) -> str:
    """An image id or label tag: letters, digits, ``. _ + -``; no path separators, no ``..`` (else 400)."""
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value or len(value) > 255:
        raise bad_request(f"invalid {what} {value!r}: use letters, digits and . _ + - only (no path separators, "
                          f"no '..')")
    return value


def request_modality(request: dict[str, Any], default: str) -> str | None:
    """The request's ``modality`` (``CT``, ``MR``, ...), else the server's ``--conf modality``; ``None``: the
    file's own (and the automatic Hounsfield rule). 400 for anything but a short alphanumeric name."""
    value = request.get("modality")
    if value is None or value == "":
        return default or None
    if not isinstance(value, str) or not value.isalnum() or len(value) > 16:
        raise bad_request(f"modality must be a short name such as CT or MR, got {value!r}")
    return value


def load_request_image(path: str, modality: str | None = None, max_pixels: int | None = None) -> Image:
    """The request's image (``modality`` overrides the file's); 415 when unreadable, 413 above ``max_pixels``, 422
    when it holds NaN/Inf."""
    try:
        image = load_image(path, modality=modality)
    except ImageError as exc:
        message = str(exc).replace(str(path), os.path.basename(str(path)))
        raise bad_request(f"cannot read the image: {message}", 415) from exc
    if max_pixels is not None:
        check_pixels(image.array.shape, max_pixels)
    check_finite(image.array)
    return image


def request_result_extension(request: dict[str, Any], image: Image) -> str:
    """The result file type the request asks for, checked against the image before any work (400 otherwise); when it
    asks for none, ``.nii.gz``, or ``.nrrd`` on a gantry-tilted (sheared) grid."""
    from ibisagent.imaging.masks import is_sheared

    source = str(image.source)
    return result_extension(request.get("result_extension"), is_volume=image.is_volume,
                            is_dicom=os.path.isdir(source) or source.lower().endswith(".dcm"),
                            sheared=image.is_volume and is_sheared(image.geometry.source_affine))


# ----------------------------------------------------------------------------------------------------------------
# clicks


def voxel_to_canonical(image: Image, voxel: Any) -> tuple[int, int, int]:
    """A client's voxel index ``[i, j, k]`` (``[i, j]`` for 2D) → canonical ``(z, y, x)``; 400 outside the image."""
    idx = check_voxel(voxel)
    if len(idx) == 2:
        idx.append(0)
    if len(idx) != 3:
        raise bad_request(f"click {voxel!r} must have 2 or 3 indices [i, j, k]")
    try:
        return image.geometry.voxel_to_canonical((idx[0], idx[1], idx[2]))
    except ValueError as exc:
        raise bad_request(f"click {voxel!r} is outside the image: {exc}") from exc


def canonical_to_voxel(image: Image, z: int, y: int, x: int) -> list[int]:
    """Canonical ``(z, y, x)`` → the client's voxel ``[i, j, k]`` (for reporting clicks back)."""
    return list(image.geometry.canonical_to_voxel((z, y, x)))


@dataclass(frozen=True)
class SliceClicks:
    """The slice a request works on and its clicks there (pixel ``(x, y)``), plus clicks on other slices."""

    slice: int
    clicks: tuple[Click, ...]
    ignored: tuple[list[Any], ...]


def request_clicks(image: Image, request: dict[str, Any]) -> SliceClicks:
    """Parse ``foreground``/``background`` voxel clicks and the optional ``slice`` (a canonical axial index).

    The slice is ``slice`` if given, else the slice of the first click, else the middle slice. Clicks on other
    slices are reported as ignored.
    """
    points: list[tuple[tuple[int, int, int], bool, list[Any]]] = []
    for key, positive in (("foreground", True), ("background", False)):
        value = request.get(key) or []
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise bad_request(f"{key} must be a list of [i, j, k] voxel indices, got {value!r}") from exc
        if not isinstance(value, list):
            raise bad_request(f"{key} must be a list of [i, j, k] voxel indices, got {value!r}")
        for voxel in value:
            points.append((voxel_to_canonical(image, voxel), positive, voxel))
    n = num_slices(image)
    chosen = request.get("slice")
    if chosen is not None and chosen != "":
        try:
            chosen = int(chosen)
        except (TypeError, ValueError) as exc:
            raise bad_request(f"slice must be an integer, got {chosen!r}") from exc
        if not 0 <= chosen < n:
            raise bad_request(f"slice {chosen} is outside the image (0..{n - 1})")
    elif points:
        chosen = points[0][0][0]
    else:
        chosen = n // 2
    clicks = tuple(Click(x=x, y=y, positive=p) for (z, y, x), p, _ in points if z == chosen)
    ignored = tuple(v for (z, _, _), _, v in points if z != chosen)
    return SliceClicks(slice=int(chosen), clicks=clicks, ignored=ignored)


def display_json(image: Image, k: int) -> dict[str, Any]:
    """The modality and display window of canonical slice ``k`` as the reply reports them."""
    return {"modality": image.modality, "window": display_window(slice_of(image, k), image.modality).to_dict()}


def slice_or_none(image: Image, k: int) -> int | None:
    return k if image.is_volume else None


# ----------------------------------------------------------------------------------------------------------------
# result files


def write_result(mask: np.ndarray, image: Image, k: int, request: dict[str, Any], label_names: list[str],
                 provenance: Any = None) -> str:
    """Write a (Z, Y, X) volume mask, or the (H, W) mask of slice ``k``, in the image's geometry, in the requested
    ``result_extension`` (default ``.nii.gz``, ``.nrrd`` on a sheared grid; also ``.nii``, ``.png`` for 2D, ``.dcm``
    DICOM-SEG for DICOM sources, with ``provenance``), through the library's one writer. Returns the path of a new
    temporary file (MONAI Label deletes it after sending)."""
    from ibisagent.imaging import save_mask_like

    ext = request_result_extension(request, image)
    fd, name = tempfile.mkstemp(prefix="ibisagent-", suffix=ext)
    os.close(fd)
    slice_arg = slice_or_none(image, k) if mask.ndim == 2 else None
    try:
        save_mask_like(mask, image, name, slice=slice_arg, label_names=label_names, provenance=provenance)
    except ImageError as exc:
        os.unlink(name)
        reason = str(exc).replace(name, os.path.basename(name)).replace(str(image.source),
                                                                         os.path.basename(str(image.source)))
        raise bad_request(f"cannot write a {ext} result for this image: {reason}") from exc
    return name
