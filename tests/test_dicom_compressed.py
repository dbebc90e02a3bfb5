"""Compressed DICOM: every transfer syntax pydicom's plug-ins or GDCM decode loads, single file or series, equal to
its uncompressed copy; what nothing here decodes names itself and what to install.

The files are pydicom's own test files and those of the ``pydicom-data`` package (its ``data_store`` module), read
straight from the installed packages: ``pydicom.data.get_testdata_file`` is not used, since for files it does not hold
it would try to download (and in pydicom 2.4 it needs ``pkg_resources``).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import UID, generate_uid

from ibisagent.imaging import ImageError, load_image

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
_STORE = importlib.util.find_spec("data_store")  # the pydicom-data package (dev extra)
PYDICOM_DATA = Path(_STORE.origin).parent / "data" if _STORE and _STORE.origin else None


def dicom_testfile(name: str) -> Path:
    """An installed pydicom / pydicom-data test file (skips when the dev extra's pydicom-data is missing)."""
    for folder in (PYDICOM_FILES, PYDICOM_DATA):
        if folder is not None and (folder / name).is_file():
            return folder / name
    pytest.skip(f"{name}: not in pydicom's test files nor in pydicom-data (install the dev extra)")


# (compressed, uncompressed reference): lossless pairs must be equal; the J2KI references are the lossy images
# decompressed, so they are equal too
GREY_PAIRS = [
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless (the field case)
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
    ("693_J2KR.dcm", "693_UNCR.dcm"),  # CT, JPEG 2000 lossless
    ("693_J2KI.dcm", "693_UNCI.dcm"),  # CT, JPEG 2000 lossy
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
    ("MR2_J2KI.dcm", "MR2_UNCI.dcm"),
    ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),  # MONOCHROME1 radiograph
    ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),  # multi-frame volumes
    ("emri_small_RLE.dcm", "emri_small.dcm"),
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ("rtdose_rle_1frame.dcm", "rtdose_1frame.dcm"),
]

# colour: (compressed, reference, tolerance in mean grey levels: 0 for lossless, a few for lossy JPEG)
COLOUR_PAIRS = [
    ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_dcmtk_ebcr_dcmd.dcm", 0.0),  # JPEG Baseline, RGB (Adobe: no transform)
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_ebcyn1_dcmd.dcm", 0.0),  # YBR_FULL
    ("SC_rgb_dcmtk_+eb+cy+n2.dcm", "SC_rgb_dcmtk_ebcyn2_dcmd.dcm", 0.0),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_dcmtk_ebcynp_dcmd.dcm", 0.0),  # YBR_FULL_422
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_dcmtk_ebcys2_dcmd.dcm", 0.0),
    ("SC_rgb_dcmtk_+eb+cy+s4.dcm", "SC_rgb_dcmtk_ebcys4_dcmd.dcm", 0.0),
    ("SC_rgb_jpeg.dcm", "SC_rgb_jpeg_dcmd.dcm", 0.0),  # labelled RGB, stream without transform (the Pillow>=10.1 case)
    ("SC_rgb_jpeg_lossy_gdcm.dcm", "SC_rgb.dcm", 3.0),  # labelled RGB, stream in YCbCr (component ids 1, 2, 3)
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", 3.0),
    ("SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm", 3.0),
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", 0.0),  # JPEG lossless colour
    ("SC_rgb_rle.dcm", "SC_rgb.dcm", 0.0),
    ("SC_rgb_rle_16bit.dcm", "SC_rgb_16bit.dcm", 0.0),  # 16-bit colour samples shown as 8-bit
    ("SC_rgb_gdcm_KY.dcm", "SC_rgb_gdcm2k_uncompressed.dcm", 0.0),  # JPEG 2000 RGB
    ("US1_J2KR.dcm", "US1_UNCR.dcm", 0.0),  # JPEG 2000 lossless, YBR_RCT
    ("US1_J2KI.dcm", "US1_UNCI.dcm", 0.0),  # JPEG 2000, YBR_ICT
    ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm", 0.0),  # RLE palette colour
]


@pytest.mark.parametrize(("compressed", "reference"), GREY_PAIRS)
def test_grey_compressed_files_equal_their_uncompressed_copy(compressed: str, reference: str) -> None:
    got, want = load_image(dicom_testfile(compressed)), load_image(dicom_testfile(reference))
    assert got.is_volume == want.is_volume and got.modality == want.modality
    assert got.array.shape == want.array.shape
    assert np.array_equal(got.array.astype(np.float64), want.array.astype(np.float64))


