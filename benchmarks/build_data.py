"""Throughput of the data builders: ``build-sft`` and ``build-rl`` cases per second, and per core, on the sample
manifest (the simulated expert on the ``embedded`` tool), in one process and on a process pool of ``--workers``.

Run: ``.venv/bin/python benchmarks/build_data.py [--workers 2] [--repeat 3] [--reflective 0.5]``

Each build writes into a fresh folder (no resumed parts). The per-core figure of the pool divides by the number of
workers; pool start-up (``spawn`` re-imports the library in every worker) is included, so small inputs understate
what a pool does on a large corpus. The figures are medians over ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
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
                times = []
                for round_ in range(args.repeat):
                    out = folder / f"{name}-{workers}-{round_}"
                    t0 = time.perf_counter()
                    build(out, workers)
                    times.append(time.perf_counter() - t0)
                seconds = statistics.median(times)
                rows.append((name, label, cases / seconds, cases / seconds / workers, seconds))
    print(f"{cases} cases of {args.manifest.name}, reflective {args.reflective}, median of {args.repeat}\n")
    print("| command | engine | cases/s | cases/s per core | seconds |")
    print("|---|---|---|---|---|")
    for name, label, rate, per_core, seconds in rows:
        print(f"| {name} | {label} | {rate:.2f} | {per_core:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
