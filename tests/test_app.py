"""The MONAI Label app end to end: a real server on a loopback port, driven by MONAI Label's own client.

The policy is the offline tiny model (untrained), so these tests check structure — files, shapes, JSON fields, the
correction loop, error statuses, concurrency — not segmentation quality (except for the tool-only clicks task).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from ibisagent.corrections import CorrectionStore
from ibisagent.imaging import load_image
from ibisagent.metrics import iou
from processes import free_port, stop_group

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_data" / "synthetic"
READY_TIMEOUT_S = 90


class Server:
    def __init__(self, url: str, studies: Path, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.studies, self.proc, self.log = url, studies, proc, log

    def client(self, tmp: Path) -> MONAILabelClient:
        return MONAILabelClient(self.url, tmpdir=str(tmp), client_id="pytest")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


TILT_DEG = 20.0


def _write_tilted_ct(path: Path) -> None:
    """A small CT on a gantry-tilted (sheared) grid: slices 5 mm apart along the table, tilted 20 degrees; the shear
    lives in the sform only (a qform cannot hold it), as the library writes such volumes."""
    affine = np.eye(4)
    affine[1, 2], affine[2, 2] = 5 * np.sin(np.radians(TILT_DEG)), 5 * np.cos(np.radians(TILT_DEG))
    volume = np.full((48, 48, 6), -800, np.int16)
    volume[10:30, 12:32, :] = 60
    nii = nib.Nifti1Image(volume, affine)
    nii.set_qform(None, code=0)
    nii.set_sform(affine, code=1)
    nib.save(nii, str(path))


@contextlib.contextmanager
def _serve(base: Path, *conf: str) -> Iterator[Server]:
    """The app on a loopback port over a copy of the sample studies, with ``--conf`` pairs ``conf`` added."""
    studies = base / "studies"
    studies.mkdir(parents=True)
    shutil.copy(SAMPLES / "ct_volume.nii.gz", studies / "ct_volume.nii.gz")
    shutil.copy(SAMPLES / "ct_abdomen.png", studies / "ct_abdomen.png")
    _write_tilted_ct(studies / "tilted_ct.nii.gz")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "MONAILABEL_PYEXE": sys.executable,
           "MONAI_LABEL_INFER_CONCURRENCY": "4"}
    log = base / "server.log"
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(ROOT / "apps" / "ibisagent"),
           "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "policy", "tiny", "--conf", "tool", "embedded", "--conf", "max_steps", "3",
           "--conf", "threads", "1", *conf]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", studies, proc, log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                if requests.get(f"{srv.url}/info/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {READY_TIMEOUT_S}s:\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _serve(tmp_path_factory.mktemp("app")) as srv:
        yield srv


def _status(exc: MONAILabelClientException) -> int:
    match = re.search(r"Status: (\d+)", str(exc.msg))
    return int(match.group(1)) if match else -1


def _stored_shape(path: Path) -> tuple[int, ...]:
    return tuple(int(s) for s in nib.load(str(path)).shape)


def test_info_lists_models_trainers_and_options(server: Server, tmp_path: Path) -> None:
    info = server.client(tmp_path).info()
    models = info["models"]
    assert models["ibisagent"]["type"] == "deepgrow" and models["ibisagent_clicks"]["type"] == "deepgrow"
    assert "instruction" in models["ibisagent"]["config"]
    assert set(info["trainers"]) == {"ibisagent_sft", "ibisagent_grpo"}
    for stats in info["train_stats"].values():
        assert {"epoch", "total_epochs", "best_metric", "total_time"} <= set(stats)
    options = info["config"]["ibisagent"]
    assert options["policy"] == "tiny" and options["tool"] == "embedded" and options["max_steps"] == 3
    assert {"device", "history", "auto_train_every"} <= set(options) and options["threads"] == 1


def test_agent_infer_on_a_volume_returns_mask_and_reasoning(server: Server, tmp_path: Path) -> None:
    label, result = server.client(tmp_path).infer("ibisagent", "ct_volume", {"instruction": "Segment the liver."})
    assert _stored_shape(Path(label)) == _stored_shape(server.studies / "ct_volume.nii.gz")
    assert result["label_names"] == {"liver": 1}
    assert result["stop_reason"] and "answer" in result and result["slice"] == 16
    assert result["steps"] and {"think", "raw", "clicks", "actions", "error"} <= set(result["steps"][0])
    assert result["timings"]["total"] > 0 and "warning" in result  # the tiny policy says it is untrained
    assert "16" in result["slices"]  # per-slice reasoning of the propagation, starting at the key slice
    # a failed run says so: the stop reason and the last error text (the untrained tiny model rarely parses)
    assert result["failed"] == bool(result["failures"])
    key = result["slices"]["16"]
    assert key["stop_reason"] == result["stop_reason"] and key["error"] == result["error"]
    if result["stop_reason"] in ("unparseable", "policy_error"):
        assert result["failed"] and result["error"] and result["failures"][0].startswith("slice 16: ")


def test_agent_infer_writes_nrrd_when_asked(server: Server, tmp_path: Path) -> None:
    label, _ = server.client(tmp_path).infer(
        "ibisagent", "ct_volume", {"instruction": "Segment the liver.", "result_extension": ".nrrd", "max_steps": 1})
    assert label.endswith(".nrrd")
    assert load_image(label).array.shape == load_image(server.studies / "ct_volume.nii.gz").array.shape


def test_a_tilted_series_result_is_nrrd_unless_asked_otherwise(server: Server, tmp_path: Path) -> None:
    """3D Slicer refuses a NIfTI on a sheared grid; NRRD carries it exactly, so it is the default there."""
    import nrrd

    label, _ = server.client(tmp_path).infer("ibisagent_clicks", "tilted_ct", {"foreground": [[20, 20, 3]]})
    assert label.endswith(".nrrd"), label
    directions = np.asarray(nrrd.read_header(label)["space directions"], dtype=float)
    cos = abs(directions[1] @ directions[2]) / np.linalg.norm(directions[1]) / np.linalg.norm(directions[2])
    assert np.degrees(np.arcsin(cos)) == pytest.approx(TILT_DEG, abs=0.1)  # the same sheared grid
    mask = load_image(label).array
    assert mask.shape == load_image(server.studies / "tilted_ct.nii.gz").array.shape and mask.any()
    label, _ = server.client(tmp_path).infer("ibisagent_clicks", "tilted_ct",
                                             {"foreground": [[20, 20, 3]], "result_extension": ".nii.gz"})
    assert label.endswith(".nii.gz")  # what the client asked for


def test_clicks_infer_covers_the_clicked_structure(server: Server, tmp_path: Path) -> None:
    liver = nib.load(str(SAMPLES / "ct_volume_liver.nii.gz")).get_fdata() > 0  # stored (i, j, k) order
    k = 16
    ii, jj = np.nonzero(liver[:, :, k])
    click = [int(np.median(ii)), int(np.median(jj)), k]
    assert liver[tuple(click)]
    label, result = server.client(tmp_path).infer("ibisagent_clicks", "ct_volume", {"foreground": [click]})
    mask = nib.load(label).get_fdata() > 0
    assert mask.shape == liver.shape and mask[tuple(click)]
    assert mask[:, :, k].sum() == mask.sum()  # only the clicked slice
    assert iou(mask[:, :, k], liver[:, :, k]) > 0.5, result


def test_replies_say_which_window_the_picture_used_and_a_request_can_set_the_modality(server: Server,
                                                                                      tmp_path: Path) -> None:
    """ct_volume.nii.gz names no modality: its Hounsfield values get the CT window; a request's modality wins."""
    click = {"foreground": [[40, 40, 16]]}
    _, auto = server.client(tmp_path).infer("ibisagent_clicks", "ct_volume", click)
    assert auto["modality"] == "CT" and auto["window"] == {"kind": "window", "width": 400.0, "level": 40.0,
                                                           "name": "soft_tissue"}
    _, given = server.client(tmp_path).infer("ibisagent_clicks", "ct_volume", {**click, "modality": "MR"})
    assert given["modality"] == "MR" and given["window"]["kind"] == "percentile"
    _, agent = server.client(tmp_path).infer("ibisagent", "ct_volume",
                                             {"instruction": "Segment the liver.", "max_steps": 1, "propagate": False})
    assert agent["modality"] == "CT" and agent["window"]["kind"] == "window"
    with pytest.raises(MONAILabelClientException) as info:
        server.client(tmp_path).infer("ibisagent_clicks", "ct_volume", {**click, "modality": "../CT"})
    assert _status(info.value) == 400


