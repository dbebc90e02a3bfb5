"""Crash-safe writes give their outputs the permissions a plain write would: other users and services can read them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ibisagent.fileio import atomic_write_text


def test_new_files_get_the_umask_mode_not_mkstemps_private_one(tmp_path: Path) -> None:
    # a child process with a known umask, so the test does not depend on (or change) this process's umask
    code = ("import os, sys; os.umask(0o022); from ibisagent.fileio import atomic_write_text; "
            "atomic_write_text(sys.argv[1], 'x')")
    target = tmp_path / "results.json"
    subprocess.run([sys.executable, "-c", code, str(target)], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "lib")})
    assert target.stat().st_mode & 0o777 == 0o644


def test_an_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "mask.txt"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o640
