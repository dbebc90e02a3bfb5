"""The manifest contract (DESIGN §4): JSONL, one case per line, paths relative to the manifest file.

``{"id", "image", "modality", "instruction", "targets": [{"name", "mask"}], "slice"?, "initial_mask"?, "answer"?}``

``"mask": null`` declares the target absent (the right answer is "not present"). ``targets`` may be empty only for
closed-VQA cases that carry an ``answer``. Unknown keys are ignored.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..imaging import (
    DisplayWindow,
    Image,
    ImageError,
    display_window,
    load_image,
    load_mask,
    num_slices,
    slice_of,
    to_display_rgb,
)

if TYPE_CHECKING:
    from ibisagent.clicks import AnchorMode

logger = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
REQUIRED_FIELDS = ("id", "image", "modality", "instruction", "targets")


class CaseError(ValueError):
    """A manifest line or a case's files are unusable.

    Attributes:
        case_id: the case id, or ``"line N"`` when the line has no usable id.
        path: the manifest (for parse errors) or the offending file (for load errors).
        message: the problem.
        line: 1-based manifest line number, when known.
    """

    def __init__(self, case_id: str, path: Path | str, message: str, line: int | None = None) -> None:
        self.case_id = case_id
        self.path = Path(path)
        self.message = message
        self.line = line
        where = f"{self.path}" + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: case {case_id}: {message}")


@dataclass(frozen=True)
class Target:
    """One segmentation target; ``mask`` is ``None`` when the target is declared absent."""

    name: str
    mask: Path | None


@dataclass(frozen=True)
class Case:
    """One manifest line with paths resolved against the manifest's folder."""

    id: str
    image: Path
    modality: str
    instruction: str
    targets: tuple[Target, ...]
    slice: int | None = None
    initial_mask: Path | None = None
    answer: str | None = None
    line: int = 0
    manifest: Path | None = None


@dataclass
class LoadedCase:
    """A case with its pixels.

    Attributes:
        case: the manifest entry.
        image: the loaded image or volume.
        rgb: ``(H, W, 3)`` uint8 display image of the 2D image or of axial slice ``case.slice``.
        targets: target name -> ``(H, W)`` bool mask aligned to ``rgb``, or ``None`` for an absent target.
        initial_mask: ``(H, W)`` bool starting mask for refinement, or ``None``.
    """

    case: Case
    image: Image
    rgb: np.ndarray
    targets: dict[str, np.ndarray | None]
    initial_mask: np.ndarray | None

    @property
    def slice2d(self) -> np.ndarray:
        """The raw intensities behind ``rgb``: ``(H, W)`` or ``(H, W, 3)``."""
        return slice_of(self.image, self.case.slice or 0)

    @property
    def window(self) -> DisplayWindow:
        """The display rule that made ``rgb`` (from the image's modality: the manifest's, the file's or the
        automatic Hounsfield rule)."""
        return display_window(self.slice2d, self.image.modality)


