"""Many users at once: infer latency at 1, 2, 4, 8 concurrent clients (p50 and p95 ÷ the serial latency) and ``/info``
latency under that load, for MONAI Label's plain start command and for ``python -m ibisagent.server``, side by side.

Run: ``.venv/bin/python benchmarks/server_load.py [--clients 1 2 4 8] [--per-client 3] [--workers 4]
[--backend-latency 1.0] [--servers plain safe]``

What it does (loopback only, no downloads):

* starts an OpenAI-compatible backend in this process that answers every chat completion after
  ``--backend-latency`` seconds (a remote model server: the app waits on it, as it waits on ``vllm serve``) with a
  one-step ``Terminate`` reply;
* for each server kind starts the app (``apps/ibisagent``, ``--conf policy openai:…``, ``--conf tool embedded``,
  ``--conf max_steps 1``, ``--conf threads 1``) with a studies folder holding ``sample_data/synthetic/ct_abdomen.png``:
  ``plain`` = ``python -m monailabel.main start_server`` (MONAI Label 0.8.5 as is: infers run inline, in the event
  loop), ``safe`` = ``python -m ibisagent.server … --conf infer_workers W``;
* warms up, measures the serial latency (median of 5 requests one after another), then for each client count N runs
  N threads each sending ``--per-client`` requests (``ibisagent`` on ``ct_abdomen``, ``"Segment the liver."``) while a
  probe thread calls ``GET /info/`` every 0.1 s.

Prints a Markdown table: clients, p50 and p95 latency, both ÷ serial, and ``/info`` p50 / p95 / max under load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
REPLY = "<think>\nDone.\n</think>\n<action>\nTerminate\n</action>\n<answer>\ndone\n</answer>"


def backend(latency: float) -> ThreadingHTTPServer:
    body = json.dumps({"choices": [{"message": {"content": REPLY}, "finish_reason": "stop"}], "model": "m"}).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(latency)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(kind: str, studies: Path, policy: str, workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    head = ["-m", "ibisagent.server"] if kind == "safe" else ["-m", "monailabel.main", "start_server"]
    cmd = [sys.executable, *head, "--app", str(ROOT / "apps" / "ibisagent"), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port), "--conf", "policy", policy, "--conf", "tool", "embedded",
           "--conf", "max_steps", "1", "--conf", "threads", "1", "--conf", "infer_workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "MONAILABEL_PYEXE": sys.executable}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited; see {log}")
        try:
            if requests.get(url + "/info/", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{kind} server not ready; see {log}")


def infer(url: str) -> float:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/infer/ibisagent", params={"image": "ct_abdomen", "output": "json"},
                      files={"params": (None, json.dumps({"instruction": "Segment the liver."}))}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(url: str, clients: list[int], per_client: int) -> tuple[float, list[dict[str, float]]]:
    infer(url)
    infer(url)  # warm: tool built, connections open
    serial = statistics.median(infer(url) for _ in range(5))
    rows = []
    for n in clients:
        stop = threading.Event()
        info: list[float] = []

        def probe() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                requests.get(url + "/info/", timeout=600)
                info.append(time.perf_counter() - t0)
                time.sleep(0.1)

        prober = threading.Thread(target=probe)
        prober.start()
        with ThreadPoolExecutor(n) as pool:
            lat = [x for chunk in pool.map(lambda _: [infer(url) for _ in range(per_client)], range(n)) for x in chunk]
        stop.set()
        prober.join()
        rows.append({"clients": n, "p50": pct(lat, 0.5), "p95": pct(lat, 0.95), "info_p50": pct(info, 0.5),
                     "info_p95": pct(info, 0.95), "info_max": max(info)})
        print(f"  {n} clients: p50 {rows[-1]['p50']:.2f} s, p95 {rows[-1]['p95']:.2f} s, /info max "
              f"{rows[-1]['info_max']:.3f} s", file=sys.stderr, flush=True)
    return serial, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="--conf infer_workers of the safe server")
    ap.add_argument("--backend-latency", type=float, default=1.0)
    ap.add_argument("--servers", nargs="+", default=["plain", "safe"], choices=["plain", "safe"])
    args = ap.parse_args()

    httpd = backend(args.backend_latency)
    policy = f"openai:http://127.0.0.1:{httpd.server_address[1]}/v1#m"
    base = Path(tempfile.mkdtemp(prefix="server-load-"))
    results = {}
    try:
        for kind in args.servers:
            studies = base / kind
            studies.mkdir()
            shutil.copy(ROOT / "sample_data" / "synthetic" / "ct_abdomen.png", studies / "ct_abdomen.png")
            print(f"{kind} server …", file=sys.stderr, flush=True)
            proc, url = start(kind, studies, policy, args.workers, base / f"{kind}.log")
            try:
                results[kind] = measure(url, args.clients, args.per_client)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
    finally:
        httpd.shutdown()
        shutil.rmtree(base, ignore_errors=True)

    print(f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; backend latency {args.backend_latency:g} s per policy call; "
          f"{args.per_client} requests per client; safe server `--conf infer_workers {args.workers}`\n")
    print("| server | clients | serial s | p50 s | p95 s | p50 ÷ serial | p95 ÷ serial | /info p50 s | /info p95 s "
          "| /info max s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, (serial, rows) in results.items():
        for r in rows:
            print(f"| {kind} | {r['clients']} | {serial:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | "
                  f"{r['p50'] / serial:.2f} | {r['p95'] / serial:.2f} | {r['info_p50']:.3f} | {r['info_p95']:.3f} | "
                  f"{r['info_max']:.3f} |")


if __name__ == "__main__":
    main()
