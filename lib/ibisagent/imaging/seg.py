"""DICOM Segmentation out (highdicom), with provenance (DESIGN §6): how each segment was made, by which algorithm and
version, with which policy and tool, and — for a radiologist's correction — who saved it and when.

- **Algorithm type** (per segment): ``AUTOMATIC`` when the agent alone made the mask, ``SEMIAUTOMATIC`` when a
  person's clicks (or a person's edit of the agent's mask) shaped it.
- **Algorithm identification**: name ``ibisagent``, the package version, family *Artificial Intelligence*
  (CID 7162), and the policy and tool specs as algorithm parameters; the series description repeats them
  (``ibisagent 0.1.0 policy=… tool=…``, shortened to the 64 characters DICOM allows by dropping folders from paths).
- **Segmented property**: coded from the target name through highdicom's / pydicom's DICOM code dictionaries: CID 7151
  *Segmentation Property Types* (SNOMED CT), the category from the CID that holds the type (7159 morphologically
  abnormal structures, 7166 tissue types, else anatomical structure); "Tissue" when no code exists. Laterality words
  (left, right) stay in the segment label only.
- **Correction**: the MONAI Label client id as *Content Creator's Name* and the time of the save as content date and
  time, both repeated in the content description.

Read back with ``highdicom.seg.segread`` (see ``tests/test_seg.py``).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ..fileio import atomic_path
from ..specs import public_spec
from .dicom import _read_dataset
from .io import Image, ImageError, load_image

ALGORITHM_NAME = "ibisagent"
#: DICOM's length limit for LO values (series and content descriptions).
LO_MAX = 64

_WORD = re.compile(r"[a-z0-9]+")
#: Words dropped before looking a target name up (they qualify the structure, they do not name it).
_QUALIFIERS = frozenset({"left", "right", "the", "a", "an", "all", "of", "bilateral"})
#: British spellings → the dictionaries' keywords.
_SPELLING = {"tumour": "neoplasm", "tumor": "neoplasm", "tumours": "neoplasm", "tumors": "neoplasm",
             "cancer": "neoplasm", "oedema": "edema", "haemorrhage": "hemorrhage", "oesophagus": "esophagus",
             "lesions": "lesion", "kidneys": "kidney", "lungs": "lung", "nodules": "nodule", "cysts": "cyst",
             "grey": "gray"}
#: Morphologically abnormal structures outside CID 7159 that SNOMED CT still names (looked up in ``codes.SCT``).
_ABNORMAL_SCT = frozenset({"Lesion"})


@dataclass(frozen=True)
class Provenance:
    """How a mask was made, written into every segment of a DICOM-SEG.

    Attributes:
        policy: the policy spec (``hf:PATH``, ``openai:URL#MODEL``, …); empty when no model took part.
        tool: the tool spec (``embedded``, ``medsam2:CKPT``, …).
        person: whether a person's clicks or edits shaped the mask (``SEMIAUTOMATIC``; else ``AUTOMATIC``).
        client_id: for a saved correction, the MONAI Label client id of whoever saved it.
        time: for a saved correction, when it was saved (timezone-aware or naive local time).
    """

    policy: str = ""
    tool: str = ""
    person: bool = False
    client_id: str | None = None
    time: dt.datetime | None = field(default=None)

    @property
    def algorithm_type(self) -> hd.seg.SegmentAlgorithmTypeValues:
        values = hd.seg.SegmentAlgorithmTypeValues
        return values.SEMIAUTOMATIC if self.person else values.AUTOMATIC

    def series_description(self, version: str) -> str:
        """``ibisagent VERSION policy=… tool=…`` within :data:`LO_MAX` characters (paths shortened to file names,
        then cut)."""
        full = f"{ALGORITHM_NAME} {version} policy={self.policy or '-'} tool={self.tool or '-'}"
        if len(full) <= LO_MAX:
            return full
        policy, tool = public_spec(self.policy) or "-", public_spec(self.tool) or "-"
        short = f"{ALGORITHM_NAME} {version} policy={policy} tool={tool}"
        return short[:LO_MAX]

    def content_description(self) -> str | None:
        """For a correction: ``correction by CLIENT at ISO-TIME`` (cut to :data:`LO_MAX`)."""
        if self.client_id is None and self.time is None:
            return None
        when = self.time.isoformat(timespec="seconds") if self.time is not None else "unknown time"
        return f"correction by {self.client_id or 'unknown client'} at {when}"[:LO_MAX]


def segment_codes(name: str) -> tuple[Code, Code]:
    """The (category, type) codes of a target name, SNOMED CT through the DICOM code dictionaries.

    ``"liver"`` → (Anatomical Structure, Liver 10200004); ``"left kidney"`` → (Anatomical Structure, Kidney);
    ``"white matter"`` → (Anatomical Structure, White Matter); ``"pancreatic tumour"`` → (Morphologically Abnormal
    Structure, Neoplasm); a name without a code → (Tissue, Tissue). The longest tail of the name's words that names a
    CID 7151 concept wins.
    """
    words = [_SPELLING.get(w, w) for w in _WORD.findall(name.lower()) if w not in _QUALIFIERS]
    abnormal = codes.cid7150.MorphologicallyAbnormalStructure
    for start in range(len(words)):
        keyword = "".join(w.capitalize() for w in words[start:])
        if keyword in codes.cid7159.dir():
            return abnormal, getattr(codes.cid7159, keyword)
        if keyword in codes.cid7151.dir():
            code = getattr(codes.cid7151, keyword)
            if keyword in codes.cid7166.dir():
                return codes.cid7150.Tissue, code
            return codes.cid7150.AnatomicalStructure, code
        if keyword in _ABNORMAL_SCT:
            return abnormal, getattr(codes.SCT, keyword)
    return codes.cid7150.Tissue, codes.SCT.Tissue


def package_version() -> str:
    """The ibisagent version written as the algorithm version and software version."""
    from ibisagent import __version__

    return __version__


def save_dicom_seg(
    mask: np.ndarray,
    source: str | os.PathLike[str] | Image,
    path: str | os.PathLike[str],
    label_names: Sequence[str],
    slice: int | None = None,  # noqa: A002 - the mask writers' name for it
    provenance: Provenance | None = None,
) -> Path:
    """Write a binary DICOM Segmentation (one segment per label) referencing the source DICOM images.

    Args:
        mask: in the geometry of ``load_image(source).array``: ``(Z, Y, X)`` for a series, ``(H, W)`` for a
            single-frame file, or ``(Y, X)`` of axial slice ``slice`` of a series. A bool array is one segment; an
            integer array is a label map whose value ``i`` (1..len(label_names)) is segment ``label_names[i-1]``.
        source: the DICOM series folder or file the mask was drawn on, or that image already loaded.
        path: output ``.dcm`` file (written atomically).
        label_names: one name per segment (coded by :func:`segment_codes`).
        slice: axial slice index when ``mask`` is 2D and the source is a volume.
        provenance: how the mask was made (default: the agent alone, policy and tool unknown).

    Returns:
        ``path``.

    Raises:
        ImageError: a non-DICOM source, or a mask that does not fit it.
    """
    image = source if isinstance(source, Image) else load_image(source)
    if not image.dicom_files:
        raise ImageError(f"{image.source}: DICOM-SEG needs a DICOM source, got a non-DICOM image")
    provenance = provenance or Provenance()
    labels = _label_map(np.asarray(mask), image, slice, len(label_names))
    if image.is_volume:
        frames = image.geometry.to_source(labels).transpose(2, 1, 0)  # (stored k, rows, cols) = file order
    else:
        frames = labels[None]
    sources = [_read_dataset(Path(f)) for f in image.dicom_files]
    if len(sources) == 1 and frames.shape[0] == 1:
        frames = frames[0]
    pixel_array = frames.astype(bool) if len(label_names) == 1 else frames.astype(np.uint16)
    version = package_version()
    parameters = {k: v for k, v in (("policy", provenance.policy), ("tool", provenance.tool)) if v}
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=version, family=codes.cid7162.ArtificialIntelligence,
        parameters=parameters or None,
    )
    descriptions = []
    for i, name in enumerate(label_names, start=1):
        category, kind = segment_codes(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=name[:LO_MAX],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=provenance.algorithm_type,
            algorithm_identification=algorithm,
        ))
    creator = None
    if provenance.client_id:
        # one component (the client id) with the trailing caret DICOM asks of single-component names
        creator = pydicom.valuerep.PersonName(provenance.client_id.replace("^", " ")[:LO_MAX - 1] + "^")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=ALGORITHM_NAME,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=version,
        device_serial_number="0",
        series_description=provenance.series_description(version),
        content_description=provenance.content_description(),
        content_creator_name=creator,
        content_label="CORRECTION" if provenance.client_id or provenance.time else "IBISAGENT",
        omit_empty_frames=bool(np.any(pixel_array)),
    )
    if provenance.time is not None:
        seg.ContentDate = provenance.time.strftime("%Y%m%d")
        seg.ContentTime = provenance.time.strftime("%H%M%S")
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return Path(path)


def _label_map(mask: np.ndarray, image: Image, slice: int | None, n_labels: int) -> np.ndarray:  # noqa: A002
    """Validate ``mask`` against ``image`` and return a full-size uint16 label map in canonical orientation."""
    if n_labels < 1:
        raise ValueError("label_names must name at least one segment")
    if mask.dtype == bool:
        values = mask.astype(np.uint16)
    elif mask.dtype.kind in "iu":
        values = mask.astype(np.int64)
        if values.min() < 0 or values.max() > n_labels:
            raise ImageError(f"{image.source}: label map values must lie in 0..{n_labels} "
                             f"(one per label name), got {values.min()}..{values.max()}")
        values = values.astype(np.uint16)
    else:
        raise ImageError(f"{image.source}: mask must be bool or an integer label map, got dtype {mask.dtype}")
    target_shape = image.array.shape if image.is_volume else image.array.shape[:2]
    if image.is_volume and values.ndim == 2:
        if slice is None:
            raise ImageError(f"{image.source}: a 2D mask for a volume needs the slice index")
        if not 0 <= slice < target_shape[0]:
            raise ImageError(f"{image.source}: slice {slice} out of range 0..{target_shape[0] - 1}")
        full = np.zeros(target_shape, dtype=np.uint16)
        full[slice] = _check_shape(values, target_shape[1:], image)
        return full
    return _check_shape(values, target_shape, image)


def _check_shape(values: np.ndarray, shape: tuple[int, ...], image: Image) -> np.ndarray:
    if tuple(values.shape) != tuple(shape):
        raise ImageError(f"{image.source}: mask shape {tuple(values.shape)} does not match image shape {tuple(shape)}")
    return values