def read_manifest(path: str | os.PathLike[str]) -> list[Case | CaseError]:
    """Parse a JSONL manifest: one :class:`Case` or :class:`CaseError` per non-blank line, in file order.

    Raises:
        FileNotFoundError: the manifest does not exist.
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    base = manifest.resolve().parent
    entries: list[Case | CaseError] = []
    seen: dict[str, int] = {}
    with open(manifest, encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                case = _parse_line(raw, number, manifest, base)
            except CaseError as err:
                entries.append(err)
                continue
            if case.id in seen:
                entries.append(CaseError(case.id, manifest, f"duplicate id (first used on line {seen[case.id]})",
                                         number))
                continue
            seen[case.id] = number
            entries.append(case)
    return entries


def read_cases(path: str | os.PathLike[str]) -> list[Case]:
    """Like :func:`read_manifest` but raise the first :class:`CaseError` instead of returning it."""
    cases = []
    for entry in read_manifest(path):
        if isinstance(entry, CaseError):
            raise entry
        cases.append(entry)
    return cases


def _parse_line(raw: str, number: int, manifest: Path, base: Path) -> Case:
    label = f"line {number}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CaseError(label, manifest, f"not valid JSON ({exc.msg} at column {exc.colno})", number) from exc
    if not isinstance(obj, dict):
        raise CaseError(label, manifest, f"expected a JSON object, got {type(obj).__name__}", number)
    raw_id = obj.get("id")
    case_id = raw_id if isinstance(raw_id, str) and raw_id else label

    def fail(message: str) -> CaseError:
        return CaseError(case_id, manifest, message, number)

    missing = [k for k in REQUIRED_FIELDS if k not in obj]
    if missing:
        raise fail(f"missing field(s) {missing}")
    if not isinstance(raw_id, str) or not raw_id:
        raise fail(f"'id' must be a non-empty string, got {raw_id!r}")
    if not ID_PATTERN.match(raw_id) or ".." in raw_id or raw_id in (".",):
        raise fail(f"invalid id {raw_id!r}: use only letters, digits, '.', '_', '-' (no path separators or '..')")
    image = _string(obj, "image", fail)
    modality = obj["modality"]
    if not isinstance(modality, str):
        raise fail(f"'modality' must be a string, got {modality!r}")
    instruction = _string(obj, "instruction", fail)
    targets = _targets(obj["targets"], base, fail)
    slice_index = obj.get("slice")
    if slice_index is not None and (isinstance(slice_index, bool) or not isinstance(slice_index, int)
                                    or slice_index < 0):
        raise fail(f"'slice' must be a non-negative integer or null, got {slice_index!r}")
    initial = obj.get("initial_mask")
    if initial is not None and (not isinstance(initial, str) or not initial):
        raise fail(f"'initial_mask' must be a path string or null, got {initial!r}")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise fail(f"'answer' must be a string or null, got {answer!r}")
    if not targets and answer is None:
        raise fail("'targets' is empty; only closed-VQA cases with an 'answer' may have no targets")
    return Case(
        id=raw_id,
        image=_resolve(base, image),
        modality=modality,
        instruction=instruction,
        targets=targets,
        slice=slice_index,
        initial_mask=_resolve(base, initial) if initial else None,
        answer=answer,
        line=number,
        manifest=manifest,
    )


def _string(obj: dict[str, Any], key: str, fail: Any) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise fail(f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _targets(value: Any, base: Path, fail: Any) -> tuple[Target, ...]:
    if not isinstance(value, list):
        raise fail(f"'targets' must be a list of {{'name', 'mask'}} objects, got {type(value).__name__}")
    targets = []
    names: set[str] = set()
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "name" not in item or "mask" not in item:
            raise fail(f"targets[{i}] must be an object with 'name' and 'mask' (null if absent), got {item!r}")
        name, mask = item["name"], item["mask"]
        if not isinstance(name, str) or not name.strip():
            raise fail(f"targets[{i}].name must be a non-empty string, got {name!r}")
        if name in names:
            raise fail(f"duplicate target name {name!r}")
        if mask is not None and (not isinstance(mask, str) or not mask):
            raise fail(f"targets[{i}].mask must be a path string or null, got {mask!r}")
        names.add(name)
        targets.append(Target(name=name, mask=_resolve(base, mask) if mask is not None else None))
    return tuple(targets)


def _resolve(base: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else base / p


def load_case(case: Case) -> LoadedCase:
    """Load a case's image, display picture and masks, checking everything fits.

    Raises:
        CaseError: naming the offending file — missing/unreadable image or mask, a volume without ``slice``,
            slice out of range, mask/image size mismatch, non-binary mask, or an empty mask for a target that is
            not declared absent.
    """
    try:
        image = load_image(case.image, modality=case.modality or None)
    except ImageError as exc:
        raise CaseError(case.id, case.image, str(exc), case.line) from exc
    if image.is_volume and case.slice is None:
        raise CaseError(case.id, case.image, f"image is a volume of shape {image.array.shape}; the case needs "
                        f"'slice' (0..{num_slices(image) - 1})", case.line)
    if not image.is_volume and case.slice not in (None, 0):
        raise CaseError(case.id, case.image, f"'slice' {case.slice} given for a 2D image", case.line)
    try:
        plane = slice_of(image, case.slice or 0)
    except ImageError as exc:
        raise CaseError(case.id, case.image, str(exc), case.line) from exc
    rgb = to_display_rgb(plane, image.modality)
    targets: dict[str, np.ndarray | None] = {}
    for target in case.targets:
        if target.mask is None:
            targets[target.name] = None
            continue
        mask = _mask(case, target.mask, image)
        if not mask.any():
            raise CaseError(case.id, target.mask, f"empty mask for target {target.name!r} in {target.mask}"
                            + (f" at slice {case.slice}" if image.is_volume else "")
                            + "; use null for an absent target", case.line)
        targets[target.name] = mask
    initial = _mask(case, case.initial_mask, image) if case.initial_mask is not None else None
    return LoadedCase(case=case, image=image, rgb=rgb, targets=targets, initial_mask=initial)


def _mask(case: Case, path: Path, image: Image) -> np.ndarray:
    try:
        return load_mask(path, image, slice=case.slice if image.is_volume else None)
    except ImageError as exc:
        raise CaseError(case.id, path, str(exc), case.line) from exc


def click_anchor_modes(path: str | os.PathLike[str] | TargetLayouts, max_modes: int,
                       seed: int = 0) -> dict[str, list[AnchorMode]]:
    """Each target name's appearance modes over a manifest's images and masks (:func:`ibisagent.clicks.anchor_modes`;
    augmented variants of a case are grouped with it for the cross-validation): target name (case-folded) → modes.
    ``path`` may also be :func:`target_layouts`' result, so that one scan of a manifest serves several fits."""
    from ibisagent.clicks import anchor_modes_from_layouts

    layouts = target_layouts(path) if isinstance(path, (str, os.PathLike)) else path
    return {name: anchor_modes_from_layouts(*found, max_modes=max_modes, seed=seed)
            for name, found in layouts.items()}