def test_jpeg_extended_12_bit_decodes_alike_through_pylibjpeg_and_gdcm() -> None:
    """JPEG-lossy.dcm defeats pydicom's plug-ins and is decoded by GDCM; JPGExtended.dcm, the same lossy image, by
    pylibjpeg. Lossy decoders may round one grey level apart (of 264)."""
    a, b = load_image(dicom_testfile("JPGExtended.dcm")).array, load_image(dicom_testfile("JPEG-lossy.dcm")).array
    assert a.shape == b.shape == (1024, 256)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1 and np.abs(a.astype(int) - b.astype(int)).mean() < 0.05


def test_rgb_jpeg_without_transform_markers_follows_the_dicom_label() -> None:
    """RGB pictures stored without colour transform: one with an Adobe marker saying so, one with no marker at all
    (only PhotometricInterpretation RGB says it); both load as GDCM reads them."""
    import SimpleITK as sitk

    for name in ("SC_jpeg_no_color_transform.dcm", "SC_jpeg_no_color_transform_2.dcm"):
        path = dicom_testfile(name)
        assert np.array_equal(load_image(path).array, sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0]), name


def _as_rgb(path: Path) -> np.ndarray:
    """Reference pixels as RGB, converted by pydicom from their stored colour space (uncompressed files)."""
    from pydicom.pixel_data_handlers.util import apply_color_lut, convert_color_space

    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array
    photometric = str(ds.PhotometricInterpretation)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif photometric != "RGB":
        arr = convert_color_space(arr, photometric, "RGB")
    if arr.dtype != np.uint8:
        arr = arr >> (arr.dtype.itemsize * 8 - 8 if photometric == "PALETTE COLOR" else int(ds.BitsStored) - 8)
    return arr.astype(np.uint8)


@pytest.mark.parametrize(("compressed", "reference", "tolerance"), COLOUR_PAIRS)
def test_colour_files_load_in_rgb_whatever_their_photometric_label(compressed: str, reference: str,
                                                                   tolerance: float) -> None:
    got = load_image(dicom_testfile(compressed))
    want = _as_rgb(dicom_testfile(reference))
    assert got.array.dtype == np.uint8 and got.array.shape == want.shape and got.modality
    error = float(np.abs(got.array.astype(int) - want.astype(int)).mean())
    assert error <= tolerance, f"{compressed}: mean error {error:.2f} grey levels vs {reference}"


def test_pydicom_2_pillow_handler_is_not_what_decides_rgb_jpeg() -> None:
    """pydicom 2.4's Pillow handler sets ``Image.mode``, which Pillow >= 10.1 forbids; pydicom then falls back to
    pylibjpeg, which colour-transforms this RGB file wrongly. The loader must not depend on that pair."""
    import PIL

    path = dicom_testfile("SC_rgb_jpeg.dcm")
    want = _as_rgb(dicom_testfile("SC_rgb_jpeg_dcmd.dcm"))
    fallback = pydicom.dcmread(str(path)).pixel_array
    if tuple(int(v) for v in PIL.__version__.split(".")[:2]) >= (10, 1):
        assert np.abs(fallback.astype(int) - want.astype(int)).mean() > 10  # the broken pair, as installed
    assert np.array_equal(load_image(path).array, want)


