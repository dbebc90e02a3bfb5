"""The server a hospital can expose (``python -m ibisagent.server``), attacked and loaded on loopback.

One server per module: the documented start command, with MONAI Label sessions switched on (to check that archives
unpack only inside their folder), a private temporary folder (to see every file the server leaves behind) and an
``openai:`` policy whose backend is a tiny HTTP server in this process: it answers at once, after a pause
(``slow`` in the instruction) or drips its reply one byte at a time (``drip``). The heaviest checks — repeated
SIGKILLs right after a save — start their own servers and are marked ``slow``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from ibisagent.policies.base import GenerationOptions, PolicyError, PolicyRequest
from processes import free_port, stop_group, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_data" / "synthetic"
POLICY_TIMEOUT_S = 3
PAUSE_S = 2.0
#: The policy server's model name as ``vllm serve /path`` names it, and a training manifest: server paths that no
#: reply may show.
SERVED_MODEL = "/srv/secret-models/m"
SECRET_MANIFEST = "/srv/secret-data/train.jsonl"
ANSWER = "<think>\nNothing to add.\n</think>\n<action>\nTerminate\n</action>\n<answer>\ndone\n</answer>"
CLICK = "<think>\nThe centre.\n</think>\n<action>\nPositive Point (0.5000, 0.5000)\n</action>"
TIME_LIMIT_S = 6


# ----------------------------------------------------------------------------------------------------------------
# a real OpenAI-compatible backend that answers, pauses or drips


class _Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode("utf-8", "replace")
        content = CLICK if "click" in body else ANSWER
        reply = json.dumps({"choices": [{"message": {"content": content}, "finish_reason": "stop"}],
                            "model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
        if "drip" in body:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            try:
                for byte in reply[:-1]:  # never completes within any sane deadline
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass  # the client hung up: what a deadline does
            self.close_connection = True
            return
        if "slow" in body:
            time.sleep(PAUSE_S)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


# ----------------------------------------------------------------------------------------------------------------
# the server


class Server:
    def __init__(self, url: str, studies: Path, tmp: Path, sessions: Path, proc: subprocess.Popen, log: Path):
        self.url, self.studies, self.tmp, self.sessions, self.proc, self.log = url, studies, tmp, sessions, proc, log

    def infer(self, model: str, image: str, params: dict | str, timeout: float = 120,
              **kw: object) -> requests.Response:
        data = {"params": params if isinstance(params, str) else json.dumps(params)}
        return requests.post(f"{self.url}/infer/{model}", params={"image": image, "output": "json", **kw},
                             files={"params": (None, data["params"])}, timeout=timeout)

    def info_seconds(self) -> float:
        t0 = time.perf_counter()
        r = requests.get(f"{self.url}/info/", timeout=30)
        assert r.status_code == 200
        return time.perf_counter() - t0


def _start(base: Path, studies: Path, conf: dict[str, str], env_extra: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ibisagent.server", "--app", str(ROOT / "apps" / "ibisagent"),
           "--studies", str(studies), "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), **env_extra}
    with open(base / "server.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/info/", proc, base / "server.log")
    except RuntimeError as exc:
        stop_group(proc)
        pytest.fail(str(exc))
    return proc, url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("server")
    studies, tmp, sessions = base / "studies", base / "tmp", base / "sessions"
    for folder in (studies, tmp, sessions):
        folder.mkdir()
    shutil.copy(SAMPLES / "ct_abdomen.png", studies / "ct_abdomen.png")
    shutil.copy(SAMPLES / "ct_volume.nii.gz", studies / "ct_volume.nii.gz")
    nan = np.zeros((16, 16, 4), np.float32)
    nan[3, 3, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(studies / "nan_volume.nii.gz"))
    conf = {"policy": f"openai:{backend}#{SERVED_MODEL}", "tool": "embedded", "train_manifest": SECRET_MANIFEST, "max_steps": "1", "threads": "1",
            "policy_timeout": str(POLICY_TIMEOUT_S), "time_limit": str(TIME_LIMIT_S), "infer_workers": "4", "max_upload_mb": "8",
            "max_instruction_chars": "200", "cors_origins": "http://viewer.example"}
    env = {"TMPDIR": str(tmp), "MONAI_LABEL_SESSIONS": "true", "MONAI_LABEL_SESSION_PATH": str(sessions)}
    proc, url = _start(base, studies, conf, env)
    srv = Server(url, studies, tmp, sessions, proc, base / "server.log")
    try:
        r = srv.infer("ibisagent", "ct_abdomen", {"instruction": "Segment the liver."})  # builds the tool
        assert r.status_code == 200, r.text
        yield srv
    finally:
        stop_group(proc)


# ----------------------------------------------------------------------------------------------------------------
# no write outside the studies


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_crafted_session_tar_is_refused_and_writes_nothing_outside(server: Server) -> None:
    marker = f"escaped-{uuid.uuid4().hex}.txt"
    crafted = _tar({"image.png": (SAMPLES / "ct_abdomen.png").read_bytes(), f"../{marker}": b"x",
                    f"../../{marker}": b"x", f"/tmp/{marker}": b"x"})
    r = requests.put(f"{server.url}/session/", params={"uncompress": "true"},
                     files={"files": ("study.tar.gz", crafted)}, timeout=60)
    assert 400 <= r.status_code < 500 and "archive refused" in r.json()["detail"], r.text
    places = [server.tmp.parent / marker, Path("/tmp") / marker, Path(os.sep) / marker,
              *server.tmp.rglob(marker), *server.sessions.rglob(marker)]
    assert [p for p in places if p.exists()] == []


def test_a_clean_session_archive_can_be_segmented(server: Server) -> None:
    clean = _tar({"image.png": (SAMPLES / "ct_abdomen.png").read_bytes()})
    r = requests.put(f"{server.url}/session/", params={"uncompress": "true"},
                     files={"files": ("study.tar.gz", clean)}, timeout=60)
    assert r.status_code == 200, r.text
    session_id = r.json()["session_id"]
    r = requests.post(f"{server.url}/infer/ibisagent_clicks", params={"session_id": session_id, "output": "json"},
                      files={"params": (None, json.dumps({"foreground": [[80, 100]]}))}, timeout=120)
    assert r.status_code != 500, r.text
    assert 400 <= r.status_code < 500 or r.json()["label_names"], r.text


def test_sessions_are_off_in_the_documented_start_command() -> None:
    from ibisagent.server.__main__ import safe_arguments, safe_environment

    assert safe_environment({})["MONAI_LABEL_SESSIONS"] == "false"
    assert safe_arguments(["--app", "a", "--studies", "s"])[-4:] == ["--host", "127.0.0.1", "--uvicorn_app",
                                                                     "ibisagent.server.app:app"]


# ----------------------------------------------------------------------------------------------------------------
# no read outside the studies


@pytest.mark.parametrize("image", ["/etc/hostname", "__TMP_FILE__", "../ct_abdomen", "ct_abdomen.png/.."])
def test_paths_as_image_ids_get_4xx_without_naming_server_paths(server: Server, image: str) -> None:
    if image == "__TMP_FILE__":
        probe = server.tmp / "probe.png"
        shutil.copy(SAMPLES / "ct_abdomen.png", probe)
        image = str(probe)
    r = server.infer("ibisagent", image, {"instruction": "Segment the liver."})
    assert 400 <= r.status_code < 500, r.text
    assert str(server.tmp) not in r.text and str(server.studies) not in r.text


def test_info_and_replies_never_show_checkpoint_paths_or_the_policy_server(server: Server, backend: str) -> None:
    hidden = ("/srv/secret", backend.rsplit("/", 1)[0])  # the model path, the training data, the policy server
    info = requests.get(f"{server.url}/info/", timeout=30)
    assert info.status_code == 200 and not any(h in info.text for h in hidden), info.text
    options = info.json()["config"]["ibisagent"]
    assert options["policy"] == "openai:m" and options["train_manifest"] == "train.jsonl", options
    r = server.infer("ibisagent", "ct_abdomen", {"instruction": "Segment the liver."})
    assert r.status_code == 200 and not any(h in r.text for h in hidden), r.text
    assert r.json()["policy"] == "openai:m" and r.json()["tool"] == "embedded"


def test_an_empty_mask_comes_with_a_note_saying_whether_the_agent_called_the_target_absent(server: Server) -> None:
    r = server.infer("ibisagent", "ct_abdomen", {"instruction": "Segment the liver."})  # the backend answers "done"
    assert r.status_code == 200, r.text
    empty = r.json()["empty_mask"]
    assert empty["explained"] is False and "'liver' is empty" in empty["note"] and "'done'" in empty["note"], empty


def test_a_missing_checkpoint_is_named_without_its_server_path(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLES / "ct_abdomen.png", studies / "ct_abdomen.png")
    conf = {"policy": "hf:/srv/secret-models/qwen", "tool": "medsam2:/srv/secret-ckpt/MedSAM2_latest.pt",
            "threads": "1"}
    proc, url = _start(tmp_path, studies, conf, {})
    try:
        info = requests.get(f"{url}/info/", timeout=30)
        assert info.status_code == 200 and "/srv/secret" not in info.text, info.text
        options = info.json()["config"]["ibisagent"]
        assert options["policy"] == "hf:qwen" and options["tool"] == "medsam2:MedSAM2_latest.pt", options
        assert all(t["config"]["policy"] == "hf:qwen" for t in info.json()["trainers"].values())
        srv = Server(url, studies, tmp_path, tmp_path, proc, tmp_path / "server.log")
        for model, params in (("ibisagent", {"instruction": "Segment the liver."}),
                              ("ibisagent_clicks", {"foreground": [[60, 60]]})):
            r = srv.infer(model, "ct_abdomen", params)
            assert r.status_code == 500, r.text
            detail = r.json()["detail"]
            assert "checkpoint not found" in detail and "MedSAM2_latest.pt" in detail, detail
            assert "/srv/secret" not in detail, detail
    finally:
        stop_group(proc)


def test_a_path_smuggled_in_params_gets_400(server: Server) -> None:
    r = server.infer("ibisagent", "ct_abdomen", {"instruction": "Segment the liver.", "image": "/etc/hostname"})
    assert r.status_code == 400 and "image" in r.json()["detail"]


# ----------------------------------------------------------------------------------------------------------------
# client mistakes are 4xx with a message, never 500


MISTAKES = [
    ("ibisagent", "ct_abdomen", {"instruction": "Segment [the] liver."}, 400),
    ("ibisagent", "ct_abdomen", {"instruction": "Segment the liver.\nThen the spleen."}, 400),
    ("ibisagent", "ct_abdomen", {"instruction": "Segment the liver.", "target": "liver]\n[x"}, 400),
    ("ibisagent", "ct_abdomen", {"instruction": "Segment the liver. " * 50}, 413),
    ("ibisagent_clicks", "ct_volume", '{"foreground": [[Infinity, 1, 1]]}', 400),
    ("ibisagent_clicks", "ct_volume", '{"foreground": [[1e400, 1, 1]]}', 400),
    ("ibisagent", "ct_abdomen", "[1, 2]", 400),
    ("ibisagent", "ct_abdomen", "not json", 400),
    ("no_such_model", "ct_abdomen", {}, 404),
    ("ibisagent", "nan_volume", {"instruction": "Segment the liver."}, 422),
    ("ibisagent", "ct_abdomen", {"instruction": "Segment the liver.", "ibisagent_image_id": "ct_volume"}, 400),
    ("ibisagent", "ct_volume", {"instruction": "Segment the liver.", "result_extension": ".png"}, 400),
    ("ibisagent", "ct_abdomen", {"instruction": "Segment the liver.", "result_extension": ".dcm"}, 400),
    ("ibisagent", "ct_abdomen", {"instruction": "Segment the liver.", "max_steps": 1e400}, 400),
]


@pytest.mark.parametrize(("model", "image", "params", "status"), MISTAKES)
def test_client_mistakes_get_4xx_with_a_message(server: Server, model: str, image: str, params: object,
                                                 status: int) -> None:
    t0 = time.perf_counter()
    r = server.infer(model, image, params)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 10 and "Traceback" not in detail
    assert time.perf_counter() - t0 < 10  # refused before any model work


def test_rejected_uploads_and_wrong_labels_leave_nothing_behind(server: Server, tmp_path: Path) -> None:
    before = set(server.tmp.iterdir())
    r = requests.put(f"{server.url}/datastore/image", params={"image": "junk"},
                     files={"file": ("junk.png", b"this is not an image")}, timeout=30)
    assert r.status_code == 415 and str(server.tmp) not in r.text, r.text
    r = requests.put(f"{server.url}/datastore/image", params={"image": "junk2"},
                     files={"file": ("junk.exe", b"MZ")}, timeout=30)
    assert r.status_code == 415, r.text
    small = tmp_path / "small.png"
    from PIL import Image

    Image.fromarray(np.ones((10, 12), np.uint8) * 255).save(small)
    r = requests.put(f"{server.url}/datastore/label", params={"image": "ct_abdomen", "tag": "final"},
                     files={"label": ("small.png", small.read_bytes())}, timeout=30)
    assert r.status_code == 400 and "shape" in r.json()["detail"], r.text
    assert not list((server.studies / "labels" / "final").glob("ct_abdomen*"))
    r = requests.put(f"{server.url}/datastore/image", params={"image": "big"},
                     files={"file": ("big.nii.gz", b"\0" * (9 * 1024 * 1024))}, timeout=30)
    assert r.status_code == 413, r.text
    # the same without a Content-Length (chunked transfer): refused as too large too, not as a malformed form
    boundary = uuid.uuid4().hex

    def chunked() -> Iterator[bytes]:
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.nii.gz"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(9):
            yield b"\0" * (1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = requests.put(f"{server.url}/datastore/image", params={"image": "big"}, data=chunked(),
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=30)
    assert r.status_code == 413 and "MiB" in r.json()["detail"], r.text
    # no temporary file left by a rejected upload (files only: MONAI Label deletes earlier infer results in the
    # background, and torch may create its cache folder here)
    assert {p for p in server.tmp.iterdir() if p.is_file()} - before == set()
    datastore = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "ct_abdomen" in datastore["objects"] and not {"junk", "junk2", "big"} & set(datastore["objects"])


def test_a_retried_label_save_is_applied_once(server: Server) -> None:
    r = server.infer("ibisagent", "ct_abdomen", {"instruction": "Segment the liver."})
    assert r.status_code == 200 and r.json()["stored_for_corrections"], r.text
    key = uuid.uuid4().hex
    replies = []
    for _ in range(2):
        r = requests.put(f"{server.url}/datastore/label", params={"image": "ct_abdomen", "tag": "final"},
                         headers={"Idempotency-Key": key},
                         files={"label": ("final.png", (SAMPLES / "ct_liver.png").read_bytes())}, timeout=120)
        assert r.status_code == 200, r.text
        replies.append(r.json())
    assert replies[0]["corrections_added"] == 1 and replies[1] == replies[0]
    lines = (server.studies / "ibisagent" / "corrections.jsonl").read_text().splitlines()
    assert len(lines) == replies[0]["corrections_total"] and all(json.loads(line) for line in lines)


def test_idempotent_replies_apply_once_across_concurrency_failures_and_restarts(tmp_path: Path) -> None:
    import asyncio
    from collections import deque

    from ibisagent.server.idempotency import IdempotentReplies
    from ibisagent.server.limits import RequestError

    applied: list[str] = []

    def saver(label: str, fail: bool = False, reply: object = None):  # noqa: ANN202 - a test helper
        async def apply() -> object:
            await asyncio.sleep(0.05)  # the retry arrives while this save runs
            if fail:
                raise OSError("disk full")
            applied.append(label)
            return {"label": label} if reply is None else reply
        return apply

    request, other = {"image": "ct", "tag": "final"}, {"image": "ct", "tag": "other"}
    store = IdempotentReplies(tmp_path / "replies", capacity=3)

    async def together(*calls: object) -> list[object]:
        return await asyncio.gather(*calls, return_exceptions=True)

    replies = asyncio.run(together(*(store.run("k1", "ann", request, saver(f"v{i}")) for i in range(3)),
                                   store.run("k1", "ann", other, saver("reused"))))
    assert replies[:3] == [{"label": "v0"}] * 3 and applied == ["v0"]
    assert isinstance(replies[3], RequestError) and replies[3].status == 422  # reused while the first runs
    restarted = IdempotentReplies(tmp_path / "replies", capacity=3)  # a new server process on the same folder
    assert asyncio.run(restarted.run("k1", "ann", request, saver("again"))) == {"label": "v0"} and applied == ["v0"]
    assert asyncio.run(restarted.run("k1", "other user", request, saver("u2"))) == {"label": "u2"}
    with pytest.raises(RequestError) as refused:
        asyncio.run(restarted.run("k1", "ann", other, saver("x")))
    assert refused.value.status == 422 and "another label save" in refused.value.message
    failed = asyncio.run(together(*(restarted.run("k2", "ann", request, saver("lost", fail=True)) for _ in range(2))))
    assert all(isinstance(f, OSError) for f in failed)  # the retry waiting on a failed save fails with it
    assert asyncio.run(restarted.run("k2", "ann", request, saver("k2"))) == {"label": "k2"}  # nothing was stored
    odd = {"label": "odd", "log": deque(["not JSON"])}
    assert asyncio.run(restarted.run("k5", "ann", request, saver("odd", reply=odd))) is odd  # answered, not stored
    assert asyncio.run(restarted.run("k5", "ann", request, saver("odd again"))) == {"label": "odd again"}
    with pytest.raises(RequestError) as too_long:
        asyncio.run(restarted.run("x" * 256, "ann", request, saver("long")))
    assert too_long.value.status == 400
    for key in ("k3", "k4"):
        time.sleep(0.02)  # distinct modification times
        asyncio.run(restarted.run(key, "ann", request, saver(key)))
    assert len(list((tmp_path / "replies").glob("*.json"))) == 3  # the oldest forgotten beyond the capacity
    assert all(len(p.stem) == 64 for p in (tmp_path / "replies").iterdir())  # no client text in the file names
    for key in ("k3", "k4"):  # the newest are kept ...
        assert asyncio.run(restarted.run(key, "ann", request, saver("not again"))) == {"label": key}
    assert asyncio.run(restarted.run("k1", "other user", request, saver("u2 again"))) == {"label": "u2 again"}


def test_a_label_save_retried_while_running_or_after_a_restart_is_applied_once(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLES / "ct_abdomen.png", studies / "ct_abdomen.png")
    conf = {"policy": "tiny", "tool": "embedded", "threads": "1"}
    key = uuid.uuid4().hex

    def save(url: str, tag: str = "final") -> requests.Response:
        return requests.put(f"{url}/datastore/label", params={"image": "ct_abdomen", "tag": tag},
                            headers={"Idempotency-Key": key},
                            files={"label": ("final.png", (SAMPLES / "ct_liver.png").read_bytes())}, timeout=120)

    proc, url = _start(tmp_path, studies, conf, {})
    try:
        r = requests.post(f"{url}/infer/ibisagent", params={"image": "ct_abdomen", "output": "json"},
                          files={"params": (None, json.dumps({"instruction": "Segment the liver."}))}, timeout=120)
        assert r.status_code == 200 and r.json()["stored_for_corrections"], r.text
        with ThreadPoolExecutor(3) as pool:  # a client that timed out and retried while the first save ran
            replies = [f.result() for f in [pool.submit(save, url) for _ in range(3)]]
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        first = replies[0].json()
        assert first["corrections_added"] == 1 and all(r.json() == first for r in replies)
    finally:
        stop_group(proc)
    corrections = (studies / "ibisagent" / "corrections.jsonl").read_text().splitlines()
    assert len(corrections) == first["corrections_total"]
    proc, url = _start(tmp_path, studies, conf, {})
    try:
        r = save(url)
        assert r.status_code == 200 and r.json() == first, r.text
        r = save(url, tag="other")
        assert r.status_code == 422 and "Idempotency-Key" in r.json()["detail"], r.text
        labels = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
        assert set(labels["objects"]["ct_abdomen"]["labels"]) == {"final"}
    finally:
        stop_group(proc)
    assert (studies / "ibisagent" / "corrections.jsonl").read_text().splitlines() == corrections


# ----------------------------------------------------------------------------------------------------------------
# exposure


def test_logs_and_dataset_download_are_not_open_to_anonymous_clients(server: Server) -> None:
    for path in ("/logs/", "/logs/?lines=10&text=true", "/datastore/dataset", "/logs"):
        r = requests.get(server.url + path, timeout=30, allow_redirects=False)
        assert r.status_code in (401, 403), (path, r.status_code)
        assert "app.log" not in r.text and "INFO" not in r.text


def test_model_files_cannot_be_replaced_over_http(server: Server) -> None:
    r = requests.put(f"{server.url}/model/ibisagent", files={"file": ("m.pt", b"evil")}, timeout=30)
    assert r.status_code == 403, r.text
    assert not list((ROOT / "apps" / "ibisagent" / "model").glob("ibisagent*.pt"))


def test_only_configured_origins_may_call_from_a_browser(server: Server) -> None:
    evil = requests.get(f"{server.url}/info/", headers={"Origin": "http://evil.example"}, timeout=30)
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers
    evil = requests.post(f"{server.url}/infer/ibisagent", params={"image": "ct_abdomen"},
                         headers={"Origin": "http://evil.example"}, timeout=30)
    assert evil.status_code == 403
    good = requests.get(f"{server.url}/info/", headers={"Origin": "http://viewer.example"}, timeout=30)
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == "http://viewer.example"
    plain = requests.get(f"{server.url}/info/", timeout=30)
    assert "access-control-allow-origin" not in plain.headers


# ----------------------------------------------------------------------------------------------------------------
# bounded work, many users


def test_a_dripping_backend_is_cut_at_the_deadline_while_info_stays_fast(server: Server) -> None:
    with ThreadPoolExecutor(1) as pool:
        t0 = time.perf_counter()
        job = pool.submit(server.infer, "ibisagent", "ct_abdomen", {"instruction": "drip: segment the liver."})
        info = []
        while not job.done():
            info.append(server.info_seconds())
            time.sleep(0.2)
        elapsed = time.perf_counter() - t0
        r = job.result()
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["stop_reason"] == "policy_error" and "no reply" in (result["error"] or ""), result
    assert POLICY_TIMEOUT_S - 0.5 < elapsed < POLICY_TIMEOUT_S + 5, elapsed
    assert info and max(info) < 1.0, info


def test_info_answers_fast_while_four_infers_run(server: Server) -> None:
    params = {"instruction": "slow: segment the liver."}
    with ThreadPoolExecutor(4) as pool:
        t0 = time.perf_counter()
        jobs = [pool.submit(server.infer, "ibisagent", "ct_abdomen", params) for _ in range(4)]
        time.sleep(0.5)
        info = []
        while not all(j.done() for j in jobs):
            info.append(server.info_seconds())
            time.sleep(0.1)
        wall = time.perf_counter() - t0
    assert all(j.result().status_code == 200 for j in jobs), [j.result().text for j in jobs]
    assert len(info) >= 3 and max(info) < 0.5, info
    assert wall < 3 * PAUSE_S, wall  # the four ran side by side, not one after another (4 × PAUSE_S)


def test_time_limit_bounds_a_whole_volume_request_not_each_slice(server: Server) -> None:
    # every policy call pauses PAUSE_S and clicks once (max_steps 1), so each slice keeps a mask and propagation
    # would go on through the volume's 32 slices; the request must end near its time limit with the slices done
    t0 = time.perf_counter()
    r = server.infer("ibisagent", "ct_volume", {"instruction": "slow click: segment the liver."})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    result = r.json()
    assert len(result["slices"]) >= 2, result["stops"]  # it did propagate
    assert any("request time limit" in why for why in result["stops"].values()), result["stops"]
    assert elapsed < TIME_LIMIT_S + PAUSE_S + 4, elapsed


def test_policy_call_has_an_overall_deadline(backend: str) -> None:
    from ibisagent.policies.openai import OpenAIPolicy

    request = PolicyRequest(messages=[{"role": "user", "content": "drip"}])
    with OpenAIPolicy(backend, "m", timeout=2, retries=3) as policy:
        t0 = time.monotonic()
        with pytest.raises(PolicyError, match="no reply"):
            policy.generate([request], GenerationOptions(max_new_tokens=4))
        assert time.monotonic() - t0 < 2.5
        t0 = time.monotonic()  # the agent's time limit (an earlier deadline) bounds the call too
        with pytest.raises(PolicyError):
            policy.generate([request], GenerationOptions(max_new_tokens=4, deadline=time.monotonic() + 0.7))
        assert time.monotonic() - t0 < 1.2
        ok = policy.generate([PolicyRequest(messages=[{"role": "user", "content": "hi"}])], GenerationOptions())
        assert ok[0].text == ANSWER


# ----------------------------------------------------------------------------------------------------------------
# a kill never bricks the server


@pytest.mark.slow
def test_kill_9_right_after_saves_never_stops_the_next_start(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLES / "ct_abdomen.png", studies / "ct_abdomen.png")
    conf = {"policy": "tiny", "tool": "embedded", "threads": "1"}
    label = (SAMPLES / "ct_liver.png").read_bytes()
    for round_ in range(3):
        proc, url = _start(tmp_path, studies, conf, {})
        tags = [f"t{round_}x{i}" for i in range(4)]
        with ThreadPoolExecutor(4) as pool:  # saves in flight when the kill comes
            futures = [pool.submit(requests.put, f"{url}/datastore/label", params={"image": "ct_abdomen", "tag": t},
                                   files={"label": ("l.png", label)}, timeout=30) for t in tags]
            futures[0].result()
            time.sleep(0.01 * round_)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            for f in futures:
                try:
                    f.result()
                except requests.RequestException:
                    pass
    # the state a kill during MONAI Label's in-place write left behind: an empty index
    (studies / "datastore_v2.json").write_text("")
    proc, url = _start(tmp_path, studies, conf, {})
    try:
        datastore = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
        saved = set(datastore["objects"]["ct_abdomen"]["labels"])
        assert {"t0x0", "t1x0", "t2x0"} <= saved, saved  # every acknowledged label is still listed
        assert list(studies.glob("datastore_v2.json.corrupt-*"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        # SIGTERM stops the server cleanly (uvicorn re-raises the signal after its orderly shutdown)
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text(errors="replace")


def test_archives_with_links_or_absolute_members_are_refused(tmp_path: Path) -> None:
    import zipfile

    from ibisagent.server.limits import RequestError
    from ibisagent.server.storage import check_archive

    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("innocent")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    zipped = tmp_path / "abs.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("../../outside.txt", "x")
    for archive in (link, zipped):
        with pytest.raises(RequestError, match="archive refused"):
            check_archive(archive, tmp_path / "dest")
    fine = tmp_path / "fine.tar"
    with tarfile.open(fine, "w") as tar:
        tar.add(SAMPLES / "ct_abdomen.png", arcname="study/image.png")
    check_archive(fine, tmp_path / "dest")  # a plain archive passes