def expert_anchors(path: str | os.PathLike[str], max_modes: int = 1, seed: int = 0) -> dict[str, list[AnchorMode]]:
    """The simulated expert's click anchors (``OraclePolicy(anchors=…)``), from a manifest or a saved set of modes.

    ``path`` is either a manifest (each target name's appearance modes over its masks, up to ``max_modes``:
    :func:`click_anchor_modes`, what ``simulate --anchor-from`` does) or a ``.json`` file of saved modes (target name
    → list of :meth:`ibisagent.clicks.AnchorMode.to_json`, as ``train tiny`` writes ``DIR/anchor_modes.json``), so a
    later stage anchors its expert exactly as the SFT data's was. Returns target name (case-folded) → modes.

    Raises:
        ValueError: a JSON file that is not that mapping, naming the file.
    """
    from ibisagent.clicks import AnchorMode

    source = Path(path)
    if source.suffix.lower() != ".json":
        return click_anchor_modes(source, max_modes, seed)
    try:
        saved = json.loads(source.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise TypeError(f"expected a JSON object, got {type(saved).__name__}")
        found = {str(name).casefold(): [AnchorMode.from_json(mode) for mode in modes] for name, modes in saved.items()}
        empty = sorted(name for name, modes in found.items() if not modes)
        if empty:
            raise ValueError(f"no mode for {empty}")
        return found
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: not a set of click anchor modes (target name → modes): {exc}") from exc


#: Target name → (image thumbnails, mask occupancies, source case ids) of its non-empty masks (:func:`target_layouts`).
TargetLayouts = dict[str, tuple[list[np.ndarray], list[np.ndarray], list[str]]]


def target_layouts(path: str | os.PathLike[str]) -> TargetLayouts:
    """One scan of a manifest for the click anchors: for each target name (case-folded), the
    :func:`ibisagent.clicks.image_layout` of the image and the :func:`ibisagent.clicks.mask_layout` of each non-empty
    mask, with the case id it comes from (an augmented variant's source case, :func:`ibisagent.data.augment.source_id`).
    Lines and cases that fail to load are left out, with a warning."""
    from ibisagent.clicks import image_layout, mask_layout
    from ibisagent.data.augment import source_id

    layouts: TargetLayouts = {}
    for case in read_manifest(path):
        try:
            if isinstance(case, CaseError):
                raise case
            loaded = load_case(case)
        except CaseError as exc:
            logger.warning("click anchors: %s left out: %s", path, exc)
            continue
        thumb = None
        for name, mask in loaded.targets.items():
            if mask is not None and mask.any():
                thumb = image_layout(loaded.rgb) if thumb is None else thumb
                found = layouts.setdefault(name.casefold(), ([], [], []))
                found[0].append(thumb)
                found[1].append(mask_layout(mask))
                found[2].append(source_id(case.id))
    return layouts