def test_saving_a_final_label_appends_a_correction(server: Server, tmp_path: Path) -> None:
    client = server.client(tmp_path)
    _, result = client.infer("ibisagent", "ct_abdomen", {"instruction": "Segment the liver.", "max_steps": 1})
    assert result.get("stored_for_corrections") is True
    corrected = tmp_path / "ct_abdomen_final.png"
    shutil.copy(SAMPLES / "ct_liver.png", corrected)  # the radiologist's corrected mask
    response = client.save_label("ct_abdomen", str(corrected), tag="final")
    assert response["corrections_added"] == 1, response
    records = CorrectionStore(server.studies / "ibisagent" / "corrections.jsonl").read()
    assert records[-1].source == "correction" and records[-1].image == "ct_abdomen"
    assert records[-1].instruction == "Segment the liver." and records[-1].final_iou is not None
    assert records[-1].client_id == "pytest" and records[-1].time  # who saved it (the client id), and when
    # the agent output was consumed: saving again adds nothing
    assert client.save_label("ct_abdomen", str(corrected), tag="final")["corrections_added"] == 0


def test_a_correction_replays_with_the_modality_its_request_used(server: Server, tmp_path: Path) -> None:
    """The server's --conf modality is unset and the PNG names none: the request said CT, so the correction's
    replay (and its record) must use CT too, not the server's default."""
    client = server.client(tmp_path)
    _, result = client.infer("ibisagent", "ct_abdomen", {"instruction": "Segment the liver.", "max_steps": 1,
                                                         "modality": "CT"})
    assert result["modality"] == "CT" and result.get("stored_for_corrections") is True
    corrected = tmp_path / "ct_abdomen_final.png"
    shutil.copy(SAMPLES / "ct_liver.png", corrected)
    assert client.save_label("ct_abdomen", str(corrected), tag="final")["corrections_added"] == 1
    record = CorrectionStore(server.studies / "ibisagent" / "corrections.jsonl").read()[-1]
    assert record.modality == "CT", record.modality


