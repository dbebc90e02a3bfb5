"""A thin ASGI layer around MONAI Label's FastAPI app (``monailabel.app.app``, 0.8.5) for a server a hospital can
expose. MONAI Label is not changed; this layer

* runs ``POST /infer/{model}`` off the event loop on a bounded worker pool (``--conf infer_workers N``, up to
  ``infer_queue`` waiting, then 503), so ``/info`` and every other request stay fast while models work; checks
  ``params`` (a JSON object, no server-set or ``ibisagent_*`` keys), the model name, the image id (a plain datastore
  name; an upload or a session image is marked as server-written, see :data:`limits.SERVER_INPUT`) before any work;
* saves labels and images (``PUT /datastore/label``, ``PUT /datastore/image``) off the event loop too, deleting the
  uploaded temporary file whatever happens (MONAI Label leaves it behind when the datastore rejects it); a retried
  label save with the same ``Idempotency-Key`` header gets the first reply again instead of being applied twice —
  also while the first is still running and after a restart (:mod:`ibisagent.server.idempotency`);
* refuses request bodies above ``max_upload_mb`` with 413 before reading them;
* closes ``/logs`` to everyone when authentication is off (MONAI Label's admin role guards it when on), and closes
  the whole-dataset download, ``/reload`` and model-file uploads (``PUT``/``DELETE /model/…``);
* allows browser origins only from ``--conf cors_origins`` (plus the server's own origin): other origins get 403 and
  no CORS headers (MONAI Label answers any origin, with credentials);
* removes server paths (temporary folder, studies, app, home, and the checkpoints, data and policy server the
  ``--conf`` options name) from error replies and JSON replies.

Annotations are evaluated at run time here (no ``from __future__ import annotations``): FastAPI reads the route
signatures.
"""

import asyncio
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from ibisagent.server.idempotency import IdempotentReplies
from ibisagent.server.limits import (
    SERVER_INPUT,
    SERVER_INPUT_KEY,
    UPLOAD_EXTENSIONS,
    RequestError,
    ServerOptions,
    check_params,
)
from ibisagent.server.redact import ServerPaths, conf_locations

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]*$")


def check_plain_name(value: str, what: str) -> str:
    """An image id or label tag: letters, digits, ``. _ + -``, no ``..`` (400 otherwise)."""
    if not _NAME.match(value or "") or ".." in value or len(value) > 255:
        raise RequestError(f"invalid {what} {value!r}: use letters, digits and . _ + - only (no path separators)")
    return value


def upload_suffix(filename: str | None) -> str:
    """The accepted file type of an uploaded file name (``.nii.gz`` …); 415 for anything else."""
    name = (filename or "").lower()
    for ext in UPLOAD_EXTENSIONS:
        if name.endswith(ext):
            return ext
    raise RequestError(f"unsupported file type {os.path.basename(filename or '')!r}: send one of "
                       f"{', '.join(UPLOAD_EXTENSIONS)}", 415)


