"""Model-backed policies on the tiny offline Qwen2.5-VL: the builder, ``hf:``, ``openai:`` (against a real
``transformers serve`` process) and the ``vllm:`` import error. No network, no downloaded weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from ibisagent.policies.base import Generation, GenerationOptions, PolicyError, PolicyRequest  # noqa: E402
from ibisagent.policies.tiny import (  # noqa: E402
    QWEN_SPECIAL_TOKENS,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    build_tiny_qwen2_5_vl,
    ensure_tiny_model,
)
from ibisagent.protocol import Action, Response, format_response  # noqa: E402

GRAMMAR_TEXT = format_response(
    Response(
        think="The mask misses the lower pole of the left kidney; add a point there and remove the leak.",
        actions=(Action("positive", 0.5123, 0.3012), Action("negative", 0.2100, 0.7, "left kidney")),
    )
) + "\n" + format_response(Response(think="Done.", actions=(Action("terminate"),), answer="not present"))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="module")
def hf_policy(tiny_dir: Path):
    from ibisagent.policies.hf import HFPolicy

    return HFPolicy(tiny_dir, device="cpu")


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _requests() -> list[PolicyRequest]:
    system = {"role": "system", "content": [{"type": "text", "text": "You segment medical images step by step."}]}
    return [
        PolicyRequest(
            [
                system,
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": _image(224, 168, 1)},
                        {"type": "text", "text": "Segment the liver."},
                    ],
                },
            ]
        ),
        PolicyRequest(
            [
                system,
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": _image(112, 112, 2)},
                        {"type": "text", "text": "Segment the pancreatic tumour in this CT slice, please."},
                    ],
                },
            ]
        ),
    ]


def _strip_special(text: str) -> str:
    for tok in QWEN_SPECIAL_TOKENS:
        text = text.replace(tok, "")
    return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- tiny builder


def test_tiny_model_reloads_offline(tiny_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    names = {p.name for p in tiny_dir.iterdir()}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"}
    assert expected <= names
    size = sum(p.stat().st_size for p in tiny_dir.iterdir())
    assert size < 5_000_000, f"tiny model is {size} bytes"
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, local_files_only=True)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(tiny_dir, local_files_only=True)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert processor.image_processor.size["shortest_edge"] == TINY_MIN_PIXELS
    assert processor.image_processor.size["longest_edge"] == TINY_MAX_PIXELS
    tok = processor.tokenizer
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.vision_config.patch_size == 14 and cfg.vision_config.spatial_merge_size == 2
    assert cfg.text_config.vocab_size >= len(tok)


def test_tokenizer_round_trips_grammar_and_splits_digits(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(GRAMMAR_TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == GRAMMAR_TEXT
    pieces = tok.convert_ids_to_tokens(ids)
    for piece in pieces:
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, f"digit merged into token {piece!r}"
    assert len(pieces) < len(GRAMMAR_TEXT) / 2, "BPE learned no useful merges"
    for special in QWEN_SPECIAL_TOKENS:
        sid = tok(special, add_special_tokens=False)["input_ids"]
        assert sid == [tok.convert_tokens_to_ids(special)], special


def test_chat_template_is_qwens(tiny_dir: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Segment the liver."}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Segment the liver.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_qwen2_5_vl(tmp_path / "a", seed=0)
    b = build_tiny_qwen2_5_vl(tmp_path / "b", seed=0)
    c = build_tiny_qwen2_5_vl(tmp_path / "c", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_ensure_tiny_model_builds_once_under_concurrency(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_tiny_model(tmp_path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(results)) == 1
    final = results[0]
    assert [p.name for p in tmp_path.iterdir()] == [final.name], "temporary build directories left behind"
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path) == final
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp, "cached model was rebuilt"


# ----------------------------------------------------------------------------- hf:


def test_hf_image_size_is_the_processors_smart_resize(hf_policy) -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for h, w in [(512, 512), (100, 37), (224, 168), (30, 30), (1000, 300), (57, 85)]:
        rh, rw = hf_policy.image_size(h, w)
        assert rh % 28 == 0 and rw % 28 == 0, (h, w, rh, rw)
        assert TINY_MIN_PIXELS <= rh * rw <= TINY_MAX_PIXELS, (h, w, rh, rw)
        assert (rh, rw) == smart_resize(h, w, factor=28, min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    # An image already at the policy's size is not resized again by the processor: one merged token per 28×28.
    inputs = hf_policy.prepare_inputs(_requests()[:1])
    grid = inputs["image_grid_thw"][0].tolist()
    assert grid == [1, 224 // 14, 168 // 14]


def test_hf_pixel_budget_override(tiny_dir: Path) -> None:
    from ibisagent.policies.hf import HFPolicy

    policy = HFPolicy(tiny_dir, device="cpu", min_pixels=28 * 28, max_pixels=28 * 28 * 4)
    assert policy.image_size(1000, 1000) == (56, 56)
    assert policy.min_pixels == 28 * 28 and policy.max_pixels == 28 * 28 * 4
    inputs = policy.prepare_inputs(_requests()[:1])  # a 224×168 image
    h, w = policy.image_size(224, 168)
    assert (h, w) == (56, 28)
    assert inputs["image_grid_thw"][0].tolist() == [1, h // 14, w // 14]


def test_hf_inputs_carry_mm_token_type_ids(hf_policy) -> None:
    import torch

    inputs = hf_policy.prepare_inputs(_requests())
    assert "mm_token_type_ids" in inputs
    types, ids, mask = inputs["mm_token_type_ids"], inputs["input_ids"], inputs["attention_mask"]
    assert types.shape == ids.shape
    image_id = hf_policy.model.config.image_token_id
    assert torch.equal(types == 1, ids == image_id)
    # left padding: every row ends with real tokens, padding (if any) is at the start
    assert bool(mask[:, -1].all())
    assert int(mask[1].sum()) != int(mask[0].sum())
    # one merged token per 2×2 patches for each image
    per_image = (inputs["image_grid_thw"].prod(dim=1) // 4).tolist()
    assert (types == 1).sum(dim=1).tolist() == per_image
    # the ids change the model's positions (3-D RoPE) — without them the logits differ
    with torch.inference_mode():
        full = hf_policy.model(**inputs).logits
        stripped = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        hf_policy.model.model.rope_deltas = None
        without = hf_policy.model(**stripped).logits
        hf_policy.model.model.rope_deltas = None
    assert not torch.allclose(full[:, -1], without[:, -1])


def test_hf_generate_batch(hf_policy) -> None:
    reqs = _requests()
    out = hf_policy.generate(reqs, GenerationOptions(max_new_tokens=12))
    assert len(out) == 2
    for g in out:
        assert isinstance(g, Generation) and isinstance(g.text, str)
        assert g.prompt_tokens > 0
        assert 1 <= g.completion_tokens <= 12
        assert g.prefill_seconds > 0 and g.decode_seconds >= 0
        assert g.seconds == pytest.approx(g.prefill_seconds + g.decode_seconds)
    assert out[0].prompt_tokens != out[1].prompt_tokens
    # greedy is deterministic, and a request gives the same text batched (left-padded) or alone
    again = hf_policy.generate(reqs, GenerationOptions(max_new_tokens=12))
    assert [g.text for g in again] == [g.text for g in out]
    alone = hf_policy.generate(reqs[1:], GenerationOptions(max_new_tokens=12))
    assert alone[0].text == out[1].text
    assert alone[0].prompt_tokens == out[1].prompt_tokens


def test_hf_sampling_is_seeded(hf_policy) -> None:
    reqs = _requests()[:1]
    a = hf_policy.generate(reqs, GenerationOptions(max_new_tokens=16, temperature=1.0, seed=7))
    b = hf_policy.generate(reqs, GenerationOptions(max_new_tokens=16, temperature=1.0, seed=7))
    c = hf_policy.generate(reqs, GenerationOptions(max_new_tokens=16, temperature=1.0, seed=8))
    assert a[0].text == b[0].text
    assert a[0].text != c[0].text


def test_hf_text_only_and_threads(hf_policy) -> None:
    reqs = [PolicyRequest([{"role": "user", "content": "Is the liver visible? Answer yes or no."}])]
    outputs: list[list[Generation]] = []

    def worker() -> None:
        outputs.append(hf_policy.generate(reqs, GenerationOptions(max_new_tokens=6)))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outputs) == 3
    assert len({o[0].text for o in outputs}) == 1


def test_hf_missing_directory(tmp_path: Path) -> None:
    from ibisagent.policies.hf import HFPolicy

    with pytest.raises(PolicyError, match="does not exist"):
        HFPolicy(tmp_path / "nope")


def test_a_checkpoint_is_run_the_way_its_folder_says_it_was_trained(tiny_dir: Path, tmp_path: Path) -> None:
    import shutil

    from ibisagent.agent import AgentConfig, AgentJob, make_env
    from ibisagent.env import OBSERVATION_FILE, write_observation
    from ibisagent.policies.hf import HFPolicy
    from ibisagent.policies.openai import OpenAIPolicy
    from ibisagent.tools import load_tool

    image = _image(56, 56, 0)
    job = AgentJob(session=load_tool("embedded").encode(image), image=image, instruction="Segment the lesion.",
                   targets=("lesion",))
    plain = HFPolicy(tiny_dir, device="cpu")
    assert plain.observation_settings() == {} and not make_env(plain, job).config.show_points
    trained = tmp_path / "trained"
    shutil.copytree(tiny_dir, trained)
    write_observation(trained, {"show_points": True})
    policy = HFPolicy(trained, device="cpu")
    assert policy.observation_settings() == {"show_points": True}
    assert make_env(policy, job).config.show_points  # no flag needed
    assert not make_env(policy, job, AgentConfig(show_points=False)).config.show_points  # an explicit choice wins
    # served by `vllm serve PATH` / `transformers serve` beside the client, the model name is the folder: same record
    with OpenAIPolicy("http://127.0.0.1:9/v1", str(trained)) as served:
        assert served.observation_settings() == {"show_points": True} and make_env(served, job).config.show_points
    with OpenAIPolicy("http://127.0.0.1:9/v1", "ibisagent-policy") as remote:  # a name, no folder here: none
        assert remote.observation_settings() == {} and not make_env(remote, job).config.show_points
    (trained / OBSERVATION_FILE).write_text('{"observation": {"show_point": true}}')
    with pytest.raises(PolicyError, match="unknown observation setting.*show_point"):
        HFPolicy(trained, device="cpu")
    with pytest.raises(PolicyError, match="openai:.*unknown observation setting"):
        OpenAIPolicy("http://127.0.0.1:9/v1", str(trained))


# ----------------------------------------------------------------------------- openai: against transformers serve


@pytest.fixture(scope="module")
def served_tiny(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real ``transformers serve`` process serving the tiny model on a free loopback port."""
    import httpx

    port = _free_port()
    hf_home = tmp_path_factory.mktemp("hf-home")
    (hf_home / "hub").mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"))
    log = (tmp_path_factory.mktemp("serve-log") / "serve.log").open("w+")
    cmd = [
        sys.executable,
        "-c",
        "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())",
        "serve",
        str(tiny_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"transformers serve not ready after 90 s:\n{log.read()[-3000:]}")
            time.sleep(0.3)
        yield base, str(tiny_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def test_openai_against_transformers_serve(served_tiny, hf_policy) -> None:
    from ibisagent.policies.openai import OpenAIPolicy

    base, model = served_tiny
    reqs = _requests()
    with OpenAIPolicy(base + "/v1", model, timeout=60, concurrency=2) as policy:
        out = policy.generate(reqs, GenerationOptions(max_new_tokens=10))
    assert len(out) == 2
    for g in out:
        assert isinstance(g.text, str)
        assert g.prompt_tokens > 0 and 1 <= g.completion_tokens <= 10
        assert g.decode_seconds > 0
    # the server runs the same weights, template and processor: the same prompt and, greedy, the same text
    local = [hf_policy.generate([r], GenerationOptions(max_new_tokens=10))[0] for r in reqs]
    assert [g.prompt_tokens for g in out] == [g.prompt_tokens for g in local]
    # (transformers serve leaves special tokens in the text, we skip them as vLLM does: compare without them)
    assert [_strip_special(g.text) for g in out] == [g.text for g in local]


def test_openai_streaming_against_transformers_serve(served_tiny) -> None:
    from ibisagent.policies.openai import OpenAIPolicy

    base, model = served_tiny
    with OpenAIPolicy(base, model, timeout=60, stream=True) as policy:  # "/v1" is added to a bare host URL
        assert policy.url == base + "/v1/chat/completions"
        plain = OpenAIPolicy(base, model, timeout=60).generate(_requests()[:1], GenerationOptions(max_new_tokens=8))
        out = policy.generate(_requests()[:1], GenerationOptions(max_new_tokens=8))
    assert _strip_special(out[0].text) == _strip_special(plain[0].text)
    assert out[0].completion_tokens >= 1
    assert out[0].prefill_seconds > 0 and out[0].extra.get("stream") is True


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_openai_reasoning_parser_in_front_of_transformers_serve(served_tiny, stream: bool) -> None:
    """A real reasoning-parser server in front of the real ``transformers serve`` (which has no reasoning parser):
    the model's text comes back in ``content``, reasoning in ``reasoning_content``; the policy rebuilds the turn."""
    from chat_server import ChatServer

    from ibisagent.policies.openai import OpenAIPolicy

    base, model = served_tiny
    thought = "The spot at the bottom left is the lesion."
    options = GenerationOptions(max_new_tokens=8)
    direct = OpenAIPolicy(base, model, timeout=60).generate(_requests()[:1], options)[0].text
    with ChatServer("split", "reasoning_content", upstream=base + "/v1", upstream_reasoning=thought) as front, \
            OpenAIPolicy(front.url, model, timeout=60, stream=stream) as policy:
        out = policy.generate(_requests()[:1], options)[0]
    assert front.requests and front.requests[0]["model"] == model
    if "<think>" in direct:  # the untrained model wrote a think tag itself: its content wins, nothing duplicated
        assert out.text == direct
    else:
        assert out.text == f"<think>\n{thought}\n</think>\n{direct.strip()}"


def test_openai_server_down_raises_policy_error_within_timeout() -> None:
    from ibisagent.policies.openai import OpenAIPolicy

    port = _free_port()  # nothing listens here
    url = f"http://127.0.0.1:{port}/v1"
    policy = OpenAIPolicy(url, "m", timeout=3, retries=2)
    t0 = time.monotonic()
    with pytest.raises(PolicyError) as info:
        policy.generate(_requests()[:1], GenerationOptions(max_new_tokens=4))
    assert time.monotonic() - t0 < 5
    assert url in str(info.value) and "cannot connect" in str(info.value)


def test_openai_stuck_server_raises_policy_error_within_timeout() -> None:
    from ibisagent.policies.openai import OpenAIPolicy

    # A socket that completes TCP handshakes (kernel backlog) but never answers: a hung server.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        policy = OpenAIPolicy(url, "m", timeout=2, retries=3, concurrency=2)
        t0 = time.monotonic()
        with pytest.raises(PolicyError) as info:
            policy.generate(_requests(), GenerationOptions(max_new_tokens=4))
        elapsed = time.monotonic() - t0
    assert elapsed < 4, elapsed
    assert url in str(info.value)


def test_openai_message_conversion() -> None:
    import base64
    import io

    from PIL import Image

    from ibisagent.policies.openai import normalise_base_url, parse_openai_spec, to_openai_messages

    img = _image(28, 56, 3)
    msgs = to_openai_messages(
        [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "hi"}]},
        ]
    )
    assert msgs[0] == {"role": "system", "content": "sys"}
    part = msgs[1]["content"][0]
    assert part["type"] == "image_url"
    url = part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert np.array_equal(decoded, img)
    assert msgs[1]["content"][1] == {"type": "text", "text": "hi"}
    json.dumps(msgs)
    assert parse_openai_spec("http://h:8000/v1#Qwen/Qwen2.5-VL-7B") == ("http://h:8000/v1", "Qwen/Qwen2.5-VL-7B")
    # the one parser of the spec: a bare host gets /v1, the model ends nowhere but the string's end
    assert parse_openai_spec("http://h:8000#org/model#v2") == ("http://h:8000/v1", "org/model#v2")
    assert parse_openai_spec("h:8000/v1/") == ("http://h:8000/v1", "")
    from ibisagent.policies import load_policy

    policy = load_policy("openai:http://h:8000#org/model#v2")
    assert (policy.base_url, policy.model) == ("http://h:8000/v1", "org/model#v2")
    assert load_policy("openai:http://h:8000/v1#m").url == "http://h:8000/v1/chat/completions"
    with pytest.raises(ValueError):
        parse_openai_spec("#model")
    assert normalise_base_url("http://h:8000/") == "http://h:8000/v1"
    assert normalise_base_url("http://h:8000/api/v1/") == "http://h:8000/api/v1"