def _series_of(source: Path, folder: Path, n: int = 3) -> Path:
    """``n`` copies of one single-frame file as a series (new instance UIDs, stepped positions), same compression."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for k in range(n):
        ds = pydicom.dcmread(str(source))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.InstanceNumber = series, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.save_as(str(folder / f"s{k}.dcm"))
    return folder


# a series is decoded by GDCM, a single file by pydicom's plug-ins: lossless syntaxes must agree exactly, lossy ones
# to one grey level (decoders round differently)
SERIES_FILES = ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "693_J2KR.dcm",
                "693_J2KI.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"]
LOSSY = {"693_J2KI.dcm", "JPEG2000.dcm", "JPGExtended.dcm"}


@pytest.mark.parametrize("name", SERIES_FILES)
def test_a_compressed_series_loads_like_its_single_files(name: str, tmp_path: Path) -> None:
    single = load_image(dicom_testfile(name))
    volume = load_image(_series_of(dicom_testfile(name), tmp_path / "series"))
    assert volume.is_volume and volume.array.shape == (3, *single.array.shape)
    for k in range(3):
        difference = np.abs(volume.array[k].astype(np.float64) - single.array.astype(np.float64))
        assert difference.max() <= (1 if name in LOSSY else 0)


def test_field_case_jpeg_ls_file_folder_and_series_equal_the_uncompressed_file(tmp_path: Path) -> None:
    """../shared/field-cases/compressed-dicom: JPEG-LS lossless MR as a file, a one-file folder and a series."""
    compressed, plain = dicom_testfile("MR_small_jpeg_ls_lossless.dcm"), dicom_testfile("MR_small.dcm")
    want = load_image(plain).array
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(compressed, one / compressed.name)
    for given in (compressed, one):
        assert np.array_equal(load_image(given).array, want)
    series = load_image(_series_of(compressed, tmp_path / "three"))
    assert all(np.array_equal(series.array[k], want) for k in range(3))


def _with_syntax(tmp_path: Path, syntax: str) -> Path:
    """MR_small with encapsulated junk under ``syntax`` (written as MPEG2, then the UID patched in the file: pydicom
    2.4 does not write syntaxes it does not know, such as JPEG XL and HTJ2K)."""
    ds = pydicom.dcmread(str(dicom_testfile("MR_small.dcm")))
    known = "1.2.840.10008.1.2.4.100"
    ds.file_meta.TransferSyntaxUID = UID(known if len(syntax) == len(known) else syntax)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].is_undefined_length = True
    ds.is_implicit_VR, ds.is_little_endian = False, True
    path = tmp_path / f"{syntax}.dcm"
    ds.save_as(str(path))
    path.write_bytes(path.read_bytes().replace(known.encode(), syntax.encode(), 1))
    return path


@pytest.mark.parametrize(("syntax", "named", "advice"), [
    ("1.2.840.10008.1.2.4.100", "MPEG2", "video"),
    ("1.2.840.10008.1.2.4.102", "MPEG-4", "video"),
    ("1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.110", "JPEG XL"),
    ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.201", "HTJ2K"),
])
def test_a_syntax_nothing_here_decodes_names_itself_and_what_to_install(tmp_path: Path, syntax: str, named: str,
                                                                         advice: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(_with_syntax(tmp_path, syntax))
    message = str(info.value)
    assert named in message and advice in message and syntax in message
    assert "corrupt" not in message


def test_damaged_pixel_data_names_the_syntax_and_each_decoders_complaint(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        load_image(_with_syntax(tmp_path, "1.2.840.10008.1.2.4.80"))  # JPEG-LS, junk bytes
    message = str(info.value)
    assert "JPEG-LS Lossless" in message and "pydicom:" in message and "GDCM:" in message


def _all_compressed_files() -> list[Path]:
    files = sorted(PYDICOM_FILES.glob("*.dcm")) + (sorted(PYDICOM_DATA.glob("*.dcm")) if PYDICOM_DATA else [])
    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), defer_size=1024)
            if ds.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in ds:
                out.append(f)
        except Exception:  # noqa: BLE001 - pydicom's deliberately broken files
            continue
    return out


# what is refused, on purpose, with its reason (the rest of the installed compressed files must load)
KNOWN_REFUSALS = {
    "color3d_jpeg_baseline.dcm": "colour multi-frame",
    "SC_rgb_rle_2frame.dcm": "colour multi-frame",
    "SC_rgb_rle_16bit_2frame.dcm": "colour multi-frame",
    "SC_rgb_rle_32bit_2frame.dcm": "colour multi-frame",
    "OBXXXX1A_rle_2frame.dcm": "colour pixels",
    # pydicom 2.4 stops at the delimiter inside the J2K stream and GDCM rejects the file; both say so
    "JPEG2000-embedded-sequence-delimiter.dcm": "could not decode the JPEG 2000",
}


def test_every_installed_compressed_file_loads_or_is_refused_for_a_stated_reason() -> None:
    files = _all_compressed_files()
    assert len(files) >= 40  # pydicom's test files plus pydicom-data
    loaded = 0
    for f in files:
        try:
            image = load_image(f)
        except ImageError as exc:
            assert f.name in KNOWN_REFUSALS, f"{f.name}: {exc}"
            assert KNOWN_REFUSALS[f.name] in str(exc) and "corrupt" not in str(exc)
            continue
        assert image.array.size > 0
        loaded += 1
    assert loaded >= len(files) - len(KNOWN_REFUSALS)


def test_a_series_in_a_syntax_nothing_here_decodes_says_what_to_do(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    source = _with_syntax(tmp_path, "1.2.840.10008.1.2.4.100")
    for k in range(3):
        ds = pydicom.dcmread(str(source))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient, ds.InstanceNumber = [0.0, 0.0, 2.0 * k], k + 1
        ds.save_as(str(folder / f"s{k}.dcm"))
    with pytest.raises(ImageError, match="MPEG2.*video"):
        load_image(folder)