class Guard:
    """ASGI middleware: blocked paths, origin policy, body size limit, path-free error and JSON replies."""

    def __init__(self, app: ASGIApp, options: ServerOptions, paths: ServerPaths, auth_enabled: bool) -> None:
        self.app = app
        self.options = options
        self.paths = paths
        self.auth_enabled = auth_enabled
        self.max_body = options.max_upload_mb * 1024 * 1024

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        blocked = self._blocked(path, scope.get("method", "GET"))
        if blocked:
            await _json(send, 403, blocked)
            return
        origin = headers.get("origin")
        cross = origin is not None and origin.rstrip("/") != _own_origin(scope, headers)
        if cross and origin.rstrip("/") not in self.options.origins:
            await _json(send, 403, f"origin {origin!r} is not allowed (server option cors_origins)")
            return
        if cross and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(send, origin, headers)
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _json(send, 413, f"request body of {int(length)} bytes is larger than the limit of "
                                   f"{self.options.max_upload_mb} MiB")
            return
        await self.app(scope, self._limited(receive), self._replying(send, origin if cross else None))

    def _blocked(self, path: str, method: str) -> str | None:
        p = path.rstrip("/")
        if p.startswith("/model") and method in ("PUT", "POST", "DELETE"):
            return "model files cannot be uploaded or deleted over HTTP on this server"
        if p == "/logs" or p.startswith("/logs/"):
            return None if self.auth_enabled else "server logs are not served when authentication is off"
        if p == "/datastore/dataset":
            return "the whole-dataset download is disabled on this server"
        if p == "/reload":
            return "reload is disabled on this server"
        return None

    async def _preflight(self, send: Send, origin: str, headers: dict[str, str]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            *_cors_headers(origin),
            (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, HEAD, OPTIONS"),
            (b"access-control-allow-headers", headers.get("access-control-request-headers", "").encode("latin-1")),
            (b"access-control-max-age", b"600"), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise RequestError(f"request body larger than {self.options.max_upload_mb} MiB", 413)
            return message

        return wrapped

    def _replying(self, send: Send, origin: str | None) -> Send:
        held: dict[str, Any] = {}
        body: list[bytes] = []

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                if origin is not None:
                    kept += _cors_headers(origin)
                message = {**message, "headers": kept}
                content_type = {k.lower(): v for k, v in kept}.get(b"content-type", b"")
                if message["status"] >= 400 or content_type.startswith(b"application/json"):
                    held["start"] = message  # errors and JSON replies (/info, infer results) are scrubbed
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and "start" in held:
                body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                text = self.paths.scrub(b"".join(body).decode("utf-8", "replace")).encode("utf-8")
                start = held.pop("start")
                start["headers"] = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                start["headers"].append((b"content-length", str(len(text)).encode()))
                await send(start)
                await send({"type": "http.response.body", "body": text})
                return
            await send(message)

        return wrapped


def _own_origin(scope: Scope, headers: dict[str, str]) -> str:
    host = headers.get("host", "")
    return f"{scope.get('scheme', 'http')}://{host}".rstrip("/")


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"), (b"vary", b"Origin")]


async def _json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------------------------------
# the app


class _Pools:
    """The bounded worker pools and the count of infer requests admitted (running or waiting)."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.infer = ThreadPoolExecutor(options.infer_workers, thread_name_prefix="ibisagent-infer")
        self.save = ThreadPoolExecutor(2, thread_name_prefix="ibisagent-save")
        self.admitted = 0
        self._replies: IdempotentReplies | None = None

    def replies(self) -> IdempotentReplies:
        """The label-save replies by ``Idempotency-Key``, kept in the app's data folder (created on first use: the
        app instance exists only once the server has started)."""
        if self._replies is None:
            from monailabel.interfaces.utils.app import app_instance

            self._replies = IdempotentReplies(Path(app_instance().data_dir) / "idempotency")
        return self._replies

    def shutdown(self) -> None:
        self.infer.shutdown(wait=False, cancel_futures=True)
        self.save.shutdown(wait=False, cancel_futures=True)


@contextmanager
def upload_copy(upload: Any, name: str) -> Iterator[str]:
    """The path of ``upload`` (a FastAPI ``UploadFile``) copied as ``name`` into a fresh temporary folder, which is
    removed on leaving, whatever happens (MONAI Label leaves uploads behind when its datastore rejects them)."""
    folder = tempfile.mkdtemp(prefix="ibisagent-upload-")
    try:
        path = os.path.join(folder, name)
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def build_app(options: ServerOptions | None = None) -> Any:
    """The served ASGI app: this layer's routes and :class:`Guard` in front of MONAI Label's app (imported here, so
    MONAI Label's settings must be final — the start command sets them from its arguments and the environment)."""
    from fastapi import BackgroundTasks, Depends, FastAPI, File, Form, Request, UploadFile
    from monailabel.app import app as monai_app
    from monailabel.config import settings
    from monailabel.endpoints.infer import ResultType, send_response
    from monailabel.endpoints.user.auth import RBAC, User
    from monailabel.interfaces.utils.app import app_instance

    options = options or ServerOptions.from_conf({k: str(v) for k, v in (settings.MONAI_LABEL_APP_CONF or {}).items()})
    pools = _Pools(options)

    @asynccontextmanager
    async def lifespan(_: Any) -> Any:
        instance = app_instance()  # as MONAI Label's own lifespan (not run for a mounted app)
        instance.server_mode(True)
        instance.on_init_complete()
        logger.info("serving with %s", options.as_info())
        yield
        pools.shutdown()

    outer = FastAPI(title=settings.MONAI_LABEL_PROJECT_NAME, lifespan=lifespan, docs_url=None, redoc_url=None,
                    openapi_url=None)

    async def in_pool(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @outer.post("/infer/{model}")
    async def infer(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile | None = File(None),
        label: UploadFile | None = File(None),
        output: ResultType | None = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ) -> Any:
        values = check_params(params)
        instance = app_instance()
        models = instance.info().get("models", {})
        if model not in models:
            raise RequestError(f"unknown model {model!r}; this server has {', '.join(sorted(models))}", 404)
        if output == ResultType.dicom_seg:
            raise RequestError("output=dicom_seg is not available; ask result_extension '.dcm' instead")
        if label is not None:
            raise RequestError("a label upload is not used by this server's models")
        if not (image or file or session_id):
            raise RequestError("send an input: an image id (image=...), a file, or a session_id")
        request: dict[str, Any] = {"model": model, "image": image}
        upload_dir = None
        if file is not None:
            suffix = upload_suffix(file.filename)
            upload_dir = tempfile.mkdtemp(prefix="ibisagent-upload-")
            request["image"] = os.path.join(upload_dir, "input" + suffix)
            with open(request["image"], "wb") as out:
                shutil.copyfileobj(file.file, out)
            request[SERVER_INPUT_KEY] = SERVER_INPUT
        elif session_id:
            sessions = instance.sessions()
            if sessions is None:
                raise RequestError("sessions are not enabled on this server", 406)
            session = sessions.get_session(session_id)
            if not session:
                raise RequestError(f"session {session_id!r} not found", 404)
            request["image"] = session.image
            request[SERVER_INPUT_KEY] = SERVER_INPUT
        else:
            check_plain_name(image, "image id")
        request.update(instance.info().get("config", {}).get("infer", {}))
        request.update(values)
        limit = options.infer_workers + options.infer_queue
        if pools.admitted >= limit:
            if upload_dir:
                shutil.rmtree(upload_dir, ignore_errors=True)
            raise RequestError(f"the server is busy ({limit} infer requests running or waiting); retry later", 503)
        pools.admitted += 1
        try:
            result = await in_pool(pools.infer, instance.infer, request)
        finally:
            pools.admitted -= 1
            if upload_dir:
                shutil.rmtree(upload_dir, ignore_errors=True)
        return send_response(instance.datastore(), result, output, background_tasks)

    @outer.put("/datastore/label")
    async def save_label(
        request: Request,
        image: str,
        params: str = Form("{}"),
        tag: str = "final",
        label: UploadFile = File(...),
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
    ) -> Any:
        check_plain_name(image, "image id")
        check_plain_name(tag or "final", "label tag")
        info = check_params(params)
        suffix = upload_suffix(label.filename)
        username = getattr(user, "username", None)

        async def apply() -> Any:
            with upload_copy(label, "label" + suffix) as path:
                return await in_pool(pools.save, _save_label, app_instance(), image, path, tag or "final", info,
                                     username)

        key = request.headers.get("idempotency-key")
        if key is None:
            return await apply()
        return await pools.replies().run(key, username, {"image": image, "tag": tag or "final"}, apply)

    async def add_image(image: str | None, params: str, file: UploadFile, user: Any) -> Any:
        suffix = upload_suffix(file.filename)
        image_id = image or os.path.basename(file.filename or "")[: -len(suffix)]
        check_plain_name(image_id, "image id")
        info = check_params(params)
        if getattr(user, "username", None):
            info["user"] = user.username
        with upload_copy(file, "image" + suffix) as path:
            added = await in_pool(pools.save, lambda: app_instance().datastore().add_image(image_id, path, info))
        return {"image": added}

    @outer.put("/datastore/image")
    async def put_image(image: str | None = None, params: str = Form("{}"), file: UploadFile = File(...),
                        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))) -> Any:
        return await add_image(image, params, file, user)

    @outer.put("/datastore/", include_in_schema=False)
    async def put_image_legacy(image: str | None = None, params: str = Form("{}"), file: UploadFile = File(...),
                               user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))) -> Any:
        return await add_image(image, params, file, user)

    outer.mount("/", monai_app)
    roots = [tempfile.gettempdir(), settings.MONAI_LABEL_STUDIES, settings.MONAI_LABEL_APP_DIR, str(Path.home()),
             sys.prefix, str(Path(__file__).resolve().parents[3]),
             *conf_locations(settings.MONAI_LABEL_APP_CONF or {})]
    return Guard(outer, options, ServerPaths(roots), settings.MONAI_LABEL_AUTH_ENABLE)


def _save_label(instance: Any, image: str, path: str, tag: str, info: dict[str, Any], user: str | None) -> Any:
    """What MONAI Label's ``PUT /datastore/label`` does (``monailabel.endpoints.datastore.save_label``)."""
    if user:
        info = {**info, "user": user}
    label_id = instance.datastore().save_label(image, path, tag, info)
    reply = instance.on_save_label(image, label_id) or {}
    reply.update({"image": image, "label": label_id})
    return reply