# ----------------------------------------------------------------------------- vllm:


def test_vllm_missing_gives_clear_error(tiny_dir: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    from ibisagent.policies.vllm import VLLMPolicy

    with pytest.raises(ImportError, match=r"pip install -e '\.\[gpu\]'"):
        VLLMPolicy(tiny_dir)


def test_vllm_pixel_budget_from_checkpoint(tiny_dir: Path) -> None:
    from ibisagent.policies.vllm import checkpoint_pixels

    assert checkpoint_pixels(tiny_dir) == (TINY_MIN_PIXELS, TINY_MAX_PIXELS, 28)


def test_fixed_phrases_are_one_token_each_and_the_text_is_unchanged(tmp_path: Path) -> None:
    from transformers import AutoProcessor

    from ibisagent.env import EnvConfig, SegmentationEnv
    from ibisagent.tools import load_tool
    from ibisagent.train.recipe import prompt_phrases

    phrases = prompt_phrases()
    plain = AutoProcessor.from_pretrained(build_tiny_qwen2_5_vl(tmp_path / "plain", vision_hidden_size=64))
    short = AutoProcessor.from_pretrained(build_tiny_qwen2_5_vl(tmp_path / "short", vision_hidden_size=64,
                                                                phrases=phrases))
    assert short.tokenizer(phrases[0], add_special_tokens=False)["input_ids"] == \
        [short.tokenizer.convert_tokens_to_ids(phrases[0])]  # the system prompt is one token
    # an agent's real second turn (system, overlay, refinement prompt) and its answer: same text, far fewer tokens
    image = np.zeros((56, 56, 3), np.uint8)
    env = SegmentationEnv(image, "Segment the lesion.", ("lesion",), load_tool("embedded").encode(image),
                          policy_grid=(56, 56), config=EnvConfig(max_steps=3))
    env.reset()
    env.step("<think>\nx\n</think>\n<action>\nPositive Point (0.5000, 0.5000)\n</action>")
    messages = [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p else {})}
                                                for p in m["content"]]} for m in env.observation.messages]
    text = short.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == plain.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = short.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert short.tokenizer.decode(ids) == text
    assert len(ids) * 4 < len(plain.tokenizer(text, add_special_tokens=False)["input_ids"])


