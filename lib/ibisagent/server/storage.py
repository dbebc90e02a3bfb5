"""Files the server writes and unpacks, made safe against kills and crafted input.

* :class:`AtomicLocalDatastore` — MONAI Label's local datastore (``monailabel.datastore.local.LocalDatastore``, 0.8.5)
  with its index ``datastore_v2.json`` written atomically (temporary file, ``fsync``, rename) instead of in place, and
  a start-up that rebuilds the index from the studies folder when it finds it empty or corrupt (a kill during an
  in-place write of older versions leaves it empty; MONAI Label then refuses every start).
* :func:`check_archive` / :class:`SafeSessions` — an archive is unpacked only when every member stays inside the
  target folder (Python's ``tarfile.data_filter`` rules: no absolute names, no ``..``, no links out, no devices);
  MONAI Label's session upload (``PUT /session/?uncompress=true``) otherwise extracts ``../x`` anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

from monailabel.datastore.local import LocalDatastore, LocalDatastoreModel
from monailabel.utils.sessions import Sessions

from ibisagent.fileio import atomic_write_text
from ibisagent.server.limits import RequestError

logger = logging.getLogger(__name__)

#: MONAI Label's index file name inside the studies folder.
INDEX_NAME = "datastore_v2.json"


def quarantine_corrupt_index(studies: str | os.PathLike[str], name: str = INDEX_NAME) -> Path | None:
    """If ``studies/name`` exists but is empty or not a valid datastore index, rename it aside
    (``name.corrupt-<unix time>``) and return the new path, so that the datastore rebuilds the index from the image and
    label files (label file names are kept; label metadata such as the saving user is lost). Leftover temporary
    files of an interrupted atomic write are removed. Returns ``None`` when the index is fine or absent."""
    folder = Path(studies)
    for leftover in folder.glob(f".{name}.*.tmp*"):
        leftover.unlink(missing_ok=True)
    path = folder / name
    if not path.is_file():
        return None
    try:
        LocalDatastoreModel.model_validate_json(path.read_text(encoding="utf-8"))
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        reason = "empty" if path.stat().st_size == 0 else f"corrupt ({str(exc).splitlines()[0]})"
    aside = path.with_name(f"{name}.corrupt-{int(time.time())}")
    os.replace(path, aside)
    logger.warning("%s is %s: moved to %s; rebuilding the index from the studies folder", path, reason, aside.name)
    return aside


class AtomicLocalDatastore(LocalDatastore):
    """``LocalDatastore`` whose index survives a kill at any moment (see the module docstring)."""

    def __init__(self, datastore_path: str, *args: Any, **kwargs: Any) -> None:
        quarantine_corrupt_index(datastore_path, kwargs.get("datastore_config", INDEX_NAME))
        super().__init__(datastore_path, *args, **kwargs)

    def _update_datastore_file(self, lock: bool = True) -> None:
        from filelock import FileLock

        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write_text(self._datastore_config_path, text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


# ----------------------------------------------------------------------------------------------------------------
# archives


def check_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Raise :class:`RequestError` (400) unless every member of the tar or zip ``archive`` would land inside ``dest``
    (and, for tar, is a plain file or folder by ``tarfile.data_filter``'s rules). Not an archive: nothing to check."""
    dest = os.path.realpath(dest)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                try:
                    tarfile.data_filter(member, dest)
                except tarfile.FilterError as exc:
                    raise RequestError(f"archive refused: member {member.name!r} ({type(exc).__name__})") from None
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                target = os.path.realpath(os.path.join(dest, name))
                if os.path.isabs(name) or not (target + os.sep).startswith(dest + os.sep):
                    raise RequestError(f"archive refused: member {name!r} would be written outside its folder")


class SafeSessions(Sessions):
    """MONAI Label's sessions, unpacking uploaded archives only after :func:`check_archive` passed."""

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id: Any = None) -> Any:
        if uncompress and os.path.isfile(data_file):
            check_archive(data_file, self.store_path)
        return super().add_session(data_file, expiry, uncompress, session_id)

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True) -> Any:
        """The session, or ``None`` for an id that is not a plain name (no way out of the session folder)."""
        if not isinstance(session_id, str) or not session_id or os.path.basename(session_id) != session_id \
                or session_id in (".", ".."):
            return None
        return super().get_session(session_id, update_ts, fetch_cache)
