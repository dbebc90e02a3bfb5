"""``openai:URL#MODEL`` — any OpenAI-compatible chat-completions server (vLLM, ``transformers serve``, SGLang, …).

Images go as PNG data URLs in ``image_url`` parts, so the server needs no access to our files. A batch runs as
concurrent HTTP requests on a small thread pool (servers that batch — vLLM — batch them). Each request has one
overall deadline, ``timeout`` seconds from its start (or the earlier :attr:`GenerationOptions.deadline`), that covers
connecting, every retry and reading the whole reply: a server that is down, stuck or dripping its reply one byte at a
time yields a :class:`PolicyError` naming the URL at the deadline, never a hang. (httpx's own timeouts are per read:
a reply that keeps trickling never trips them, so each exchange runs on an I/O thread the caller stops waiting for at
the deadline; that thread drops the connection at its next chunk.)

With ``stream=True`` the reply is read as server-sent events and the time to the first content chunk is reported as
``prefill_seconds`` (the rest as ``decode_seconds``); without streaming the whole latency is ``decode_seconds`` and
``prefill_seconds`` is 0.

Servers started with a reasoning parser (``vllm serve --reasoning-parser …``, SGLang's ``--reasoning-parser``) split the
``<think>`` block out of the reply into ``message.reasoning_content`` (streamed: ``delta.reasoning_content``; newer
vLLM and some gateways name it ``reasoning``, Ollama ``thinking``) and leave the rest in ``content``.
:func:`rebuild_turn` puts the turn back together in the action grammar, so a split reply parses as the unsplit one.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ibisagent.policies.base import (
    Conversation,
    Generation,
    GenerationOptions,
    Policy,
    PolicyError,
    PolicyRequest,
    checkpoint_observation,
)

logger = logging.getLogger(__name__)

#: HTTP statuses worth retrying (rate limit, server overload or restart).
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


#: Reply fields that carry the split-out reasoning, in the order they are read (vLLM < 0.10 and SGLang; vLLM ≥ 0.10
#: and OpenRouter; Ollama).
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_TURN_TAGS = ("<action>", "<answer>")


def parse_openai_spec(rest: str) -> tuple[str, str]:
    """``URL#MODEL`` (the part after ``openai:``) → ``(base_url, model)``, the one parser of this spec.

    The URL ends at the first ``#`` (a URL's fragment means nothing to an API), so a model name may itself contain
    ``#``. The model may be empty (the server's default model). The base URL is normalised by
    :func:`normalise_base_url` (``/v1`` added to a bare host, kept when given).

    Raises:
        ValueError: no URL.
    """
    url, sep, model = rest.partition("#")
    if not url.strip():
        raise ValueError(f"openai policy spec needs a URL: 'openai:URL#MODEL', got 'openai:{rest}'")
    return normalise_base_url(url), model.strip() if sep else ""


def _strip_think_tags(text: str) -> str:
    return text.replace(_THINK_OPEN, "").replace(_THINK_CLOSE, "").strip()


def rebuild_turn(content: str | None, reasoning: str | None) -> str:
    """The model's whole turn from a reasoning-parser reply: ``<think>reasoning</think>`` followed by ``content``.

    Handles every shape servers produce:

    - no reasoning: ``content`` unchanged;
    - the split shape (reasoning without tags, the action in ``content``): joined;
    - the think block in both fields (servers that also echo it): ``content`` is kept, the copy is not repeated;
    - ``content`` empty, everything in the reasoning (the model never closed ``</think>``, so the parser kept the
      action inside the reasoning): split at the first ``<action>`` / ``<answer>`` tag;
    - ``content`` starting after a lone ``</think>`` (chat templates that open ``<think>`` in the prompt).

    Args:
        content: ``message.content`` (or the joined ``delta.content``); ``None`` counts as empty.
        reasoning: the reasoning field's text; ``None`` or empty when the server has no reasoning parser.

    Returns:
        One string in the action grammar (:mod:`ibisagent.protocol`), for the lenient parser.
    """
    content = content or ""
    reasoning = reasoning or ""
    if not reasoning.strip():
        if _THINK_CLOSE in content and _THINK_OPEN not in content:
            return _THINK_OPEN + "\n" + content.strip()
        return content
    if _THINK_OPEN in content:  # the think block is in the content already: the reasoning is a copy
        return content
    think = _strip_think_tags(reasoning)
    rest = content
    if _THINK_CLOSE in rest:  # "…more reasoning</think><action>…"
        more, _, rest = rest.partition(_THINK_CLOSE)
        think = (think + "\n" + more.strip()).strip()
    if not rest.strip():
        cuts = [i for i in (think.find(tag) for tag in _TURN_TAGS) if i >= 0]
        if cuts:
            cut = min(cuts)
            think, rest = think[:cut].strip(), think[cut:]
    return f"{_THINK_OPEN}\n{think}\n{_THINK_CLOSE}\n{rest.strip()}"


def reasoning_of(message: dict[str, Any]) -> str:
    """The split-out reasoning of a reply ``message`` or stream ``delta`` (the first of :data:`REASONING_FIELDS` that
    holds text), or ``""``."""
    for name in REASONING_FIELDS:
        value = message.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def normalise_base_url(url: str) -> str:
    """``http://host:8000`` → ``http://host:8000/v1``; a URL with a path is kept as given (minus a trailing slash)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        url = url + "/v1"
    return url


