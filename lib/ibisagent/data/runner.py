"""Run one per-case function over many cases: in this process, on a local process pool, or on a Ray cluster —
resumable, with a progress bar.

The SFT and RL builders (:mod:`ibisagent.data.sft`, :mod:`ibisagent.data.rl`) cut their input into *tasks* (one
per case: a picklable dict with a unique ``"key"``) and give a module-level function ``task → part`` (a picklable
dict). The runner stores each part as soon as it is done in ``WORK/<key>.pkl`` (written atomically by the driving
process), so a killed run started again skips the finished tasks; since a part depends only on its task (seeds are
derived from the case, never from the order of work), the assembled result equals that of an uninterrupted run.

Engines (no home-made scheduler): ``local`` (``workers`` = 1: in this process; more: a ``multiprocessing`` pool
started with ``spawn``) and ``ray`` (a Ray Data pipeline, ``ray.data.from_items(tasks).map(fn)``: ``ray.init()``
joins the cluster named by ``RAY_ADDRESS`` or starts a local instance). Tasks and parts travel pickled, so the same
function runs unchanged on every engine.

``WORK/config.json`` holds the build settings; a work folder made with other settings is refused rather than mixed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from ibisagent.fileio import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

Engine = Literal["local", "ray"]
Task = dict[str, Any]
Part = dict[str, Any]

CONFIG_FILE = "config.json"


def prepare_work_dir(work: str | os.PathLike[str], config: dict[str, Any]) -> Path:
    """Create ``work`` or check that the parts already in it were made with ``config``.

    Raises:
        ValueError: ``work`` holds parts of a build with other settings (the message lists the differing keys).
    """
    path = Path(work)
    path.mkdir(parents=True, exist_ok=True)
    stored = path / CONFIG_FILE
    text = json.dumps(config, sort_keys=True, indent=1, default=str) + "\n"
    if stored.is_file():
        old = json.loads(stored.read_text(encoding="utf-8"))
        new = json.loads(text)
        if old != new:
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"{path} holds the parts of a build with other settings ({', '.join(keys)}); "
                             "use another --out or delete that folder to start over")
    else:
        atomic_write_text(stored, text)
    return path


def _part_path(work: Path, key: str) -> Path:
    return work / f"{key}.pkl"


def _call(fn: Callable[[Task], Part], blob: bytes) -> bytes:
    return pickle.dumps(fn(pickle.loads(blob)), protocol=pickle.HIGHEST_PROTOCOL)


class _Apply:
    """``task blob → part blob`` around a module-level function (picklable for process pools and Ray)."""

    def __init__(self, fn: Callable[[Task], Part]) -> None:
        self.fn = fn

    def __call__(self, item: tuple[str, bytes]) -> tuple[str, bytes]:
        return item[0], _call(self.fn, item[1])

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"key": row["key"], "part": _call(self.fn, row["task"])}


def _results(pending: list[Task], fn: Callable[[Task], Part], engine: Engine,
             workers: int) -> Iterator[tuple[str, bytes]]:
    apply = _Apply(fn)
    items = [(t["key"], pickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL)) for t in pending]
    if engine == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": max(1, workers)}),
                     log_to_driver=False)
        data = ray.data.from_items([{"key": k, "task": b} for k, b in items], override_num_blocks=max(1, len(items)))
        for row in data.map(apply.row).iter_rows():
            yield str(row["key"]), bytes(row["part"])
        return
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield apply(item)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=workers) as pool:
        yield from pool.imap_unordered(apply, items, chunksize=1)


def run_tasks(tasks: Sequence[Task], fn: Callable[[Task], Part], work: str | os.PathLike[str], *,
              engine: Engine = "local", workers: int = 1, progress: bool = True, desc: str = "cases") -> list[Part]:
    """Run ``fn`` on every task whose part is not in ``work`` yet, store each part as it finishes, and return all
    parts in task order.

    Args:
        tasks: picklable dicts, each with a unique file-name-safe ``"key"``.
        fn: a module-level function ``task → part`` (picklable dict); an exception in it stops the run (finished
            parts stay in ``work``).
        work: the folder of finished parts (see :func:`prepare_work_dir`).
        engine: ``"local"`` or ``"ray"``.
        workers: processes of the local pool (1 = this process); for Ray, the CPUs of a local instance.
        progress: show a tqdm bar.

    Raises:
        ValueError: duplicate task keys or an unknown engine.
    """
    if engine not in ("local", "ray"):
        raise ValueError(f"unknown engine {engine!r}; expected 'local' or 'ray'")
    keys = [str(t["key"]) for t in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError("task keys must be unique")
    work_dir = Path(work)
    pending = [t for t in tasks if not _part_path(work_dir, str(t["key"])).is_file()]
    if len(pending) < len(tasks):
        log.info("resuming: %d of %d cases already done in %s", len(tasks) - len(pending), len(tasks), work_dir)
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc=desc, unit="case", disable=not progress)
    try:
        for key, blob in _results(pending, fn, engine, workers):
            atomic_write_bytes(_part_path(work_dir, key), blob)
            bar.update(1)
    finally:
        bar.close()
    return [pickle.loads(_part_path(work_dir, key).read_bytes()) for key in keys]


__all__ = ["Engine", "Part", "Task", "prepare_work_dir", "run_tasks"]
