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
