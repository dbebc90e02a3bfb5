"""Latency and throughput of the MONAI Label app: REST API vs the direct library call, and concurrent clients.

Run: ``.venv/bin/python benchmarks/app_latency.py [--models ibisagent_clicks ibisagent] [--repeats 10]
[--clients 1 2 4 8] [--requests 16] [--max-steps 3] [--workers 1]``

What it does (loopback only, no downloads):

* starts the app (``apps/ibisagent``) with ``--conf policy tiny --conf tool embedded --conf device cpu`` on a free
  127.0.0.1 port, with a temporary studies folder holding ``sample_data/synthetic/ct_volume.nii.gz`` and
  ``MONAI_LABEL_INFER_CONCURRENCY`` = the largest client count;
* **latency** — the same case, alternately through the REST API (``monailabel.client.MONAILabelClient.infer``: HTTP,
  multipart response, result file written by the client) and through the ``ibisagent`` library in this process,
  doing what the task does (load the volume, display slice, ``tool.encode``, ``predict`` / ``segment_volume``,
  write the mask ``.nii.gz``). Both warmed up first (models built). Overhead ratio = median REST / median direct;
  the masks of both paths are compared (they must be identical: same case, same deterministic models);
* **throughput** — N client threads (1, 2, 4, 8), each with its own client, share a fixed number of requests
  (``--requests``, at least N); requests per second over the wall time, and the per-request latency percentiles.

Cases: ``ibisagent_clicks`` — one foreground click in the liver on slice 16 (the tool alone); ``ibisagent`` —
``"Segment the liver."``, no clicks (middle slice, then propagation through the volume), ``max_steps`` as given.
The tiny policy is untrained: this measures the serving path, not segmentation quality or a real model's cost.
Prints a Markdown report (command, machine, tables).
"""

from __future__ import annotations

import argparse
import os
import sys as _sys

# Torch threads per process (``--threads``; default 1), set before torch is imported: two processes (server and
# this one) each spinning the default one thread per core on a small shared machine time each other out.
_THREADS = next((a.split("=", 1)[1] if "=" in a else (_sys.argv[i + 2] if i + 2 < len(_sys.argv) else "1")
                 for i, a in enumerate(_sys.argv[1:]) if a.split("=", 1)[0] == "--threads"), "1")
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = _THREADS
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import requests
from monailabel.client import MONAILabelClient

from ibisagent.agent import AgentConfig
from ibisagent.clicks import Click
from ibisagent.imaging import load_image, save_mask_like, slice_of, to_display_rgb
from ibisagent.policies import load_policy
from ibisagent.tools import load_tool
from ibisagent.volume import segment_volume

ROOT = Path(__file__).resolve().parents[1]
VOLUME = ROOT / "sample_data" / "synthetic" / "ct_volume.nii.gz"
LIVER = ROOT / "sample_data" / "synthetic" / "ct_volume_liver.nii.gz"
IMAGE_ID = "ct_volume"
INSTRUCTION = "Segment the liver."
CLICK_SLICE = 16
READY_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _liver_click() -> list[int]:
    liver = nib.load(str(LIVER)).get_fdata() > 0  # stored (i, j, k) order, as clients send clicks
    ii, jj = np.nonzero(liver[:, :, CLICK_SLICE])
    click = [int(np.median(ii)), int(np.median(jj)), CLICK_SLICE]
    assert liver[tuple(click)], "the benchmark click is not in the liver"
    return click


# ----------------------------------------------------------------------------------------------------------------
# the server


class Server:
    def __init__(self, base: Path, max_clients: int, max_steps: int, workers: int) -> None:
        self.studies = base / "studies"
        self.studies.mkdir()
        shutil.copy(VOLUME, self.studies / VOLUME.name)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "server.log"
        self.concurrency = max_clients
        env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "MONAILABEL_PYEXE": sys.executable,
               "MONAI_LABEL_INFER_CONCURRENCY": str(max_clients)}
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(ROOT / "apps" / "ibisagent"),
               "--studies", str(self.studies), "--host", "127.0.0.1", "--port", str(self.port),
               "--conf", "policy", "tiny", "--conf", "tool", "embedded", "--conf", "device", "cpu",
               "--conf", "max_steps", str(max_steps)]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=base,
                                         start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after {READY_TIMEOUT_S}s:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)


