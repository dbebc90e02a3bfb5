"""Serving the MONAI Label app safely: request limits (:mod:`.limits`), crash-safe and contained storage
(:mod:`.storage`), the ASGI layer around MONAI Label (:mod:`.asgi`) and the start command (``python -m
ibisagent.server``, :mod:`.__main__`)."""
