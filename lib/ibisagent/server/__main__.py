"""Start the IBISAgent MONAI Label server with the safe configuration::

    python -m ibisagent.server --app apps/ibisagent --studies /data/studies [--host 127.0.0.1] [--port 8000] \\
        [--conf NAME VALUE ...] [any other option of `monailabel start_server`]

It is MONAI Label's own start command (``monailabel.main start_server``, same arguments) with these differences:

* it serves :mod:`ibisagent.server.app` — MONAI Label's app behind the layer of :mod:`ibisagent.server.asgi`
  (infers on a bounded worker pool, limits, closed ``/logs`` and dataset download, origin policy);
* MONAI Label sessions (``PUT /session``: archives unpacked on the server) are off unless ``MONAI_LABEL_SESSIONS=true``
  is set in the environment (they then unpack only inside their own folder);
* it listens on ``127.0.0.1`` unless ``--host`` is given (put a TLS reverse proxy in front for other machines);
* ``MONAILABEL_PYEXE`` defaults to this Python and the ibisagent library is put on ``PYTHONPATH``, so training jobs
  (new processes) find both.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: What uvicorn serves.
ASGI_APP = "ibisagent.server.app:app"


def safe_arguments(argv: Sequence[str]) -> list[str]:
    """``start_server`` arguments for MONAI Label: the given ones plus the safe defaults (see the module docstring).
    Raises ``ValueError`` for ``--uvicorn_app`` (this command chooses the app)."""
    args = list(argv)
    if any(a == "--uvicorn_app" or a.startswith("--uvicorn_app=") for a in args):
        raise ValueError("--uvicorn_app is set by `python -m ibisagent.server`; use `monailabel start_server` for "
                         "another app")
    if not any(a in ("-i", "--host") or a.startswith("--host=") for a in args):
        args += ["--host", "127.0.0.1"]
    return ["start_server", *args, "--uvicorn_app", ASGI_APP]


def safe_environment(env: dict[str, str]) -> dict[str, str]:
    """The environment for the server: ``env`` plus the safe defaults (values already set are kept, except that the
    library folder is added to ``PYTHONPATH``)."""
    out = dict(env)
    out.setdefault("MONAI_LABEL_SESSIONS", "false")
    out.setdefault("MONAILABEL_PYEXE", sys.executable)
    lib = str(Path(__file__).resolve().parents[2])
    paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    if lib not in paths:
        out["PYTHONPATH"] = os.pathsep.join([lib, *paths])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = safe_arguments(sys.argv[1:] if argv is None else argv)
    os.environ.update(safe_environment(dict(os.environ)))  # before MONAI Label reads its settings
    from monailabel.main import Main

    sys.argv = ["monailabel", *args]
    Main().run()


if __name__ == "__main__":
    main()
