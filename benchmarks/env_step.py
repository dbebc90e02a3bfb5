"""Cost of one environment step without the policy: the oracle policy + the ``embedded`` tool on a synthetic 256 px
case, per history mode; optionally several library versions side by side (to check a refactor of the loop).

Run: ``.venv/bin/python benchmarks/env_step.py [--lib DIR ...] [--cases 30] [--rounds 3]``

Each ``--lib`` (default: this checkout's ``lib``) runs in its own subprocess, alternating round by round, so the
versions share the machine's state; the report gives per-step milliseconds (wall time of ``run_agent`` per step,
and the loop's own share: tool + overlay + bookkeeping, i.e. total minus policy time) as the median over rounds and the
ratio of each version to the first. The oracle's own time is the policy share and is left out of the loop figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
from ibisagent.agent import AgentConfig, run_agent
from ibisagent.bench import synthetic_case
from ibisagent.policies.oracle import OraclePolicy
from ibisagent.tools import load_tool
cases = int(sys.argv[1])
image, target = synthetic_case(256)
session = load_tool("embedded").encode(image)
out = {}
for history in ("off", "full"):
    config = AgentConfig(max_steps=8, history=history)
    def once():
        return run_agent(OraclePolicy({"target": target}, iou_stop=1.0), session, image, "Segment the blob.",
                         ["target"], config=config)
    once()
    steps, loop, t0 = 0, 0.0, time.perf_counter()
    for _ in range(cases):
        trajectory = once()
        steps += len(trajectory.steps)
        loop += trajectory.seconds["total"] - trajectory.seconds["policy"]
    out[history] = {"total_ms": 1e3 * (time.perf_counter() - t0) / steps, "loop_ms": 1e3 * loop / steps}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", action="append", help="library source root to measure (repeatable)")
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    libs = args.lib or [str(Path(__file__).resolve().parents[1] / "lib")]
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    for _ in range(args.rounds):
        for lib in libs:
            env = {**os.environ, "PYTHONPATH": lib}
            done = subprocess.run([sys.executable, "-c", CHILD, str(args.cases)], env=env, capture_output=True,
                                  text=True, check=True)
            runs[lib].append(json.loads(done.stdout))
    print(f"Machine: {os.cpu_count()} CPUs; {args.cases} cases x {args.rounds} rounds; medians over rounds\n")
    print("| library | history | ms per step (total) | ms per step (loop) | total ÷ first |")
    print("|---|---|---|---|---|")
    for history in ("off", "full"):
        first = statistics.median(r[history]["total_ms"] for r in runs[libs[0]])
        for lib in libs:
            total = statistics.median(r[history]["total_ms"] for r in runs[lib])
            loop = statistics.median(r[history]["loop_ms"] for r in runs[lib])
            print(f"| {lib} | {history} | {total:.2f} | {loop:.2f} | {total / first:.2f} |")


if __name__ == "__main__":
    main()