@pytest.mark.parametrize(("model", "image", "params", "status"), [
    ("ibisagent", "no_such_image", {"instruction": "Segment the liver."}, 404),
    ("ibisagent", "ct_volume", {}, 400),
    ("ibisagent", "ct_volume", {"instruction": "   "}, 400),
    ("ibisagent_clicks", "ct_volume", {"foreground": [[500, 1, 1]]}, 400),
    ("ibisagent", "ct_volume", {"instruction": "Segment it.", "background": [[1, 1, 32]]}, 400),
    ("ibisagent_clicks", "ct_volume", {}, 400),
    ("ibisagent", "../ct_volume", {"instruction": "Segment it."}, 400),
])
def test_bad_requests_get_4xx_and_the_server_keeps_answering(
    server: Server, tmp_path: Path, model: str, image: str, params: dict, status: int
) -> None:
    client = server.client(tmp_path)
    with pytest.raises(MONAILabelClientException) as err:
        client.infer(model, image, params)
    assert _status(err.value) == status, err.value.msg
    assert "Traceback" not in str(err.value.msg)
    assert client.info()["models"]


def test_bad_uploads_and_label_names_are_rejected(server: Server, tmp_path: Path) -> None:
    client = server.client(tmp_path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(MONAILabelClientException) as err:
        client.upload_image(str(junk), "junk")
    assert _status(err.value) == 415
    assert "junk" not in json.dumps(client.datastore())
    mask = tmp_path / "m.png"
    shutil.copy(SAMPLES / "ct_liver.png", mask)
    for image_id, tag in (("ct_abdomen", "../../x"), ("..", "final")):
        r = requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": tag},
                         files={"label": ("m.png", mask.read_bytes())}, timeout=30)
        assert 400 <= r.status_code < 500, r.text
    assert not (server.studies.parent / "x.png").exists()


def test_four_concurrent_infers_all_succeed(server: Server, tmp_path: Path) -> None:
    def run(i: int) -> dict:
        client = server.client(tmp_path / str(i))
        (tmp_path / str(i)).mkdir()
        _, result = client.infer("ibisagent", "ct_volume", {"instruction": "Segment the liver.", "max_steps": 1})
        return result

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    assert all(r["stop_reason"] for r in results)


def test_training_without_data_fails_clearly_instead_of_faking_success(server: Server) -> None:
    r = requests.post(f"{server.url}/train/ibisagent_grpo", params={"run_sync": True}, json={}, timeout=120)
    assert r.status_code >= 400
    time.sleep(0.5)
    assert "needs a manifest" in server.log_tail(200) + r.text


def test_the_nth_saved_correction_starts_training_and_the_reply_says_which_task(tmp_path: Path) -> None:
    """With ``auto_train_every``, the save that completes a batch of corrections enqueues MONAI Label's
    ``ibisagent_sft`` task; the save's reply names that task (id, status) as plain JSON — MONAI Label's own task
    dict carries a live log deque and must not be sent — and the task is the one MONAI Label's /train/ reports."""
    with _serve(tmp_path / "auto", "--conf", "auto_train_every", "1", "--conf", "train_minutes", "1") as server:
        client = server.client(tmp_path)
        client.infer("ibisagent", "ct_abdomen", {"instruction": "Segment the liver.", "max_steps": 1})
        corrected = tmp_path / "ct_abdomen_final.png"
        shutil.copy(SAMPLES / "ct_liver.png", corrected)
        response = client.save_label("ct_abdomen", str(corrected), tag="final")
        assert response["corrections_added"] == 1 and response["corrections_total"] == 1, response
        training = response["training"]
        assert set(training) >= {"id", "status"} and training["status"] in {"SUBMITTED", "RUNNING", "DONE"}, training
        tasks = requests.get(f"{server.url}/train/", params={"check_if_running": False}, timeout=30).json()
        listed = tasks if isinstance(tasks, list) else [tasks]
        assert training["id"] in {t.get("id") for t in listed}, tasks
