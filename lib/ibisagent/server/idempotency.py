"""Replies to retried label saves: an ``Idempotency-Key`` request is applied once, across concurrency and restarts.

A client on a flaky hospital network that times out on ``PUT /datastore/label`` sends the same save again with the same
``Idempotency-Key`` header (the IETF HTTPAPI draft *The Idempotency-Key HTTP Header Field*). The retry often arrives
while the first save is still running, or after the server was restarted; applying it twice would store the
correction twice and put it twice into the training data. :class:`IdempotentReplies`:

* keeps each key's reply in a small JSON file in a folder of the app's data directory (named by the SHA-256 of the
  user and the key: no client text reaches a path), written atomically, so a restarted server still knows it;
* runs one save per key; a retry arriving meanwhile waits for it and gets its reply or its error (a failed save is
  not recorded: a later retry applies it);
* refuses a key reused for another image or tag with 422, as the draft asks for a key reused with another payload;
* forgets the oldest replies beyond ``capacity``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ibisagent.fileio import atomic_write_text
from ibisagent.server.limits import RequestError

logger = logging.getLogger(__name__)

#: Replies remembered (oldest forgotten first) and the longest key accepted.
IDEMPOTENCY_CAPACITY = 1024
MAX_KEY_CHARS = 255
_RECORD = re.compile(r"[0-9a-f]{64}\.json")


class IdempotentReplies:
    """Label-save replies by ``Idempotency-Key`` in ``folder`` (created on first use). Use from one event loop."""

    def __init__(self, folder: str | os.PathLike[str], capacity: int = IDEMPOTENCY_CAPACITY) -> None:
        self.folder = Path(folder)
        self.capacity = int(capacity)
        self._running: dict[str, tuple[dict[str, str], asyncio.Future[Any]]] = {}

    def _path(self, key: str, user: str | None) -> Path:
        digest = hashlib.sha256(json.dumps([user or "", key]).encode("utf-8")).hexdigest()
        return self.folder / f"{digest}.json"

    def stored(self, key: str, user: str | None, request: dict[str, str]) -> Any | None:
        """The stored reply to ``key`` (of ``user``), or None. Raises :class:`RequestError` (422) when the key was
        used for another ``request`` (image and tag)."""
        path = self._path(key, user)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("unreadable idempotency record %s (%s): treated as absent", path.name, exc)
            return None
        _check_same(record.get("request"), request)
        return record.get("reply")

    def _store(self, key: str, user: str | None, request: dict[str, str], reply: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(key, user), json.dumps({"request": request, "reply": reply}, allow_nan=False))
        records = []
        for path in self.folder.iterdir():
            if _RECORD.fullmatch(path.name):  # not atomic_write_text's temporary files
                try:
                    records.append((path.stat().st_mtime_ns, path))
                except FileNotFoundError:  # pruned by a concurrent store
                    continue
        for _, old in sorted(records)[: max(0, len(records) - self.capacity)]:
            old.unlink(missing_ok=True)

    async def run(self, key: str, user: str | None, request: dict[str, str],
                  apply: Callable[[], Awaitable[Any]]) -> Any:
        """The reply to the save ``request`` under ``key``: the stored one, the one of a running save with the same key
        (awaited; its failure is this request's too), or ``apply()``'s, which is then stored. ``apply`` runs as a task
        of its own, so a request cancelled meanwhile (its client gone, a shutdown) neither stops the save half-way nor
        lets a retry apply it a second time. Raises :class:`RequestError` for a key longer than :data:`MAX_KEY_CHARS`
        (400) or reused for another request (422); ``apply``'s exceptions propagate (nothing is stored, a later retry
        applies again)."""
        if not key or len(key) > MAX_KEY_CHARS:
            raise RequestError(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters long, got {len(key)}")
        slot = self._path(key, user).name
        running = self._running.get(slot)
        if running is not None:
            _check_same(running[0], request)
            return await asyncio.shield(running[1])
        reply = self.stored(key, user, request)
        if reply is not None:
            return reply

        async def apply_and_store() -> Any:
            try:
                reply = await apply()
                try:
                    await asyncio.to_thread(self._store, key, user, request, reply)
                except (OSError, TypeError, ValueError) as exc:
                    # the save is applied: answer it; only a later retry may apply it again
                    logger.warning("could not record the reply for an Idempotency-Key: %s", exc)
                return reply
            finally:
                self._running.pop(slot, None)

        task = asyncio.ensure_future(apply_and_store())
        self._running[slot] = (request, task)
        return await asyncio.shield(task)


def _check_same(used: dict[str, str], request: dict[str, str]) -> None:
    if used != request:
        raise RequestError("this Idempotency-Key was already used for another label save (another image or tag); "
                           "use a new key for a new save", 422)
