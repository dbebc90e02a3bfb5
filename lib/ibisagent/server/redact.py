"""Server paths out of what a client sees: one scrubber (:class:`ServerPaths`) for error replies, JSON replies and the
texts the app builds, over the server's folders (temporary folder, studies, app, home, installation) and the
paths and addresses its ``--conf`` options name (checkpoints, training data, a policy server's address).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ibisagent.specs import spec_locations

#: ``--conf`` options that hold a policy or tool spec.
SPEC_OPTIONS = ("policy", "tool")
#: ``--conf`` options that hold comma-separated file paths.
PATH_OPTIONS = ("train_trajectories", "train_manifest")


def conf_locations(conf: Mapping[str, Any]) -> list[str]:
    """The roots to hide for the server's ``--conf`` options (:data:`SPEC_OPTIONS`, :data:`PATH_OPTIONS`): the folder
    of each path they name (so the path reads ``<server>/NAME`` and a file beside it is hidden too; the path itself
    when its folder is ``/``; nothing for a bare name) and the address of a policy server."""
    found: list[str] = []
    for key in SPEC_OPTIONS:
        found += spec_locations(str(conf.get(key) or ""))
    for key in PATH_OPTIONS:
        found += [p.strip() for p in str(conf.get(key) or "").split(",") if p.strip()]
    roots = []
    for location in found:
        if "://" in location:
            roots.append(location)
            continue
        folder = os.path.dirname(location.rstrip("/"))
        if folder:  # a bare name (``hf:policy`` run from its folder) shows no server path
            # a relative path is hidden as the absolute one it names: its bare folder word (``models``) is also an
            # ordinary word of replies (``/info``'s "models" key) and is not a server path on its own
            absolute = os.path.abspath(location if folder == "/" else folder)
            roots.append(absolute)
    return roots


class ServerPaths:
    """Replaces every occurrence of the given roots (and anything below them) with ``<server>`` (plus the file name):
    ``/srv/studies/x/img.nii.gz`` → ``<server>/img.nii.gz``. Roots of one character (``/``) are ignored; relative
    roots are taken as the absolute paths they name (a bare relative word is not a path to hide)."""

    def __init__(self, roots: Iterable[str]) -> None:
        roots = [str(r) for r in roots if r]
        found = {os.path.realpath(r) for r in roots if "://" not in r}
        found |= {r.rstrip("/") for r in roots if "://" in r or os.path.isabs(r)}
        found = {r for r in found if len(r) > 1}
        parts = sorted(found, key=len, reverse=True)
        # a root counts only as a whole path: not inside a longer name, and followed by "/…" or a delimiter
        self._pattern = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(p) for p in parts)
                                   + r")(?:(/[^\s'\",;)\]]*)|(?![\w.-]))") if parts else None

    def scrub(self, text: str) -> str:
        """``text`` with the roots replaced."""
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: "<server>/" + os.path.basename(m.group(2) or "") if m.group(2)
                                 else "<server>", text)

    def scrub_json(self, value: Any) -> Any:
        """A JSON-like value (dicts, lists, strings, numbers) with every string (keys included) scrubbed."""
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {self.scrub(k) if isinstance(k, str) else k: self.scrub_json(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub_json(v) for v in value]
        return value
