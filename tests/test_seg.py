"""DICOM-SEG with provenance: ``segment --out mask.dcm`` on a DICOM series, read back with highdicom on the source
geometry; how each segment was made, by which algorithm, version, policy and tool; coded segmented properties; the
record of a correction (who, when).

The policy is a real OpenAI-compatible HTTP server (:mod:`chat_server`) answering scripted turns: it clicks the
spleen on the key slice, terminates, and answers "not present" on the neighbouring slices.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from chat_server import ChatServer
from ibisagent import __version__
from ibisagent.cli import main
from ibisagent.imaging import ImageError, Provenance, load_image, load_mask, save_dicom_seg, segment_codes
from ibisagent.protocol import to_relative

ROOT = Path(__file__).resolve().parents[1]
SERIES = ROOT / "sample_data" / "synthetic" / "ct_series"
SPLEEN = ROOT / "sample_data" / "synthetic" / "ct_series_spleen.nii.gz"
ABSENT = ("<think>\nNo spleen on this slice.\n</think>\n<action>\nTerminate\n</action>\n"
          "<answer>\nnot present\n</answer>")


def _turns(key: int) -> list[str]:
    image = load_image(SERIES)
    spleen = load_mask(SPLEEN, image)[key]
    ys, xs = np.nonzero(spleen)
    i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))  # the spleen pixel nearest its centre
    x, y = to_relative(int(xs[i]), int(ys[i]), spleen.shape[1], spleen.shape[0])
    click = (f"<think>\nThe spleen is the bright organ here.\n</think>\n"
             f"<action>\nPositive Point ({x:.4f}, {y:.4f})\n</action>")
    done = ("<think>\nThe mask covers the spleen.\n</think>\n<action>\nTerminate\n</action>\n"
            "<answer>\nThe spleen is segmented.\n</answer>")
    return [click, done, ABSENT]


@pytest.fixture(scope="module")
def key() -> int:
    image = load_image(SERIES)
    return int(np.argmax(load_mask(SPLEEN, image).sum(axis=(1, 2))))


def _segment(out: Path, key: int) -> tuple[int, str]:
    with ChatServer("plain", turns=_turns(key)) as server:
        spec = f"openai:{server.url}#scripted"
        code = main(["segment", str(SERIES), "--prompt", "Segment the spleen.", "--policy", spec, "--slice", str(key),
                     "--out", str(out)])  # no --trace: it is optional
    return code, spec


def test_segment_writes_dicom_seg_on_the_source_geometry_with_provenance(tmp_path: Path, key: int) -> None:
    dcm, nii = tmp_path / "mask.dcm", tmp_path / "mask.nii.gz"
    code, spec = _segment(dcm, key)
    assert code == 0
    assert _segment(nii, key)[0] == 0  # the same run written as NIfTI, for an independent geometry check
    seg = hd.seg.segread(str(dcm))

    # the referenced series and instances are the source's
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(SERIES.glob("*.dcm"))]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    # every frame lies where the NIfTI says the mask is, found through patient coordinates (not array order)
    reference = sitk.ReadImage(str(nii))
    volume = sitk.GetArrayFromImage(reference).astype(bool)  # (k, j, i)
    frames = 0
    for ds in sources:
        k = reference.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])[2]
        pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
        assert np.array_equal(pixels.astype(bool), volume[k]), ds.InstanceNumber
        frames += bool(volume[k].any())
    assert frames >= 1 and seg.NumberOfFrames == frames
    spleen = load_mask(SPLEEN, load_image(SERIES))[key]
    drawn = load_mask(nii, load_image(SERIES))[key]
    assert (drawn & spleen).sum() / (drawn | spleen).sum() > 0.5

    # provenance: the agent alone, ibisagent and its version, the policy and tool specs
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "spleen"  # named from the prompt
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == "ibisagent"
    description = seg.get_segment_description(1)
    algorithm = description.algorithm_identification
    assert algorithm[0].AlgorithmName == "ibisagent" and algorithm[0].AlgorithmVersion == __version__
    assert algorithm[0].AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert f"policy={spec}" in algorithm[0].AlgorithmParameters and "tool=embedded" in algorithm[0].AlgorithmParameters
    assert seg.SeriesDescription == f"ibisagent {__version__} policy=openai:scripted tool=embedded"
    assert seg.SoftwareVersions == __version__ and seg.Manufacturer == "ibisagent"
    # the segmented property: SNOMED CT's Spleen, an anatomical structure
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == ("78961009", "SCT", "Spleen")
    assert (category.CodeValue, category.CodeMeaning) == ("123037004", "Anatomical Structure")
    assert "ContentCreatorName" not in seg or not seg.ContentCreatorName


def test_a_correction_is_semiautomatic_and_says_who_and_when(tmp_path: Path) -> None:
    image = load_image(SERIES)
    mask = np.zeros(image.array.shape, bool)
    mask[5, 20:40, 20:50] = True
    when = dt.datetime(2026, 11, 30, 14, 5, 9, tzinfo=dt.timezone.utc)
    provenance = Provenance(policy="hf:/models/IBISAgent-7B", tool="medsam2:/models/ckpt/MedSAM2.pt",
                            person=True, client_id="user-xyz", time=when)
    seg = hd.seg.segread(str(save_dicom_seg(mask, image, tmp_path / "c.dcm", ["left kidney"], provenance=provenance)))
    segment = seg.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert segment.SegmentLabel == "left kidney"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Kidney"
    assert seg.ContentCreatorName.family_name == "user-xyz"  # the MONAI Label client id
    assert (seg.ContentDate, seg.ContentTime) == ("20261130", "140509")
    assert seg.ContentDescription == "correction by user-xyz at 2026-11-30T14:05:09+00:00"
    assert seg.ContentLabel == "CORRECTION"
    # long specs: the series description keeps file names within DICOM's 64 characters, the parameters keep all
    assert seg.SeriesDescription == f"ibisagent {__version__} policy=hf:IBISAgent-7B tool=medsam2:MedSAM2.pt"
    assert len(seg.SeriesDescription) <= 64
    params = seg.get_segment_description(1).algorithm_identification[0].AlgorithmParameters
    assert "policy=hf:/models/IBISAgent-7B" in params and "tool=medsam2:/models/ckpt/MedSAM2.pt" in params


@pytest.mark.parametrize(("name", "category", "kind"), [
    ("liver", "Anatomical Structure", ("10200004", "Liver")),
    ("Left kidney", "Anatomical Structure", ("64033007", "Kidney")),
    ("brain", "Anatomical Structure", ("12738006", "Brain")),
    ("white matter", "Anatomical Structure", ("389080008", "White Matter")),
    ("grey matter", "Anatomical Structure", ("389081007", "Gray Matter")),
    ("pancreatic tumour", "Morphologically Abnormal Structure", ("108369006", "Neoplasm")),
    ("lung nodules", "Morphologically Abnormal Structure", ("27925004", "Nodule")),
    ("liver lesion", "Morphologically Abnormal Structure", ("52988006", "Lesion")),
    ("muscle", "Tissue", ("71616004", "Muscle")),
    ("the thing on the left", "Tissue", ("85756007", "Tissue")),
])
def test_segmented_property_codes(name: str, category: str, kind: tuple[str, str]) -> None:
    got_category, got_kind = segment_codes(name)
    assert got_category.meaning == category
    assert (got_kind.value, got_kind.meaning, got_kind.scheme_designator) == (*kind, "SCT")


def test_dicom_seg_out_is_refused_for_a_non_dicom_source_before_running(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["segment", str(ROOT / "sample_data" / "synthetic" / "ct_volume.nii.gz"), "--prompt", "x",
                 "--policy", "hf:/nowhere", "--out", str(tmp_path / "m.dcm")])
    assert code == 2 and ".dcm" in capsys.readouterr().err
    with pytest.raises(ImageError, match="DICOM"):
        save_dicom_seg(np.zeros((4, 4), bool), load_image(ROOT / "sample_data" / "synthetic" / "ct_liver.png"),
                       tmp_path / "x.dcm", ["liver"])
