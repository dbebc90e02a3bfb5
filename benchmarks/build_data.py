"""Throughput of the data builders: ``build-sft`` and ``build-rl`` cases per second, and per core, on the sample
manifest (the simulated expert on the ``embedded`` tool), in one process and on a process pool of ``--workers``.

Run: ``.venv/bin/python benchmarks/build_data.py [--workers 2] [--repeat 3] [--reflective 0.5]``

Each build writes into a fresh folder (no resumed parts). ``cases/s`` is wall clock; ``cases per CPU-second`` divides
by the CPU time of this process and its workers (``resource.getrusage``), i.e. the throughput of one fully used core,
which stays meaningful on a shared machine. Pool start-up (``spawn`` re-imports the library in every worker) is
included, so a small input understates what a pool does on a large corpus. Medians over ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from ibisagent.data.rl import build_rl  # noqa: E402
from ibisagent.data.sft import build_sft  # noqa: E402
from ibisagent.data.trajectory import write_trajectories  # noqa: E402
from ibisagent.evaluate import run_oracle  # noqa: E402
from ibisagent.tools import load_tool  # noqa: E402


def _cpu() -> float:
    """CPU seconds (user + system) of this process and of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "sample_data" / "manifest.jsonl")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reflective", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records, _ = run_oracle(args.manifest, load_tool("embedded"), progress=False)
        trajectories = write_trajectories(folder / "traj.jsonl", records)
        cases = len({r.id for r in records})
        rows = []
        for label, workers in (("1 process", 1), (f"pool of {args.workers}", args.workers)):
            for name, build in (
                ("build-sft", lambda out, w: build_sft(trajectories, out, manifest=args.manifest, workers=w,
                                                       reflective=args.reflective, progress=False)),
                ("build-rl", lambda out, w: build_rl(args.manifest, out, workers=w, progress=False)),
            ):
                times, cpus = [], []
                for round_ in range(args.repeat):
                    out = folder / f"{name}-{workers}-{round_}"
                    c0, t0 = _cpu(), time.perf_counter()
                    build(out, workers)
                    times.append(time.perf_counter() - t0)
                    cpus.append(_cpu() - c0)
                seconds, cpu = statistics.median(times), statistics.median(cpus)
                rows.append((name, label, cases / seconds, cases / cpu, seconds))
    print(f"{cases} cases of {args.manifest.name}, reflective {args.reflective}, median of {args.repeat}\n")
    print("| command | engine | cases/s (wall) | cases per CPU-second | seconds |")
    print("|---|---|---|---|---|")
    for name, label, rate, per_core, seconds in rows:
        print(f"| {name} | {label} | {rate:.2f} | {per_core:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
