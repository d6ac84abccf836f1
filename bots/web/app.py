"""The local web chat: one static page and the JSON + server-sent-events API it calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from core import presenter
from core.errors import (
    EngineUnavailable,
    HuahuaError,
    NotAllowed,
    NotFound,
    QueueFull,
    QuotaExceeded,
    ServiceUnavailable,
    TooManyJobs,
)
from core.service import Huahua, MessageContext
from core.settings import Settings
from core.types import Action, EventType, Job, JobEvent, JobStatus

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 * 1024
MAX_NAME_LENGTH = 64
HEARTBEAT_S = 15.0
IMAGE_CACHE = "public, max-age=31536000, immutable"
PLATFORM = "web:"

SERVICE_KEY: web.AppKey[Huahua] = web.AppKey("service", Huahua)
HEARTBEAT_KEY: web.AppKey[float] = web.AppKey("heartbeat", float)

_DIGEST = re.compile(r"[0-9a-f]{64}")
_STATUS_BY_ERROR: tuple[tuple[type[HuahuaError], int], ...] = (
    (NotFound, 404),
    (NotAllowed, 403),
    (QuotaExceeded, 429),
    (TooManyJobs, 429),
    (QueueFull, 429),
    (EngineUnavailable, 503),
    (ServiceUnavailable, 503),
)
_EVENT_STATUS = {
    EventType.QUEUED: JobStatus.QUEUED,
    EventType.POSITION: JobStatus.QUEUED,
    EventType.STARTED: JobStatus.RUNNING,
    EventType.PROGRESS: JobStatus.RUNNING,
}


class BadRequest(Exception):
    """Malformed HTTP input (not JSON, wrong types); the message is one sentence for the user."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


# serialisation ---------------------------------------------------------------------------------


def image_url(digest: str) -> str:
    return f"/images/{digest}.png"


def job_json(job: Job, position: int | None = None) -> dict[str, Any]:
    """The job as the page and the API clients see it."""
    request = job.request
    return {
        "id": job.id,
        "status": job.status.value,
        "progress": round(job.progress, 4),
        "position": position,
        "prompt_zh": request.prompt,
        "params": {
            "width": request.width,
            "height": request.height,
            "steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "seed": request.seed,
            "n": request.n,
            "sampler": request.sampler,
            "negative_prompt": request.negative_prompt,
        },
        "images": [image_url(digest) for digest in job.images],
        "error": job.error,
        "caption": presenter.describe(job),
        "label": job.engine_label,
        "kind": job.kind.value,
        "parent_id": job.parent_id,
    }


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


# input parsing ---------------------------------------------------------------------------------


