"""The teacher path of the reasoning writer against a real OpenAI-compatible server (``transformers serve`` on the
tiny offline Qwen2.5-VL, the same server the policy tests drive): leak filter, retries, disk cache, rate limit, a down
endpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from test_policies_models import _free_port, served_tiny, tiny_dir  # noqa: E402,F401 - the real server fixtures

from ibisagent.cli import main  # noqa: E402
from ibisagent.data.reasoning import RateLimiter, Teacher, TeacherUnavailable, leaks, oracle_view  # noqa: E402
from ibisagent.data.sft import TeacherSpec, build_sft  # noqa: E402
from ibisagent.policies.base import GenerationOptions  # noqa: E402
from ibisagent.policies.openai import OpenAIPolicy  # noqa: E402
from test_data_sft import PIXELS, _files, _manifest  # noqa: E402


def _views() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((56, 56, 3), 90, np.uint8)
    reference = np.zeros((56, 56), bool)
    reference[10:40, 10:40] = True
    current = np.zeros_like(reference)
    current[12:30, 12:30] = True
    return oracle_view(image, current, reference, (0.6, 0.6)), image


OPTIONS = GenerationOptions(max_new_tokens=24, temperature=0.7, seed=0)


def test_teacher_writes_through_a_real_server_and_reuses_the_cache(served_tiny, tmp_path: Path) -> None:
    base, model = served_tiny
    oracle, agent = _views()
    teacher = Teacher(OpenAIPolicy(base, model, timeout=120), tmp_path / "cache", retries=1, per_second=None,
                      options=OPTIONS)
    text = teacher.write(oracle, agent, "Segment the square.", "Positive Point (0.6000, 0.6000)",
                         "The mask misses the lower right part of the square.")
    stats = teacher.stats
    assert 1 <= stats.calls <= 2 and stats.cache_hits == 0
    if text is None:  # the tiny untrained model writes noise: every attempt may be rejected
        assert stats.rejected == 2 and stats.dropped == 1
    else:
        assert leaks(text) == [] and stats.calls == stats.rejected + 1
    assert len(list((tmp_path / "cache").glob("*.json"))) == stats.calls
    # the same requests against a server that is gone: answered from the cache, nothing sent
    dead = Teacher(OpenAIPolicy(f"http://127.0.0.1:{_free_port()}/v1", model, timeout=2), tmp_path / "cache",
                   retries=1, per_second=None, options=OPTIONS)
    again = dead.write(oracle, agent, "Segment the square.", "Positive Point (0.6000, 0.6000)",
                       "The mask misses the lower right part of the square.")
    assert again == text and dead.stats.calls == 0 and dead.stats.cache_hits == stats.calls


def test_leaky_replies_are_retried_then_dropped_and_counted(tmp_path: Path) -> None:
    oracle, agent = _views()
    teacher = Teacher(OpenAIPolicy(f"http://127.0.0.1:{_free_port()}/v1", "m", timeout=2), tmp_path, retries=2,
                      per_second=None, options=OPTIONS)
    messages = teacher.messages(oracle, agent, "Segment the square.", "Negative Point (0.1000, 0.1000)", "draft")
    replies = ["The red region is over-segmented, so the correct action is a negative point.",
               "Compared with the ground truth the mask is too large.",
               "The FP pixels in the corner must go."]
    for attempt, reply in enumerate(replies):  # what a teacher once answered, in its cache
        path = tmp_path / f"{teacher.key(messages, teacher.attempt_options(attempt))}.json"
        path.write_text(json.dumps({"model": "m", "text": reply}))
    assert teacher.write(oracle, agent, "Segment the square.", "Negative Point (0.1000, 0.1000)", "draft") is None
    assert teacher.stats.as_dict() == {"calls": 0, "cache_hits": 3, "rejected": 3, "dropped": 1,
                                       "reasons": {"TP/FP/FN": 1, "ground truth": 1, "oracle colour": 1,
                                                   "the correct action": 1}}
    # one clean reply among them is taken at once
    (tmp_path / f"{teacher.key(messages, teacher.attempt_options(1))}.json").write_text(
        json.dumps({"model": "m", "text": "The mask spills past the upper left edge of the square into fat."}))
    assert teacher.write(oracle, agent, "Segment the square.", "Negative Point (0.1000, 0.1000)",
                         "draft") == "The mask spills past the upper left edge of the square into fat."


def test_rate_limit_spaces_requests() -> None:
    limiter = RateLimiter(per_second=20)
    t0 = time.monotonic()
    for _ in range(6):
        limiter.wait()
    assert time.monotonic() - t0 >= 0.25
    with pytest.raises(ValueError):
        RateLimiter(per_second=0)


def test_build_sft_with_a_teacher_then_from_its_cache_alone(served_tiny, tmp_path: Path) -> None:
    base, model = served_tiny
    manifest = _manifest(tmp_path)
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:2]) + "\n")  # two single-target cases keep it short
    trajectories = tmp_path / "traj.jsonl"
    assert main(["simulate", str(manifest), "--out", str(trajectories), "--max-steps", "4", "--no-progress"]) == 0
    spec = TeacherSpec(url=base, model=model, cache_dir=str(tmp_path / "cache"), per_second=None, retries=1,
                       max_new_tokens=24)
    stats = build_sft(trajectories, tmp_path / "a", manifest=manifest, teacher=spec, max_pixels=PIXELS,
                      progress=False)
    assert stats["teacher"]["calls"] >= stats["qas"] >= 4
    assert stats["teacher"]["calls"] == stats["teacher"]["rejected"] + stats["qas"] - stats["teacher"]["dropped"]
    for row in datasets.load_from_disk(str(tmp_path / "a")):
        for message in row["messages"]:
            if message["role"] == "assistant":
                assert leaks(message["content"][0]["text"]) == []
    # the endpoint is down now: a new build of the same data is answered from the cache, byte for byte
    down = TeacherSpec(url=f"http://127.0.0.1:{_free_port()}/v1", model=model, cache_dir=spec.cache_dir,
                       per_second=None, retries=1, max_new_tokens=24, timeout=2)
    again = build_sft(trajectories, tmp_path / "b", manifest=manifest, teacher=down, max_pixels=PIXELS,
                      progress=False)
    assert again["teacher"]["calls"] == 0 and again["teacher"]["cache_hits"] >= stats["teacher"]["calls"]
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json", "rows.jsonl"):
        assert a[name] == b[name], name  # the counters in stats.json differ: calls then, cache hits now


def test_down_teacher_stops_the_run_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _manifest(tmp_path)
    trajectories = tmp_path / "traj.jsonl"
    assert main(["simulate", str(manifest), "--out", str(trajectories), "--max-steps", "4", "--no-progress"]) == 0
    url = f"http://127.0.0.1:{_free_port()}/v1"
    spec = TeacherSpec(url=url, model="m", cache_dir=str(tmp_path / "cache"), per_second=None, timeout=2)
    with pytest.raises(TeacherUnavailable, match="cannot connect"):
        build_sft(trajectories, tmp_path / "sft", teacher=spec, max_pixels=PIXELS, progress=False)
    capsys.readouterr()
    code = main(["build-sft", str(trajectories), "--out", str(tmp_path / "cli"), "--teacher", f"openai:{url}#m",
                 "--max-pixels", str(PIXELS), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and url in err and "teacher endpoint failed" in err and "cached" in err
