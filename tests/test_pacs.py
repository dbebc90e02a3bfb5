"""The PACS path as OHIF users run it, for real: Orthanc with its DICOMweb plugin, the app on MONAI Label's DICOMweb
datastore (configured by the app, not forked), the MONAI Label client.

A private Orthanc (temporary storage, free loopback port, no DICOM listener, no remote access, no authentication) is
started from the Debian packages ``orthanc`` and ``orthanc-dicomweb`` (``scripts/install_system_deps.sh``); the sample
CT series and an MR series made from it are stored in it through Orthanc's REST API; the app is started with
``--studies <orthanc>/dicom-web`` and nothing else: no dcmqi, no stub, and every proxy pointing at a dead port so that
any download from the internet fails (offline). MONAI Label lists the series of both modalities by
SeriesInstanceUID, downloads them over WADO-RS and converts them to ``.nii.gz`` before the app sees them; a saved
``final`` label goes back to the PACS as the app's own DICOM-SEG (highdicom, with provenance), read back here over
WADO-RS. Skipped only when the ``Orthanc`` binary is not installed.

The app runs from a copy of ``apps/ibisagent`` in a temporary folder only because, with a DICOMweb source, it keeps its
agent outputs under ``<app>/model``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from monailabel.client import MONAILabelClient

from ibisagent import __version__
from ibisagent.metrics import iou
from processes import free_port, stop_group, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_data" / "synthetic"
SERIES_DIR = SAMPLES / "ct_series"
SPLEEN = SAMPLES / "ct_series_spleen.nii.gz"
ORTHANC_READY_S = 30
SERVER_READY_S = 90

ORTHANC = shutil.which("Orthanc")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (run scripts/install_system_deps.sh: "
                                               "Debian packages orthanc and orthanc-dicomweb)"),
]


def _dicomweb_plugin() -> str:
    """The DICOMweb plugin's shared library, as the package installed it."""
    candidates: list[str] = []
    try:
        listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=30)
        candidates = [line for line in listing.stdout.splitlines() if "DicomWeb" in line and ".so" in line]
    except (OSError, subprocess.SubprocessError):
        pass
    candidates += ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
    for path in sorted(candidates, key=len):  # the unversioned name first
        if os.path.isfile(path):
            return path
    pytest.fail("Orthanc is installed but its DICOMweb plugin is not: apt-get install orthanc-dicomweb "
                "(scripts/install_system_deps.sh)")


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _mr_series(folder: Path) -> list[Path]:
    """The sample CT series re-labelled as an MR series of a new study (MR Image Storage, Modality MR, new UIDs,
    no CT rescale), written into ``folder``."""
    study, series, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    out = []
    for f in sorted(SERIES_DIR.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.SeriesDescription, ds.PatientID = "MR", "T1 (test)", "MR-TEST"
        ds.MagneticFieldStrength, ds.ScanningSequence, ds.SequenceVariant = 1.5, "SE", "NONE"
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType", "KVP"):
            if keyword in ds:
                delattr(ds, keyword)
        path = folder / f.name
        ds.save_as(path)
        out.append(path)
    return out


class Pacs:
    def __init__(self, url: str, series_uid: str, mr_series_uid: str) -> None:
        self.url, self.series_uid, self.mr_series_uid = url, series_uid, mr_series_uid

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    base = tmp_path_factory.mktemp("orthanc")
    storage = base / "db"
    storage.mkdir()
    port = free_port()
    config = {
        "Name": "ibisagent-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        "DicomServerEnabled": False,  # no DICOM listener: only the REST/DICOMweb port is opened
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,  # Orthanc 1.10 cannot bind one address; this refuses non-loopback clients
        "AuthenticationEnabled": False,
        "Plugins": [_dicomweb_plugin()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SaveJobs": False,
        "HttpThreadsCount": 8,
    }
    (base / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = base / "orthanc.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ORTHANC, "--no-jobs", str(base / "orthanc.json")], stdout=out,
                                stderr=subprocess.STDOUT, cwd=base, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/system", proc, log, ORTHANC_READY_S)
        plugins = requests.get(f"{url}/plugins", timeout=10).json()
        assert "dicom-web" in plugins, f"DICOMweb plugin not loaded: {plugins}\n{_tail(log)}"
        uids = []
        mr_dir = base / "mr"
        mr_dir.mkdir()
        for files in (sorted(SERIES_DIR.glob("*.dcm")), _mr_series(mr_dir)):
            assert files, f"no DICOM files in {SERIES_DIR}"
            series = set()
            for f in files:
                r = requests.post(f"{url}/instances", data=f.read_bytes(),
                                  headers={"Content-Type": "application/dicom"}, timeout=30)
                assert r.status_code == 200, f"storing {f.name}: {r.status_code} {r.text}"
                series.add(r.json()["ParentSeries"])
            assert len(series) == 1, series
            info = requests.get(f"{url}/series/{series.pop()}", timeout=10).json()
            assert len(info["Instances"]) == len(files)
            uids.append(info["MainDicomTags"]["SeriesInstanceUID"])
        yield Pacs(url, *uids)
    finally:
        stop_group(proc)


class Server:
    def __init__(self, url: str, app_dir: Path, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.app_dir, self.proc, self.log = url, app_dir, proc, log

    def client(self, tmp: Path) -> MONAILabelClient:
        return MONAILabelClient(self.url, tmpdir=str(tmp), client_id="pytest")


@pytest.fixture(scope="module")
def server(pacs: Pacs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("app_dicomweb")
    app_dir = base / "ibisagent"
    shutil.copytree(ROOT / "apps" / "ibisagent", app_dir,
                    ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"  # offline: any download from the internet fails at once
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "MONAILABEL_PYEXE": sys.executable,
           "MONAI_LABEL_INFER_CONCURRENCY": "2", "OMP_NUM_THREADS": "1",  # robust on small shared CI machines
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(base / "dicom_cache"),
           "MONAI_LABEL_DICOMWEB_READ_TIMEOUT": "30",
           "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not (Path(p) / "itkimage2segimage").exists())  # no dcmqi on the PATH either
    for key in [k for k in env if k.startswith(("MONAI_LABEL_DICOMWEB_USERNAME", "MONAI_LABEL_DICOMWEB_PASSWORD"))]:
        del env[key]  # Orthanc runs without authentication
    log = base / "server.log"
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir),
           "--studies", pacs.dicomweb, "--host", "127.0.0.1", "--port", str(port),
           "--conf", "policy", "tiny", "--conf", "tool", "embedded", "--conf", "max_steps", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=base,
                                start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", app_dir, proc, log)
    try:
        wait_ready(f"{srv.url}/info/", proc, log, SERVER_READY_S)
        yield srv
    finally:
        stop_group(proc)


def _series_shape() -> tuple[int, ...]:
    """The series' voxel grid (i, j, k) as a NIfTI written from it stores it."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(SERIES_DIR)))
    return tuple(int(s) for s in reader.Execute().GetSize())


def _mask(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).get_fdata()) > 0


def test_orthanc_serves_the_series_over_dicomweb(pacs: Pacs) -> None:
    r = requests.get(f"{pacs.dicomweb}/series", params={"Modality": "CT"}, timeout=10)
    assert r.status_code == 200, r.text
    uids = [s["0020000E"]["Value"][0] for s in r.json()]
    assert uids == [pacs.series_uid]


def test_the_app_started_offline_without_dcmqi(server: Server) -> None:
    bin_dir = server.app_dir / "bin"  # MONAI Label creates it; its dcmqi download would fill it
    assert not bin_dir.exists() or not any(bin_dir.iterdir())
    assert "listing modalities CT,MR" in server.log.read_text(errors="replace")


def test_the_app_lists_ct_and_mr_series_by_their_uids(server: Server, pacs: Pacs, tmp_path: Path) -> None:
    stats = requests.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=30).json()
    assert stats["total"] == 2, stats
    # MONAI Label's random strategy weighs images by the seconds since each was last handed out: the second call,
    # a second later, hands out the other series
    first = server.client(tmp_path).next_sample("random", {})["id"]
    time.sleep(1.5)
    second = server.client(tmp_path).next_sample("random", {})["id"]
    assert {first, second} == {pacs.series_uid, pacs.mr_series_uid}, (first, second)


def test_clicks_infer_on_the_pacs_series(server: Server, pacs: Pacs, tmp_path: Path) -> None:
    spleen = _mask(str(SPLEEN))  # (i, j, k) in the series geometry
    assert spleen.shape == _series_shape()
    k = int(np.argmax(spleen.sum(axis=(0, 1))))
    ii, jj = np.nonzero(spleen[:, :, k])
    click = [int(np.median(ii)), int(np.median(jj)), k]
    assert spleen[tuple(click)]
    label, result = server.client(tmp_path).infer("ibisagent_clicks", pacs.series_uid, {"foreground": [click]})
    mask = _mask(label)
    assert mask.shape == spleen.shape, (mask.shape, result)
    assert mask[tuple(click)] and mask[:, :, k].sum() == mask.sum()
    assert iou(mask[:, :, k], spleen[:, :, k]) > 0.5, result
    # MONAI Label downloaded the series and converted it (cached as <uid>.nii.gz)
    cached = list((server.app_dir.parent / "dicom_cache").rglob(f"{pacs.series_uid}.nii.gz"))
    assert cached and tuple(nib.load(str(cached[0])).shape) == spleen.shape


def test_agent_infer_with_an_instruction_on_the_pacs_series(server: Server, pacs: Pacs, tmp_path: Path) -> None:
    label, result = server.client(tmp_path).infer(
        "ibisagent", pacs.series_uid, {"instruction": "Segment the spleen.", "max_steps": 2})
    assert tuple(nib.load(label).shape) == _series_shape()
    assert result["label_names"] == {"spleen": 1}
    assert result["stop_reason"] and result["steps"] and "answer" in result
    assert result.get("stored_for_corrections") is True
    outputs = server.app_dir / "model" / "ibisagent" / "agent_outputs"
    assert (outputs / f"{pacs.series_uid}.json").exists(), sorted(p.name for p in outputs.parent.rglob("*"))


def test_an_mr_series_infers_and_its_saved_label_comes_back_from_the_pacs_as_dicom_seg(
        server: Server, pacs: Pacs, tmp_path: Path) -> None:
    client = server.client(tmp_path)
    uid = pacs.mr_series_uid
    _, result = client.infer("ibisagent", uid, {"instruction": "Segment the spleen.", "max_steps": 1})
    assert result["label_names"] == {"spleen": 1} and result.get("stored_for_corrections") is True
    # the radiologist corrects with clicks and saves the final label
    spleen = _mask(str(SPLEEN))
    k = int(np.argmax(spleen.sum(axis=(0, 1))))
    ii, jj = np.nonzero(spleen[:, :, k])
    label, _ = client.infer("ibisagent_clicks", uid, {"foreground": [[int(np.median(ii)), int(np.median(jj)), k]]})
    saved = client.save_label(uid, label, tag="final")
    assert saved["corrections_added"] == 1, saved

    # the label is in the PACS as a DICOM-SEG of the MR series
    web = DICOMwebClient(pacs.dicomweb)
    segs = [s for s in web.search_for_series(search_filters={"Modality": "SEG"})
            if pydicom.Dataset.from_json(s).StudyInstanceUID == _study_of(web, uid)]
    assert len(segs) == 1, segs
    ref = pydicom.Dataset.from_json(segs[0])
    instances = web.retrieve_series(ref.StudyInstanceUID, ref.SeriesInstanceUID)
    seg = hd.seg.Segmentation.from_dataset(instances[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    # on the source geometry: the frames are the saved label's, per source instance
    sources = web.retrieve_series(ref.StudyInstanceUID, uid)
    reference = sitk.ReadImage(label)
    volume = sitk.GetArrayFromImage(reference).astype(bool)  # (k, j, i)
    for ds in sources:
        kk = reference.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])[2]
        pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1])[0, ..., 0]
        assert np.array_equal(pixels.astype(bool), volume[kk]), ds.InstanceNumber
    # with provenance: a person shaped it, ibisagent and its version, policy and tool, who and when
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "spleen" and segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"  # SNOMED CT: Spleen
    algorithm = seg.get_segment_description(1).algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("ibisagent", __version__)
    assert "policy=tiny" in algorithm.AlgorithmParameters and "tool=embedded" in algorithm.AlgorithmParameters
    assert seg.SeriesDescription == f"ibisagent {__version__} policy=tiny tool=embedded"
    assert seg.ContentCreatorName.family_name == "pytest" and seg.ContentDescription.startswith("correction by pytest")
    # MONAI Label sees the series as labelled
    stats = requests.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=30).json()
    assert stats["total"] == 2, stats  # the SEG series is not listed as an image


def _study_of(web: DICOMwebClient, series_uid: str) -> str:
    found = web.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
    return str(pydicom.Dataset.from_json(found[0]).StudyInstanceUID)