def _image_token_rotations(model, grid: int):
    """The language model's rotary angles (cos, sin) for each token of a ``grid`` × ``grid`` image: (grid², dim)."""
    import torch

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    positions = torch.stack([torch.zeros(grid * grid, dtype=torch.long), rows.flatten(), cols.flatten()])[:, None, :]
    rotary = model.model.language_model.rotary_emb
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    return torch.cat([cos[0], sin[0]], dim=-1)


@pytest.mark.parametrize("theta", [None, 1_000_000.0])
def test_image_tokens_carry_both_axes_of_position_in_the_language_model(tmp_path: Path, theta) -> None:
    """With the tiny model's RoPE base, two image tokens one row or one column apart get rotary angles that differ
    clearly (≥ 0.1) over the 8 × 8 token grid of a 224 px image; with Qwen's 1e6 base the width axis is invisible —
    why :data:`~ibisagent.policies.tiny.TINY_ROPE_THETA` is not 1e6."""
    from transformers import AutoModelForImageTextToText

    kwargs = {} if theta is None else {"rope_theta": theta}
    model = AutoModelForImageTextToText.from_pretrained(build_tiny_qwen2_5_vl(tmp_path / "m", **kwargs))
    angles = _image_token_rotations(model, 8).reshape(8, 8, -1)
    row_step = (angles[1:] - angles[:-1]).abs().amax(dim=-1)        # one row down, each column
    col_step = (angles[:, 1:] - angles[:, :-1]).abs().amax(dim=-1)  # one column right, each row
    if theta is None:
        assert float(row_step.min()) >= 0.1 and float(col_step.min()) >= 0.1
    else:
        assert float(col_step.max()) < 1e-3