# ----------------------------------------------------------------------------------------------------------------
# the two paths


class Direct:
    """The library calls the app's tasks make, in this process (same options as the server)."""

    def __init__(self, max_steps: int, out_dir: Path) -> None:
        self.tool = load_tool("embedded", device="cpu")
        self.policy = load_policy("tiny", device="cpu")
        self.config = AgentConfig(max_steps=max_steps, history="off")
        self.out_dir = out_dir

    def clicks(self, click: list[int]) -> Path:
        image = load_image(VOLUME)
        z, y, x = image.geometry.voxel_to_canonical(tuple(click))
        rgb = to_display_rgb(slice_of(image, z), image.modality)
        prediction = self.tool.encode(rgb).predict([Click(x=x, y=y, positive=True)], None)
        return save_mask_like(prediction.mask, image, self.out_dir / "direct_clicks.nii.gz", slice=z)

    def agent(self, instruction: str, target: str) -> Path:
        image = load_image(VOLUME)
        key = image.array.shape[0] // 2
        volume = segment_volume(self.policy, self.tool, image, instruction, [target], key_slice=key,
                                config=self.config)
        return save_mask_like(volume.masks[target], image, self.out_dir / "direct_agent.nii.gz")


def _rest_call(client: MONAILabelClient, model: str, params: dict[str, Any],
               task_times: list[float] | None = None) -> str:
    label, result = client.infer(model, IMAGE_ID, params)
    if task_times is not None:  # the task's own time, as the server measured it
        task_times.append(float(result["timings"]["total"]))
    return label


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _same_mask(a: str | Path, b: str | Path) -> bool:
    return bool(np.array_equal(np.asarray(nib.load(str(a)).dataobj) > 0, np.asarray(nib.load(str(b)).dataobj) > 0))


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ibisagent_clicks", "ibisagent"],
                        choices=["ibisagent_clicks", "ibisagent"])
    parser.add_argument("--repeats", type=int, default=10, help="latency samples per path and model")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per throughput level (>= clients)")
    parser.add_argument("--max-steps", type=int, default=3, help="agent steps per slice (ibisagent)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the server")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per path and model first")
    parser.add_argument("--threads", default=_THREADS,
                        help="torch/OpenMP threads per process (default 1)")
    args = parser.parse_args(argv)

    click = _liver_click()
    params = {"ibisagent_clicks": {"foreground": [click]},
              "ibisagent": {"instruction": INSTRUCTION, "max_steps": args.max_steps}}
    command = " ".join(["python", "benchmarks/app_latency.py", *(argv if argv is not None else sys.argv[1:])])

    with tempfile.TemporaryDirectory(prefix="ibisagent-bench-") as tmp:
        base = Path(tmp)
        server_start = time.perf_counter()
        server = Server(base, max(args.clients), args.max_steps, args.workers)
        server_ready_s = time.perf_counter() - server_start
        try:
            direct = Direct(args.max_steps, base)
            run_direct = {"ibisagent_clicks": lambda: direct.clicks(click),
                          "ibisagent": lambda: direct.agent(INSTRUCTION, "liver")}
            (base / "c0").mkdir()
            client = MONAILabelClient(server.url, tmpdir=str(base / "c0"), client_id="bench")

            latency: dict[str, dict[str, Any]] = {}
            for model in args.models:
                first_rest, rest_label = _timed(lambda: _rest_call(client, model, params[model]))
                first_direct, direct_label = _timed(run_direct[model])
                identical = _same_mask(rest_label, direct_label)
                for _ in range(max(args.warmup - 1, 0)):
                    _rest_call(client, model, params[model])
                    run_direct[model]()
                rest_t, direct_t, task_t = [], [], []
                for _ in range(args.repeats):  # alternate, so that drift hits both paths alike
                    rest_t.append(_timed(lambda: _rest_call(client, model, params[model], task_t))[0])
                    direct_t.append(_timed(run_direct[model])[0])
                latency[model] = {"rest": rest_t, "direct": direct_t, "task": task_t, "first_rest": first_rest,
                                  "first_direct": first_direct, "identical": identical}
                print(f"[latency] {model}: first REST {first_rest:.2f} s, first direct {first_direct:.2f} s; REST "
                      f"{[round(t * 1e3) for t in rest_t]} ms, direct {[round(t * 1e3) for t in direct_t]} ms",
                      file=sys.stderr)

            throughput: dict[str, list[dict[str, Any]]] = {}
            for model in args.models:
                rows = []
                for n in args.clients:
                    total = max(args.requests, n)
                    clients = []
                    for i in range(n):
                        d = base / f"t{n}_{i}"
                        d.mkdir(exist_ok=True)
                        clients.append(MONAILabelClient(server.url, tmpdir=str(d), client_id=f"bench{i}"))
                    counter = iter(range(total))
                    lock = threading.Lock()

                    def worker(c: MONAILabelClient, model: str = model) -> list[float]:
                        times = []
                        while True:
                            with lock:
                                if next(counter, None) is None:
                                    return times
                            times.append(_timed(lambda: _rest_call(c, model, params[model]))[0])

                    start = time.perf_counter()
                    with ThreadPoolExecutor(n) as pool:
                        per_client = list(pool.map(worker, clients))
                    wall = time.perf_counter() - start
                    times = [t for ts in per_client for t in ts]
                    assert len(times) == total
                    rows.append({"clients": n, "requests": total, "wall": wall, "rps": total / wall,
                                 "p50": _pct(times, 50), "p95": _pct(times, 95)})
                    print(f"[throughput] {model} x{n}: {total / wall:.2f} req/s", file=sys.stderr)
                throughput[model] = rows
        finally:
            server.stop()

    print(f"## App latency and throughput\n\nCommand: `{command}`  \n"
          f"Machine: {os.cpu_count()} CPUs (`nproc` {_nproc()}), {_cpu_model()}; Python {platform.python_version()}; "
          f"server: MONAI Label, `--conf policy tiny --conf tool embedded --conf device cpu --conf max_steps "
          f"{args.max_steps}`, `MONAI_LABEL_INFER_CONCURRENCY={max(args.clients)}`, {args.workers} uvicorn worker(s), "
          f"{_THREADS} torch thread(s) per process (`OMP_NUM_THREADS`), "
          f"ready in {server_ready_s:.1f} s  \n"
          f"Case: `{VOLUME.relative_to(ROOT)}` ({'x'.join(map(str, nib.load(str(VOLUME)).shape))}); "
          f"`ibisagent_clicks`: one foreground click {click}; `ibisagent`: \"{INSTRUCTION}\" (no clicks, "
          "middle slice + propagation, tiny untrained policy)\n")
    print("### Latency: REST API vs direct library call (same case, warm)\n")
    print("| model | REST median (ms) | REST p95 (ms) | task in server, median (ms) | direct median (ms) | "
          "direct p95 (ms) | overhead ratio (median REST / direct) | overhead (ms) | "
          "first REST call (ms, builds models) | masks identical |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for model, r in latency.items():
        rm, dm = statistics.median(r["rest"]), statistics.median(r["direct"])
        print(f"| `{model}` | {rm * 1e3:.1f} | {_pct(r['rest'], 95) * 1e3:.1f} | "
              f"{statistics.median(r['task']) * 1e3:.1f} | {dm * 1e3:.1f} | "
              f"{_pct(r['direct'], 95) * 1e3:.1f} | {rm / dm:.2f} | {(rm - dm) * 1e3:.1f} | "
              f"{r['first_rest'] * 1e3:.0f} | {'yes' if r['identical'] else 'NO'} |")
    print(f"\n{args.repeats} samples per path after {args.warmup} warm-up calls, alternating REST and direct.\n")
    print("### Throughput: concurrent clients (REST)\n")
    print("| model | clients | requests | wall (s) | requests/s | speed-up vs 1 client | latency p50 (ms) | "
          "latency p95 (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for model, rows in throughput.items():
        base_rps = rows[0]["rps"]
        for row in rows:
            print(f"| `{model}` | {row['clients']} | {row['requests']} | {row['wall']:.2f} | {row['rps']:.2f} | "
                  f"{row['rps'] / base_rps:.2f} | {row['p50'] * 1e3:.0f} | {row['p95'] * 1e3:.0f} |")
    return 0


def _nproc() -> str:
    try:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # nproc honours OMP_NUM_THREADS
        return subprocess.run(["nproc"], capture_output=True, text=True, timeout=10, env=env).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