def image_data_url(image: Any) -> str:
    """An (H, W, 3) uint8 array (or a PIL image) → ``data:image/png;base64,…``."""
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise PolicyError(f"images must be (H, W, 3) uint8, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        pil = Image.fromarray(arr[..., :3])
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: Conversation) -> list[dict[str, Any]]:
    """HF-style messages with numpy images → OpenAI chat messages with ``image_url`` data-URL parts."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str) or content is None:
            out.append({"role": msg["role"], "content": content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type")
            if kind == "image" or (kind is None and "image" in part):
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(part["image"])}})
            elif kind == "image_url":
                parts.append({"type": "image_url", "image_url": part["image_url"]})
            elif kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise PolicyError(f"openai policy: unsupported message part type {kind!r}")
        out.append({"role": msg["role"], "content": parts})
    return out


class OpenAIPolicy(Policy):
    """A policy behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added when the URL has no path).
        model: the served model name (``vllm serve`` uses the checkpoint path unless ``--served-model-name``). When
            it is a checkpoint folder on this machine (``vllm serve PATH`` / ``transformers serve`` beside the
            client), the observation settings that folder records are applied, as for ``hf:PATH``
            (:meth:`observation_settings`); a name that is no local folder records none.
        api_key: bearer token; default ``$OPENAI_API_KEY``, else ``"EMPTY"`` (what local servers expect).
        timeout: seconds per request, all retries included.
        retries: extra attempts after a connection error, a timeout or a retryable status (429, 5xx).
        concurrency: requests of one batch in flight at once.
        stream: read replies as server-sent events to measure the time to the first token.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        concurrency: int = 4,
        stream: bool = False,
    ) -> None:
        import httpx

        self.base_url = normalise_base_url(base_url)
        self.model = model
        self.name = f"openai:{self.base_url}#{model}"
        if model and Path(model).is_dir():
            self.observation = checkpoint_observation(model, self.name)
            if self.observation:
                logger.info("%s: observing as the folder %s records: %s", self.name, model, self.observation)
        self.url = self.base_url + "/chat/completions"
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.concurrency = max(1, int(concurrency))
        self.stream = stream
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "EMPTY")
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        self._pool: ThreadPoolExecutor | None = None
        self._io_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @classmethod
    def from_spec(cls, rest: str, **kwargs: Any) -> OpenAIPolicy:
        """From the part of a policy spec after ``openai:`` (``URL#MODEL``)."""
        url, model = parse_openai_spec(rest)
        return cls(url, model, **kwargs)

    def close(self) -> None:
        with self._pool_lock:
            for pool in (self._pool, self._io_pool):
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._io_pool = None
        self._client.close()

    def __enter__(self) -> OpenAIPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[PolicyRequest], options: GenerationOptions) -> list[Generation]:
        if not requests:
            return []
        bodies = [self._body(req.messages, options) for req in requests]
        deadline = time.monotonic() + self.timeout
        if options.deadline is not None:
            deadline = min(deadline, options.deadline)
        if len(bodies) == 1 or self.concurrency == 1:
            return [self._complete(b, deadline) for b in bodies]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-policy")
            pool = self._pool
        futures = [pool.submit(self._complete, b, deadline) for b in bodies]
        return [f.result() for f in futures]

    def _body(self, messages: Conversation, options: GenerationOptions) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_openai_messages(messages),
            "max_tokens": int(options.max_new_tokens),
            "temperature": float(options.temperature),
        }
        if options.temperature > 0:
            body["top_p"] = float(options.top_p)
        if options.seed is not None:
            body["seed"] = int(options.seed)
        if self.stream:
            body["stream"] = True
        return body

    def _complete(self, body: dict[str, Any], deadline: float) -> Generation:
        """One request, all retries included, returning by ``deadline`` (``time.monotonic()``) or raising."""
        import httpx

        start = time.monotonic()
        last: str = "no attempt made"
        for attempt in range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return self._attempt(body, deadline)
            except _StatusError as exc:
                last = str(exc)
                if exc.status not in RETRY_STATUSES:
                    raise PolicyError(f"{self.name}: {self.url} answered {last}") from None
            except httpx.TimeoutException as exc:
                last = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                last = f"cannot connect ({type(exc).__name__}: {exc})"
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise PolicyError(f"{self.name}: unexpected reply from {self.url}: {exc}") from exc
            if attempt < self.retries:
                pause = min(0.5 * 2**attempt + random.uniform(0, 0.25), max(0.0, deadline - time.monotonic()))
                time.sleep(pause)
        waited = time.monotonic() - start
        raise PolicyError(
            f"{self.name}: no reply from {self.url} after {waited:.1f} s "
            f"({self.retries + 1} attempts at most, timeout {self.timeout:g} s): {last}"
        )

    def _attempt(self, body: dict[str, Any], deadline: float) -> Generation:
        """One HTTP exchange on an I/O thread; the caller waits no later than ``deadline``."""
        import httpx

        with self._pool_lock:
            if self._io_pool is None:
                self._io_pool = ThreadPoolExecutor(max_workers=2 * self.concurrency, thread_name_prefix="openai-io")
            pool = self._io_pool
        future = pool.submit(self._exchange, body, deadline)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            future.cancel()
            raise httpx.ReadTimeout("no complete reply by the deadline") from None

    def _exchange(self, body: dict[str, Any], deadline: float) -> Generation:
        """POST ``body`` and read the whole reply, giving up at ``deadline`` (checked between received chunks)."""
        import httpx

        remaining = max(0.001, deadline - time.monotonic())
        timeout = httpx.Timeout(remaining, connect=min(remaining, 10.0))
        if self.stream:
            return self._complete_stream(body, timeout, deadline)
        t0 = time.perf_counter()
        chunks: list[bytes] = []
        with self._client.stream("POST", self.url, json=body, timeout=timeout) as resp:
            for chunk in resp.iter_bytes():
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("reply exceeded the request deadline")
                chunks.append(chunk)
        elapsed = time.perf_counter() - t0
        data = b"".join(chunks)
        if resp.status_code != 200:
            raise _StatusError(resp.status_code, data[:500].decode("utf-8", "replace"))
        return self._parse(json.loads(data), elapsed)

    def _parse(self, data: dict[str, Any], elapsed: float) -> Generation:
        if "choices" not in data:
            raise KeyError(f"no 'choices' in {json.dumps(data)[:300]}")
        choice = data["choices"][0]
        message = choice["message"]
        text = rebuild_turn(message.get("content"), reasoning_of(message))
        usage = data.get("usage") or {}
        return Generation(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            prefill_seconds=0.0,
            decode_seconds=elapsed,
            extra={"finish_reason": choice.get("finish_reason"), "model": data.get("model")},
        )

    def _complete_stream(self, body: dict[str, Any], timeout: Any, deadline: float) -> Generation:
        t0 = time.perf_counter()
        first: float | None = None
        pieces: list[str] = []
        thoughts: list[str] = []
        chunks = 0
        usage: dict[str, Any] = {}
        finish = None
        model = None
        with self._client.stream("POST", self.url, json=body, timeout=timeout) as resp:
            if resp.status_code != 200:
                resp.read()
                raise _StatusError(resp.status_code, resp.text[:500])
            for line in resp.iter_lines():
                if time.monotonic() > deadline:
                    import httpx

                    raise httpx.ReadTimeout("stream exceeded the request deadline")
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                model = data.get("model", model)
                usage = data.get("usage") or usage
                for choice in data.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text, thought = delta.get("content"), reasoning_of(delta)
                    if text or thought:
                        if first is None:
                            first = time.perf_counter()
                        pieces.append(text or "")
                        thoughts.append(thought)
                        chunks += 1
                    finish = choice.get("finish_reason") or finish
        t1 = time.perf_counter()
        first = first if first is not None else t1
        return Generation(
            text=rebuild_turn("".join(pieces), "".join(thoughts)),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or chunks),
            prefill_seconds=first - t0,
            decode_seconds=t1 - first,
            extra={"finish_reason": finish, "model": model, "stream": True},
        )


class _StatusError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
