"""The ASGI app the start command serves (``uvicorn ibisagent.server.app:app``): importing this module builds it, with
MONAI Label's settings as the start command left them in the environment. See :mod:`ibisagent.server.asgi`."""

from ibisagent.server.asgi import build_app

app = build_app()