async def _read_object(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadRequest("That request is too large.", status=413)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest("That request is too large.", status=413) from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The request body must be a JSON object.") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    return data


def _text_field(data: dict[str, Any], name: str, *, max_length: int | None = None) -> str:
    value = data.get(name)
    if value is None:
        raise BadRequest(f"The field {name!r} is missing.")
    if not isinstance(value, str):
        raise BadRequest(f"The field {name!r} must be text.")
    if max_length is not None and len(value) > max_length:
        raise BadRequest(f"The field {name!r} must be at most {max_length} characters.")
    return value


def _name_field(data: dict[str, Any], name: str) -> str:
    """A user or room name: short, printable, no surrounding spaces; returned with the web: prefix."""
    value = _text_field(data, name, max_length=MAX_NAME_LENGTH).strip()
    if not value or not value.isprintable():
        raise BadRequest(f"The field {name!r} must be a short printable name.")
    return PLATFORM + value


# handlers --------------------------------------------------------------------------------------


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    health = await service.engine.health()
    return web.json_response(
        {
            "ok": bool(health.get("ready", True)),
            "engine": service.engine.name,
            "label": service.engine.label,
            "queue": await service.queue.size(),
        }
    )


async def post_message(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    data = await _read_object(request)
    chat = _name_field(data, "chat")
    user = _name_field(data, "user")
    text = _text_field(data, "text")
    if not text.strip():
        raise BadRequest("Type a message first.")
    reply = await service.handle_message(chat, user, text, MessageContext(is_admin=True))
    job = None
    if reply.job is not None:
        job = job_json(reply.job, await service.position(reply.job.id))
    return web.json_response({"replies": list(reply.texts), "job": job})


async def get_job(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    job = await service.get_job(request.match_info["job_id"])
    return web.json_response(job_json(job, await service.position(job.id)))


async def post_action(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    data = await _read_object(request)
    action = _text_field(data, "action")
    if action not in {a.value for a in Action}:
        raise BadRequest("The action must be reroll, variation, upscale or cancel.")
    index = data.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise BadRequest("The field 'index' must be a whole number.")
    user = _name_field(data, "user")
    job = await service.act(request.match_info["job_id"], action, index, user)
    return web.json_response(job_json(job, await service.position(job.id)))


async def get_image(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    digest = request.match_info["digest"]
    if not _DIGEST.fullmatch(digest):
        raise NotFound("There is no image with that id.")
    path = service.store.image_path(digest)
    if not path.is_file():
        raise NotFound("That image is no longer stored.")
    return web.FileResponse(path, headers={"Cache-Control": IMAGE_CACHE, "Content-Type": "image/png"})


async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events of one job until its final event, with heartbeat comments in between."""
    service = request.app[SERVICE_KEY]
    job = await service.get_job(request.match_info["job_id"])
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    heartbeat = request.app[HEARTBEAT_KEY]
    checked = False
    try:
        async with contextlib.aclosing(_with_heartbeats(service.subscribe(job.id), heartbeat)) as events:
            async for event in events:
                if event is None:
                    await response.write(b": keep-alive\n\n")
                    continue
                if not checked and not event.type.final:
                    event = await _catch_up(service, job.id, event)
                checked = True
                job = await _job_after(service, job, event)
                payload = json.dumps(job_json(job, event.position), ensure_ascii=False)
                await response.write(f"event: {event.type.value}\ndata: {payload}\n\n".encode())
                if event.type.final:
                    break
    except ConnectionResetError:
        logger.debug("event stream client for job %s went away", job.id)
    return response


async def _catch_up(service: Huahua, job_id: str, first: JobEvent) -> JobEvent:
    """Once subscribed, make sure the job did not end between the snapshot and the subscription.

    `Huahua.subscribe` reads the job's state before its queue is registered with the event bus, so a
    final event published in between would be lost and the stream would never close.
    """
    latest = await service.get_job(job_id)
    if not latest.status.finished:
        return first
    return JobEvent(job_id, EventType(latest.status.value), progress=latest.progress, error=latest.error)


async def _job_after(service: Huahua, job: Job, event: JobEvent) -> Job:
    """The job as of `event`: final events re-read the store (images, error); others update in place."""
    if event.type.final:
        return await service.get_job(job.id)
    return replace(job, status=_EVENT_STATUS.get(event.type, job.status), progress=event.progress)


async def _with_heartbeats(
    events: AsyncIterator[JobEvent], interval: float
) -> AsyncIterator[JobEvent | None]:
    """Yield events as they come and None after every `interval` seconds of silence."""
    inbox: asyncio.Queue[JobEvent | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for event in events:
                inbox.put_nowait(event)
            inbox.put_nowait(None)
        except Exception as exc:
            inbox.put_nowait(exc)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(inbox.get(), interval)
            except TimeoutError:
                yield None
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


# errors ----------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Core errors become 4xx JSON with their sentence; anything unexpected a logged, generic 500."""
    try:
        return await handler(request)
    except BadRequest as err:
        return _error(err.message, err.status)
    except HuahuaError as err:
        status = next((code for kind, code in _STATUS_BY_ERROR if isinstance(err, kind)), 400)
        return _error(err.message, status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.reason or "That request could not be handled.", exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("unexpected error on %s %s", request.method, request.path)
        return _error("Something went wrong on the server; please try again.", 500)


# the application -------------------------------------------------------------------------------


def create_app(service: Huahua, settings: Settings, *, heartbeat_s: float = HEARTBEAT_S) -> web.Application:
    """The aiohttp application; the caller owns the service's start and stop."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[errors_middleware])
    app[SERVICE_KEY] = service
    app[HEARTBEAT_KEY] = heartbeat_s
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/api/messages", post_message)
    app.router.add_get("/api/jobs/{job_id}", get_job)
    app.router.add_get("/api/jobs/{job_id}/events", job_events)
    app.router.add_post("/api/jobs/{job_id}/actions", post_action)
    app.router.add_get("/images/{digest}.png", get_image)
    app.router.add_static("/static/", STATIC_DIR, append_version=True)
    return app


async def run_web(service: Huahua, settings: Settings) -> None:
    """Serve the web chat on settings.web_host:web_port until cancelled."""
    runner = web.AppRunner(create_app(service, settings), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.web_host, settings.web_port)
        await site.start()
        logger.info("web chat on http://%s:%d/", settings.web_host, settings.web_port)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
