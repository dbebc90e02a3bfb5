"""A real, minimal OpenAI-compatible chat server for tests: replies in the shapes model servers with a reasoning parser
use (``vllm serve --reasoning-parser …``, SGLang), which ``transformers serve`` cannot produce.

It is an HTTP server on a free loopback port (``http.server``, one thread per request), speaking
``POST /v1/chat/completions`` with and without ``"stream": true`` (server-sent events, ``data: {…}`` chunks and
``data: [DONE]``), exactly as the policy meets such servers. Replies come either from a script (a list of whole model
turns, answered in order and repeating the last) or from an upstream server (``transformers serve``), whose text is
passed through with a reasoning field added in front.

Shapes (``shape``):

- ``"plain"``: the whole turn in ``content`` (a server without a reasoning parser);
- ``"split"``: the ``<think>`` block's text in the reasoning field, the rest in ``content`` (vLLM / SGLang);
- ``"all-in-reasoning"``: everything in the reasoning field, ``content`` null (the model never closed ``</think>``);
- ``"both"``: the think text in the reasoning field and the whole turn, tags included, in ``content`` as well.

``field`` names the reasoning field: ``reasoning_content`` (vLLM < 0.10, SGLang), ``reasoning`` (vLLM ≥ 0.10),
``thinking`` (Ollama).
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)

SHAPES = ("plain", "split", "all-in-reasoning", "both")


def split_turn(text: str, shape: str) -> tuple[str | None, str]:
    """A whole turn → ``(content, reasoning)`` as a server of ``shape`` would send them."""
    match = _THINK.match(text)
    think, rest = (match.group(1).strip(), text[match.end():]) if match else ("", text)
    if shape == "plain":
        return text, ""
    if shape == "split":
        return rest, think
    if shape == "all-in-reasoning":
        return None, (think + "\n" + rest).strip()
    if shape == "both":
        return text, think
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


class ChatServer:
    """Start with ``with ChatServer(...) as server:``; ``server.url`` is the API root (``…/v1``).

    Args:
        shape: one of :data:`SHAPES`.
        field: the reasoning field's name.
        turns: scripted whole turns, answered in order (the last one repeats).
        upstream: instead of a script, an OpenAI-compatible root (``http://host:port/v1``) whose reply ``content``
            is passed through as ``content``, with ``upstream_reasoning`` in the reasoning field.
        upstream_reasoning: the reasoning text added to upstream replies.
    """

    def __init__(self, shape: str = "split", field: str = "reasoning_content", turns: list[str] | None = None,
                 upstream: str | None = None, upstream_reasoning: str = "") -> None:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}")
        if (turns is None) == (upstream is None):
            raise ValueError("give either turns or upstream")
        self.shape, self.field, self.turns = shape, field, list(turns or [])
        self.upstream, self.upstream_reasoning = upstream, upstream_reasoning
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ replies

    def _reply(self, body: dict[str, Any]) -> tuple[str | None, str]:
        with self._lock:
            index = len(self.requests)
            self.requests.append(body)
        if self.upstream is None:
            text = self.turns[min(index, len(self.turns) - 1)]
            return split_turn(text, self.shape)
        import httpx

        data = httpx.post(self.upstream + "/chat/completions", json={**body, "stream": False}, timeout=120).json()
        return data["choices"][0]["message"].get("content") or "", self.upstream_reasoning

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self.send_error(404)
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                content, reasoning = server._reply(body)
                model = body.get("model", "")
                if body.get("stream"):
                    self._stream(model, content, reasoning)
                else:
                    message: dict[str, Any] = {"role": "assistant", "content": content}
                    if server.shape != "plain" or reasoning:
                        message[server.field] = reasoning
                    self._json({"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                                "model": model, "choices": [{"index": 0, "message": message,
                                                             "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}})

            def _json(self, data: dict[str, Any]) -> None:
                raw = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _stream(self, model: str, content: str | None, reasoning: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()

                def send(delta: dict[str, Any], finish: str | None = None) -> None:
                    chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": model,
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()

                send({"role": "assistant", "content": ""})
                for i in range(0, len(reasoning), 5):  # reasoning first, in small pieces, as vLLM streams it
                    send({server.field: reasoning[i:i + 5], "content": None})
                text = content or ""
                for i in range(0, len(text), 5):
                    send({"content": text[i:i + 5]})
                send({}, "stop")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        return Handler
