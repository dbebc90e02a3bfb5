"""What the app's tasks share: options (defaults in one place), the lazily built models, request parsing, the agent
outputs kept for corrections, and input checks that answer 4xx instead of a traceback.

Coordinates: MONAI Label clients send clicks as voxel indices ``[i, j, k]`` of the image *file* (Slicer's IJK, the
file's storage order). :func:`voxel_to_canonical` maps them to ``(z, y, x)`` of :attr:`ibisagent.imaging.Image.array`
(volumes reoriented to LPS, ``array[z]`` an axial slice) with the image's :class:`~ibisagent.imaging.Geometry`. 2D
pictures are stored ``(W, H, 1)``: ``[i, j]`` is ``[x, y]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException

from ibisagent.clicks import Click
from ibisagent.data.trajectory import rle_decode, rle_encode
from ibisagent.fileio import atomic_write_text
from ibisagent.imaging import Image, ImageError, load_image, num_slices, slice_of, to_display_rgb

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
    train_minutes: int = 0
    """Time budget of a train request in minutes (0 = the run config's own)."""
    train_trajectories: str = ""
    """Extra trajectory JSONL files (comma-separated) for ``ibisagent_sft`` beside the corrections."""
    train_manifest: str = ""
    """Manifest(s) with ground truth (comma-separated) for ``ibisagent_grpo``."""
    threads: int = 0
    """CPU threads for torch in this server process (0 = torch's default). On a shared or small CPU host set 1 per
    worker: oversubscribed threads made one infer swing from 0.9 s to 29 s in our measurements."""

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> Options:
        """Parse MONAI Label's string ``conf``; unknown keys are ignored, bad values raise ``ValueError``."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in conf:
                continue
            raw = conf[f.name]
            try:
                values[f.name] = int(raw) if f.type in ("int", int) else str(raw)
            except ValueError as exc:
                raise ValueError(f"--conf {f.name} {raw!r}: expected an integer") from exc
        opts = cls(**values)
        if opts.history not in ("off", "full"):
            raise ValueError(f"--conf history must be 'off' or 'full', got {opts.history!r}")
        if opts.max_steps < 1 or opts.auto_train_every < 0 or opts.threads < 0:
            raise ValueError("--conf max_steps must be >= 1, auto_train_every and threads >= 0")
        return opts

    def as_info(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# lazily built models


class Runtime:
    """The tool and the policy, built on first use (never at import or app start), once, thread-safely."""

    def __init__(self, options: Options, model_dir: str | os.PathLike[str] | None = None) -> None:
        self.options = options
        self.model_dir = Path(model_dir) if model_dir is not None else None
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
                    self._policy = load_policy(spec, device=device)
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


def server_side_input(path: str) -> bool:
    """Whether ``path`` is a file MONAI Label itself wrote for this request (an uploaded file or a session image)."""
    if not os.path.isabs(path) or not os.path.exists(path):
        return False
    real = os.path.realpath(path)
    roots = [os.path.realpath(tempfile.gettempdir())]
    from monailabel.config import settings

    if settings.MONAI_LABEL_SESSION_PATH:
        roots.append(os.path.realpath(settings.MONAI_LABEL_SESSION_PATH))
    return any(real.startswith(root + os.sep) for root in roots)


def load_request_image(path: str) -> Image:
    try:
        return load_image(path)
    except ImageError as exc:
        raise bad_request(f"cannot read the image: {exc}", 415) from exc


# ----------------------------------------------------------------------------------------------------------------
# clicks


def voxel_to_canonical(image: Image, voxel: Any) -> tuple[int, int, int]:
    """A client's voxel index ``[i, j, k]`` (``[i, j]`` for 2D) → canonical ``(z, y, x)``; 400 outside the image."""
    try:
        idx = [int(round(float(v))) for v in voxel]
    except (TypeError, ValueError) as exc:
        raise bad_request(f"click {voxel!r} is not a list of voxel indices [i, j, k]") from exc
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


def display_slice(image: Image, k: int) -> np.ndarray:
    """(H, W, 3) uint8 display RGB of canonical slice ``k`` (the whole picture for 2D images)."""
    return to_display_rgb(slice_of(image, k), image.modality)


def slice_or_none(image: Image, k: int) -> int | None:
    return k if image.is_volume else None


# ----------------------------------------------------------------------------------------------------------------
# result files


def write_result(mask: np.ndarray, image: Image, k: int, request: dict[str, Any], label_names: list[str]) -> str:
    """Write a (Z, Y, X) volume mask, or the (H, W) mask of slice ``k``, in the image's geometry, in the requested
    ``result_extension``
    (``.nii.gz`` default, ``.nii``, ``.nrrd``, ``.png`` for 2D, ``.dcm`` DICOM-SEG for DICOM sources). Returns the
    path of a new temporary file (MONAI Label deletes it after sending)."""
    from ibisagent.imaging import save_dicom_seg, save_mask_like

    ext = str(request.get("result_extension") or ".nii.gz")
    if not ext.startswith("."):
        ext = "." + ext
    if ext not in (".nii.gz", ".nii", ".nrrd", ".png", ".dcm"):
        raise bad_request(f"result_extension {ext!r} is not supported (.nii.gz, .nii, .nrrd, .png, .dcm)")
    fd, name = tempfile.mkstemp(prefix="ibisagent-", suffix=ext)
    os.close(fd)
    slice_arg = slice_or_none(image, k) if mask.ndim == 2 else None
    try:
        if ext == ".dcm":
            save_dicom_seg(mask, image.source, name, label_names, slice=slice_arg)
        else:
            save_mask_like(mask, image, name, slice=slice_arg)
    except ImageError as exc:
        os.unlink(name)
        raise bad_request(f"cannot write a {ext} result for this image: {exc}") from exc
    return name


# ----------------------------------------------------------------------------------------------------------------
# agent outputs kept for corrections


class AgentOutputs:
    """The agent's last mask per (image id, slice), kept beside the datastore so that a later save of a ``final``
    label can be compared with it. One JSON file per image id under ``root``; written atomically. Each
    read-modify-write holds a thread lock and an exclusive ``flock`` on ``root/.lock``, so several server workers
    (``--workers N``) never lose each other's entries."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _path(self, image_id: str) -> Path:
        return self.root / f"{check_name(image_id, 'image id')}.json"

    def put(self, image_id: str, slice_key: int, entry: dict[str, Any], masks: dict[str, np.ndarray]) -> None:
        entry = {**entry, "masks": {name: rle_encode(m) for name, m in masks.items()}}
        with self._exclusive():
            data = self._read(image_id)
            data[str(slice_key)] = entry
            atomic_write_text(self._path(image_id), json.dumps(data))

    def take(self, image_id: str) -> dict[int, dict[str, Any]]:
        """All stored outputs of the image (slice → entry with decoded ``masks``), removing them."""
        with self._exclusive():
            data = self._read(image_id)
            self._path(image_id).unlink(missing_ok=True)
        out = {}
        for key, entry in data.items():
            entry["masks"] = {name: rle_decode(rle) for name, rle in entry.get("masks", {}).items()}
            out[int(key)] = entry
        return out

    def has(self, image_id: str) -> bool:
        return self._path(image_id).is_file()

    def _read(self, image_id: str) -> dict[str, Any]:
        path = self._path(image_id)
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            logger.warning("%s: unreadable agent output, ignored", path)
            return {}
