"""Tool latency benchmarks: what the set-once / query-many split buys, per segmenter.

For every tool spec and image size:

- **encode** — seconds for ``tool.encode(image)`` (median of ``repeats``, after one warm-up);
- **click** — seconds for one ``session.predict(clicks_so_far, prior_logits)`` (median over a
  ``clicks``-long trajectory, ``repeats`` times);
- **click / encode** — the goal for SAM2-tiny is ≤ 5 %;
- **cached / re-encode** — a ``clicks``-click trajectory with the cached encoding over the same trajectory
  re-encoding before every click: ``(encode + n·click) / (n·(encode + click))``; lower is better, ``1/n`` is the
  floor.

Clicks are realistic: the simulator (:func:`ibisagent.clicks.next_click`) places each one against the mask of a
synthetic blob, using the tool's own previous prediction. Models with random weights (``…@random``) give the
latency of the real architecture, not its accuracy.

The embedded tool also gets **cases/s per core**: full simulated oracle trajectories (up to 20 clicks, stop at
IoU ≥ 0.9, encode included) on one thread (``torch.set_num_threads(1)`` and ``threadpoolctl``).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np

from ibisagent.clicks import Click, simulate

DEFAULT_TOOL_SPECS: tuple[str, ...] = (
    "embedded",
    "sam2:configs/sam2.1/sam2.1_hiera_t.yaml@random",
    "medsam2:random",
    "sam:vit_b@random",
)

#: Tools whose throughput (cases/s per core) is measured; the others are far too slow on one core to matter.
THROUGHPUT_TOOLS = ("embedded",)


def synthetic_case(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A gray, noisy image with one bright elliptical blob.

    Returns:
        ``(image, target)``: (size, size, 3) uint8 RGB (three equal channels) and the blob's (size, size) bool mask.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    ry, rx = rng.uniform(0.12, 0.25, 2) * size
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    radius = np.sqrt(u**2 + v**2)
    target = radius < 1.0
    edge = 1.0 / (1.0 + np.exp((radius - 1.0) * 12.0))  # soft boundary
    gray = 60.0 + 110.0 * edge + 12.0 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + rng.normal(0.0, 10.0, (size, size))
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2), target


def simulate_clicks(session: Any, target: np.ndarray, clicks: int) -> list[Click]:
    """Up to ``clicks`` simulated expert clicks against ``target``, each after the tool's prediction from the previous.

    Returns:
        The clicks, in order (fewer when the mask became perfect; at least one for a non-empty target).
    """
    steps, _ = simulate(session, target, iou_stop=1.0, max_clicks=clicks)
    return [step.click for step in steps]


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch, OpenCV (and, with ``threadpoolctl``, BLAS/OpenMP pools) on one thread; restores the previous
    settings."""
    import torch

    previous = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits

        limits: Any = threadpool_limits(limits=1)
    except ImportError:
        limits = nullcontext()
    import cv2  # OpenCV's own thread pool (the embedded tool's filters) ignores OMP_NUM_THREADS

    previous_cv2 = cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(previous)
        cv2.setNumThreads(previous_cv2)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_tool(tool: Any, size: int, clicks: int = 10, repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Encode and per-click latency of one tool at one image size (see the module docstring)."""
    image, target = synthetic_case(size, seed=0)
    session = tool.encode(image)  # warm-up
    _sync(device)
    trajectory = simulate_clicks(session, target, clicks)  # also warms up predict
    encodes: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        session = tool.encode(image)
        _sync(device)
        encodes.append(time.perf_counter() - start)
    per_click: list[float] = []
    for _ in range(repeats):
        prior = None
        for k in range(1, len(trajectory) + 1):
            start = time.perf_counter()
            prior = session.predict(trajectory[:k], prior).logits
            per_click.append(time.perf_counter() - start)
    encode_s = statistics.median(encodes)
    click_s = statistics.median(per_click) if per_click else float("nan")
    return {
        "encode_s": encode_s,
        "click_s": click_s,
        "click_over_encode": click_s / encode_s,
        "cached_over_reencode": (encode_s + clicks * click_s) / (clicks * (encode_s + click_s)),
        "clicks": len(trajectory),
    }


def cases_per_second(
    tool: Any, size: int, cases: int = 8, max_clicks: int = 20, iou_stop: float = 0.9
) -> dict[str, float]:
    """Full oracle trajectories per second on the current thread settings (callers use :func:`single_thread`).

    Each case: encode a synthetic image, click (simulator) until IoU ≥ ``iou_stop`` or ``max_clicks``.

    Returns:
        ``{"cases_per_s": …, "mean_clicks": …, "mean_iou": …}``.
    """

    def run(seed: int) -> tuple[int, float]:
        image, target = synthetic_case(size, seed=seed)
        session = tool.encode(image)
        steps, _ = simulate(session, target, iou_stop=iou_stop, max_clicks=max_clicks)
        return len(steps), steps[-1].iou if steps else 0.0

    run(10_000)  # warm-up
    start = time.perf_counter()
    results = [run(seed) for seed in range(1, cases + 1)]
    elapsed = time.perf_counter() - start
    return {
        "cases_per_s": cases / elapsed,
        "mean_clicks": float(np.mean([n for n, _ in results])),
        "mean_iou": float(np.mean([s for _, s in results])),
    }


def bench_tools(
    specs: Sequence[str] = DEFAULT_TOOL_SPECS,
    sizes: Sequence[int] = (256, 512),
    clicks: int = 10,
    repeats: int = 3,
    *,
    device: str = "cpu",
    cases: int = 8,
) -> list[dict[str, Any]]:
    """Benchmark each tool at each square image size.

    Args:
        specs: tool specs (:func:`ibisagent.tools.load_tool`); a tool whose module cannot be imported is reported
            as skipped, with the reason, instead of failing the run.
        sizes: image sides in pixels.
        clicks: clicks per timed trajectory (and ``n`` of the cached / re-encode ratio).
        repeats: timed repetitions (medians are reported).
        device: torch device for the tools.
        cases: trajectories per size for the cases/s figure (embedded tool only).

    Returns:
        One dict per (tool, size): ``tool`` (spec), ``name``, ``size``, ``device``, ``threads``, ``encode_s``,
        ``click_s``, ``click_over_encode``, ``cached_over_reencode``, ``clicks``, ``cases_per_s_per_core`` (or
        ``None``), ``mean_clicks``/``mean_iou`` of those cases (or ``None``), ``note``.
    """
    import torch

    from ibisagent.tools import load_tool

    rows: list[dict[str, Any]] = []
    for spec in specs:
        try:
            tool = load_tool(spec, device=device)
        except ImportError as exc:
            rows.append({"tool": spec, "name": spec.partition(":")[0], "note": f"skipped: {exc}"})
            continue
        for size in sizes:
            row: dict[str, Any] = {
                "tool": spec,
                "name": tool.name,
                "size": int(size),
                "device": device,
                "threads": torch.get_num_threads(),
                **time_tool(tool, int(size), clicks=clicks, repeats=repeats, device=device),
                "cases_per_s_per_core": None,
                "mean_clicks": None,
                "mean_iou": None,
                "note": "random weights" if spec.endswith("random") else "",
            }
            if tool.name in THROUGHPUT_TOOLS and device == "cpu":
                with single_thread():
                    throughput = cases_per_second(tool, int(size), cases=cases)
                row["cases_per_s_per_core"] = throughput["cases_per_s"]
                row["mean_clicks"] = throughput["mean_clicks"]
                row["mean_iou"] = throughput["mean_iou"]
            rows.append(row)
    return rows


def machine_description() -> str:
    """One line: CPU model, ``os.cpu_count()``, torch threads (and the GPU, if one is visible)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def format_tool_bench(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`bench_tools` rows, followed by the machine it ran on."""
    header = (
        "| tool | px | threads | encode ms | click ms | click/encode | cached/re-encode (n clicks) "
        "| cases/s/core (clicks, IoU) | note |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        if "encode_s" not in row:
            lines.append(f"| {row['tool']} | | | | | | | | {row.get('note', '')} |")
            continue
        throughput = ""
        if row.get("cases_per_s_per_core") is not None:
            throughput = (
                f"{row['cases_per_s_per_core']:.2f} ({row['mean_clicks']:.1f}, {row['mean_iou']:.2f})"
            )
        lines.append(
            f"| {row['tool']} | {row['size']} | {row['threads']} | {1000 * row['encode_s']:.1f} "
            f"| {1000 * row['click_s']:.1f} | {100 * row['click_over_encode']:.1f} % "
            f"| {row['cached_over_reencode']:.3f} ({row['clicks']}) | {throughput} | {row.get('note', '')} |"
        )
    lines.append("")
    lines.append(f"Machine: {machine_description()}.")
    return "\n".join(lines)


def bench_agent(
    policy_spec: str = "tiny",
    size: int = 256,
    steps: int = 4,
    cases: int = 2,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Where an agent step's time goes: policy (prefill, decode), tool, rendering — per history mode.

    Two runs on a synthetic case, both with the ``embedded`` tool:

    - **policy**: ``policy_spec`` (default: the tiny offline Qwen2.5-VL on CPU) for ``steps`` policy calls per case.
      An untrained model rarely writes a valid action, so repairs are allowed for every step: each call is one full
      turn (prompt with the current image, up to 512 new tokens) either way.
    - **loop**: the oracle policy for the same case, whose valid clicks exercise the tool and the overlay rendering
      at every step (its own time is negligible).

    Returns one row per (run, history mode) with per-step and per-case seconds by category.
    """
    from ibisagent.agent import AgentConfig, run_agent
    from ibisagent.policies import load_policy
    from ibisagent.policies.oracle import OraclePolicy
    from ibisagent.tools import load_tool

    tool = load_tool("embedded")
    image, target = synthetic_case(size)
    session = tool.encode(image)
    policy = load_policy(policy_spec, device=device)
    rows: list[dict[str, Any]] = []
    for history in ("off", "full"):
        for run, pol, config in (
            (policy_spec, policy, AgentConfig(max_steps=steps, history=history, repair_retries=steps)),
            ("oracle (tool + render)", OraclePolicy({"target": target}, iou_stop=1.0),
             AgentConfig(max_steps=steps, history=history)),
        ):
            totals: dict[str, float] = {}
            n_steps = 0
            for _ in range(cases):
                trajectory = run_agent(pol, session, image, "Segment the bright blob.", ["target"], config=config)
                for key, value in trajectory.seconds.items():
                    totals[key] = totals.get(key, 0.0) + value
                n_steps += len(trajectory.steps)
            per_step = {k: v / max(n_steps, 1) for k, v in totals.items()}
            rows.append({
                "run": run, "history": history, "cases": cases, "steps_per_case": n_steps / cases,
                "per_step": per_step, "per_case": {k: v / cases for k, v in totals.items()},
            })
    return rows


def format_agent_bench(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`bench_agent` rows (milliseconds)."""
    lines = ["| run | history | steps/case | per step: policy (prefill + decode) | tool | render | per case total |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s, c = r["per_step"], r["per_case"]
        lines.append(
            f"| {r['run']} | {r['history']} | {r['steps_per_case']:.1f} | {1e3 * s.get('policy', 0):.1f} ms "
            f"({1e3 * s.get('prefill', 0):.1f} + {1e3 * s.get('decode', 0):.1f}) | {1e3 * s.get('tool', 0):.1f} ms "
            f"| {1e3 * s.get('render', 0):.1f} ms | {c.get('total', 0):.2f} s |"
        )
    lines.append("")
    lines.append(f"Machine: {machine_description()}")
    return "\n".join(lines)
