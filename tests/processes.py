"""Helpers for tests that run real servers (MONAI Label, Orthanc) as subprocesses on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

#: Seconds a server gets to exit after SIGTERM before it is killed.
STOP_GRACE_S = 15


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a subprocess started with ``start_new_session=True`` and everything it spawned: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_GRACE_S)


def wait_ready(url: str, proc: subprocess.Popen, log: str | os.PathLike[str], timeout_s: float = 90) -> None:
    """Poll ``url`` until it answers 200; raise ``RuntimeError`` with the log's tail if the process exits or the time
    runs out."""
    import time
    from pathlib import Path

    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = Path(log).read_text(errors="replace").splitlines()[-40:]
            raise RuntimeError(f"server exited with {proc.returncode}:\n" + "\n".join(tail))
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            tail = Path(log).read_text(errors="replace").splitlines()[-40:]
            raise RuntimeError(f"server not ready after {timeout_s}s:\n" + "\n".join(tail))
        time.sleep(0.3)
