"""`huahua worker`: serves one engine over HTTP (the protocol is described in core.engines.http)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from typing import Any

from aiohttp import web

from core.engine import CancelToken, Engine
from core.engines.http import SECRET_HEADER, error_to_wire, image_to_wire, request_from_wire
from core.errors import EngineUnavailable, HuahuaError, InvalidOption, JobCancelled
from core.images import validate_upload
from core.listening import start_site
from core.logs import http_error_logger, rate_limited_logger
from core.settings import Settings

logger = logging.getLogger(__name__)
refusals = rate_limited_logger(f"{__name__}.refused")
"""Anyone on the network can cause these lines, so at most one a minute (with a count of the rest)."""
http_errors = http_error_logger(f"{__name__}.http")
"""aiohttp's own lines (malformed requests, handler failures): one line each, rate limited."""

ENGINE_KEY = web.AppKey("engine", Engine)
SECRET_KEY = web.AppKey("secret", bytes)
STATE_KEY = web.AppKey("state", dict)
MAX_BODY_BYTES = 32 * 1024 * 1024
DISCONNECT_POLL_S = 0.1

STATUS_BY_ERROR: dict[type[HuahuaError], int] = {
    InvalidOption: 400,
    EngineUnavailable: 503,
    JobCancelled: 499,
}


def _status_for(exc: HuahuaError) -> int:
    for cls, status in STATUS_BY_ERROR.items():
        if isinstance(exc, cls):
            return status
    return 500


def _error_response(exc: HuahuaError) -> web.Response:
    return web.json_response(error_to_wire(exc), status=_status_for(exc))


@web.middleware
async def _require_secret(request: web.Request, handler: Any) -> web.StreamResponse:
    secret = request.app[SECRET_KEY]
    if secret:
        # digests of equal length, so the comparison's time says nothing about the secret, not even its length
        given = hashlib.sha256(_given_secret(request)).digest()
        if not hmac.compare_digest(given, hashlib.sha256(secret).digest()):
            refusals.warning("refused a request from %s: wrong or missing secret", request.remote)
            return web.json_response(
                {"type": "error", "code": "not_allowed", "message": "Wrong or missing worker secret."},
                status=401,
            )
    response: web.StreamResponse = await handler(request)
    return response


def _given_secret(request: web.Request) -> bytes:
    """The secret header's raw bytes (any bytes, UTF-8 or not); empty when missing or sent twice."""
    wanted = SECRET_HEADER.lower().encode("ascii")
    values = [value for name, value in request.raw_headers if name.lower() == wanted]
    return values[0] if len(values) == 1 else b""


async def _health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    info = await engine.health()
    state = request.app[STATE_KEY]
    load = dict(info.get("load") or {})
    load["requests"] = state["active"]
    return web.json_response({**info, "load": load})


async def _generate(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error_response(InvalidOption("The request body is not valid JSON."))
    except web.HTTPRequestEntityTooLarge:
        return _error_response(InvalidOption("The request body is too large."))
    try:
        gen_request = request_from_wire(body)
        if gen_request.init_image is not None:
            # sizes from the header first; the one decode runs off the event loop
            await asyncio.to_thread(validate_upload, gen_request.init_image)
    except InvalidOption as exc:
        return _error_response(exc)

    engine = request.app[ENGINE_KEY]
    state = request.app[STATE_KEY]
    cancel = CancelToken()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_progress(step: int, total: int) -> None:
        events.put_nowait({"type": "progress", "step": step, "total": total})

    state["active"] += 1
    task = asyncio.create_task(engine.generate(gen_request, on_progress, cancel))
    response: web.StreamResponse | None = None
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({task, getter}, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
            if _client_gone(request):
                raise ConnectionResetError
            if getter.done() and not getter.cancelled():
                response = response or await _open_stream(request)
                await _write(response, getter.result())
                continue
            if task.done():
                break
        while not events.empty():
            response = response or await _open_stream(request)
            await _write(response, events.get_nowait())
        try:
            images = task.result()
        except HuahuaError as exc:
            if response is None:
                return _error_response(exc)
            await _write(response, error_to_wire(exc))
            return response
        response = response or await _open_stream(request)
        await _write(response, {"type": "result", "images": [image_to_wire(i) for i in images]})
        await response.write_eof()
        return response
    except (ConnectionResetError, asyncio.CancelledError):
        logger.info("client went away; cancelling its generation")
        cancel.cancel()
        raise
    finally:
        state["active"] -= 1
        if not task.done():
            cancel.cancel()
            with contextlib.suppress(HuahuaError, asyncio.CancelledError):
                await task


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    return response


async def _write(response: web.StreamResponse, line: dict[str, Any]) -> None:
    await response.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")


SERVER_OPTIONS: dict[str, Any] = {"handler_cancellation": True, "logger": http_errors}
"""How `serve_worker` runs the app (`web.AppRunner(app, **SERVER_OPTIONS)`; tests use the same)."""


def create_app(engine: Engine, *, secret: str | None = None) -> web.Application:
    """The worker's aiohttp application; the caller starts and closes the engine."""
    app = web.Application(middlewares=[_require_secret], client_max_size=MAX_BODY_BYTES)
    app[ENGINE_KEY] = engine
    app[SECRET_KEY] = secret.encode() if secret else b""
    app[STATE_KEY] = {"active": 0}
    app.router.add_get("/v1/health", _health)
    app.router.add_post("/v1/generate", _generate)
    return app


async def serve_worker(settings: Settings, *, engine: Engine | None = None) -> None:
    """Run `huahua worker` until cancelled: load the engine, then serve it on worker_host:worker_port."""
    from core.engines.factory import build_local_engine

    engine = engine or build_local_engine(settings)
    secret = settings.worker_secret.get_secret_value() if settings.worker_secret else None
    if not secret and settings.worker_host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the worker listens on %s without HUAHUA_WORKER_SECRET", settings.worker_host)
    await engine.start()
    runner = web.AppRunner(create_app(engine, secret=secret), **SERVER_OPTIONS)
    await runner.setup()
    try:
        await start_site(
            runner,
            settings.worker_host,
            settings.worker_port,
            what="The worker",
            settings="HUAHUA_WORKER_HOST and HUAHUA_WORKER_PORT",
        )
        where = f"{settings.worker_host}:{settings.worker_port}"
        logger.info("worker serving engine %s on %s", engine.name, where)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await engine.close()
