"""The local web chat: one static page and the JSON + server-sent-events API it calls."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mimetypes
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from bots.web.errors import BadRequest, error_response, errors_middleware, protocol_logger, status_for
from bots.web.identity import (
    GUARD_KEY,
    IDENTITIES_KEY,
    RIGHTS_KEY,
    Identities,
    LoginGuard,
    Rights,
    current_user,
    exposure_warning,
    identity_middleware,
    is_loopback,
    load_secret,
    login,
)
from bots.web.payload import (
    MAX_BODY_BYTES,
    int_field,
    read_object,
    refuse_user_field,
    text_field,
    without_invisible_start,
)
from bots.web.uploads import read_form
from core import presenter
from core.errors import HuahuaError, NotAllowed, NotFound, ServiceUnavailable
from core.listening import start_site
from core.service import Huahua, MessageContext, Reply
from core.settings import Settings
from core.story.book import StoryBook, story_json
from core.story.export import export_html, export_pdf
from core.story.model import Story, picture_panel
from core.types import Action, EventType, Job, JobEvent, JobStatus

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_NAME_LENGTH = 64
PERSONAL_MARK = "@"
"""A browser's own chat is web:@<user id>; room names may not start with it."""
HISTORY_JOBS = 50
HELP_WORDS = frozenset({"help", "?", "？", "帮助", "幫助"})
"""Plain messages that mean /help (any other plain text draws)."""
LANGUAGES = ("en", "zh")
HEARTBEAT_S = 15.0
IMAGE_CACHE = "public, max-age=31536000, immutable"
PLATFORM = "web:"
ATTACHMENT_TTL_S = 15 * 60
ATTACHMENT_MAX_BYTES = 64 * 1024 * 1024
STORY_META_PREFIX = "story"
EXPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
"""Exported storybooks are static: embedded pictures and their own styles, no scripts."""

SERVICE_KEY: web.AppKey[Huahua] = web.AppKey("service", Huahua)
PAGES_KEY: web.AppKey[dict[str, str]] = web.AppKey("pages", dict)
PAGES = ("index.html", "story.html")
STATIC_KEY: web.AppKey[dict[str, Path]] = web.AppKey("static_files", dict)
HEARTBEAT_KEY: web.AppKey[float] = web.AppKey("heartbeat", float)

_DIGEST = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}")
_EVENT_STATUS = {
    EventType.QUEUED: JobStatus.QUEUED,
    EventType.POSITION: JobStatus.QUEUED,
    EventType.STARTED: JobStatus.RUNNING,
    EventType.PROGRESS: JobStatus.RUNNING,
}


@dataclass(frozen=True)
class Attachment:
    name: str
    data: bytes
    expires_at: float


class AttachmentShelf:
    """Reply files that are not stored pictures (story exports), kept in memory for a short while.

    Each gets an unguessable token; the oldest go first once the shelf holds `max_bytes`, and a file
    larger than that is not kept at all. Nothing survives a restart: the story's own export URLs do.
    """

    def __init__(
        self,
        ttl_s: float = ATTACHMENT_TTL_S,
        max_bytes: int = ATTACHMENT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, Attachment] = OrderedDict()
        self._bytes = 0

    def put(self, name: str, data: bytes) -> str | None:
        """Keep a file; returns its token, or None when it is too large to keep."""
        self._expire()
        if len(data) > self.max_bytes:
            return None
        while self._items and self._bytes + len(data) > self.max_bytes:
            self._drop(next(iter(self._items)))
        token = secrets.token_urlsafe(18)
        self._items[token] = Attachment(name, data, self._clock() + self.ttl_s)
        self._bytes += len(data)
        return token

    def get(self, token: str) -> Attachment | None:
        self._expire()
        return self._items.get(token)

    def _expire(self) -> None:
        now = self._clock()
        for token in [t for t, item in self._items.items() if item.expires_at <= now]:
            self._drop(token)

    def _drop(self, token: str) -> None:
        self._bytes -= len(self._items.pop(token).data)


SHELF_KEY: web.AppKey[AttachmentShelf] = web.AppKey("attachments", AttachmentShelf)


# serialisation ---------------------------------------------------------------------------------


def image_url(digest: str) -> str:
    return f"/images/{digest}.png"


def job_json(job: Job, position: int | None = None, viewer: str | None = None) -> dict[str, Any]:
    """The job as the page and the API clients see it; `mine` says whether `viewer` asked for it."""
    request = job.request
    caption = presenter.describe(job)
    prompt_line = "\n".join(presenter.prompt_lines(request))
    return {
        "id": job.id,
        "status": job.status.value,
        "progress": round(job.progress, 4),
        "position": position,
        "prompt_zh": request.prompt,
        "prompts": list(request.prompts),
        "text": job.source_text,
        "mine": viewer is not None and job.user == viewer,
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
        "caption": caption,
        "details": caption.removeprefix(prompt_line).lstrip("\n"),
        "label": job.engine_label,
        "kind": job.kind.value,
        "parent_id": job.parent_id,
        "created_at": job.created_at,
        "meta": {key: value for key, value in job.meta.items() if key.startswith(STORY_META_PREFIX)},
        # the story panel each picture is drawn for (null for pictures of no story)
        "panels": None
        if picture_panel(job, 0) is None
        else [picture_panel(job, i) for i in range(request.n)],
    }


# input -----------------------------------------------------------------------------------------


def _chat_of(room: str, user: str) -> str:
    """The chat a room name means: empty is the browser's own chat, anything else a shared room."""
    room = room.strip()
    if not room:
        return f"{PLATFORM}{PERSONAL_MARK}{user}"
    if len(room) > MAX_NAME_LENGTH or not room.isprintable() or room.startswith(PERSONAL_MARK):
        raise BadRequest(
            f"The room must be a short printable name (at most {MAX_NAME_LENGTH} characters, "
            f"not starting with {PERSONAL_MARK})."
        )
    return PLATFORM + room


def _room_field(data: dict[str, Any], user: str) -> str:
    value = data.get("chat", "")
    if not isinstance(value, str):
        raise BadRequest("The field 'chat' must be text.")
    return _chat_of(value, user)


async def _caller(request: web.Request) -> tuple[str, bool]:
    """The caller's platform id (web:<user id>) and whether they are an admin."""
    user = current_user(request)
    return PLATFORM + user, await request.app[RIGHTS_KEY].is_admin(user)


async def _as_command(service: Huahua, chat: str, text: str) -> str:
    """Plain text in the web chat draws (as any image app's prompt box does), unless it asks for help or
    the room collects story text (/story auto on)."""
    if text.startswith("/"):
        return text
    if text.lower() in HELP_WORDS:
        return "/help"
    book = service.handler("story")
    if isinstance(book, StoryBook) and (await service.chat_settings(chat)).story_auto:
        if await book.active(chat) is not None:
            return text
    return f"/imagine {text}"


# handlers --------------------------------------------------------------------------------------


def _language(request: web.Request) -> str:
    """zh or en, the first of them the browser prefers (Accept-Language), en when it names neither."""
    choices = []
    for position, part in enumerate(request.headers.get("Accept-Language", "").split(",")):
        tag, _, params = part.strip().partition(";")
        weight = 1.0
        if params.strip().startswith("q="):
            try:
                weight = float(params.strip()[2:])
            except ValueError:
                weight = 0.0
        language = tag.strip().lower().split("-")[0]
        if language in LANGUAGES and weight > 0:
            choices.append((-weight, position, language))
    return min(choices)[2] if choices else "en"


def _page(request: web.Request, name: str, status: int = 200) -> web.Response:
    """A static page with `<html lang>` set to the browser's language (the scripts follow it)."""
    html = request.app[PAGES_KEY][name].replace('<html lang="en">', f'<html lang="{_language(request)}">', 1)
    return web.Response(
        text=html,
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-cache", "Vary": "Accept-Language"},
    )


async def index(request: web.Request) -> web.Response:
    return _page(request, "index.html")


async def static_file(request: web.Request) -> web.FileResponse:
    """One of the page's own files (a fixed list, so a missing one is a JSON 404 like any other)."""
    path = request.app[STATIC_KEY].get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


async def favicon(request: web.Request) -> web.FileResponse:
    headers = {"Content-Type": "image/svg+xml", "Cache-Control": "max-age=86400"}
    return web.FileResponse(STATIC_DIR / "favicon.svg", headers=headers)


async def healthz(request: web.Request) -> web.Response:
    """200 when jobs can be taken and run; 503 with the reason when the engine or the queue cannot."""
    service = request.app[SERVICE_KEY]
    health = await service.engine.health()
    body: dict[str, Any] = {"ok": True, "engine": service.engine.name, "label": service.engine.label}
    if "state" in health:  # "warming up" while a local engine compiles its default size at start
        body["state"] = health["state"]
    try:
        body["queue"] = await service.queue.size()
    except HuahuaError as err:
        body.update(ok=False, queue=None, error={"code": err.code, "message": err.message})
    try:
        body["counters"] = await service.counters()
    except HuahuaError as err:
        body.update(ok=False, counters=None, error={"code": err.code, "message": err.message})
    if body["ok"] and not health.get("ready", True):
        message = health.get("error") or "The image engine is not ready."
        body.update(ok=False, error={"code": "engine_unavailable", "message": str(message)})
    return web.json_response(body, status=200 if body["ok"] else 503)


async def get_me(request: web.Request) -> web.Response:
    """Who the browser is: its user id (for HUAHUA_WEB_ADMINS) and whether it is an admin."""
    user = current_user(request)
    return web.json_response({"user": user, "admin": await request.app[RIGHTS_KEY].is_admin(user)})


async def post_message(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    data = await read_object(request)
    refuse_user_field(data)
    user, admin = await _caller(request)
    chat = _room_field(data, user.removeprefix(PLATFORM))
    text = without_invisible_start(text_field(data, "text"))
    if not text:
        raise BadRequest("Type a message first.")
    command = await _as_command(service, chat, text)
    reply = await service.handle_message(chat, user, command, MessageContext(is_admin=admin))
    if reply.error is not None:
        return error_response(reply.error.code, reply.error.message, status_for(reply.error))
    texts = list(reply.texts)
    if not (texts or reply.jobs or reply.attachments):
        texts = ["📝 Added to the story."] if command == text else ["✅"]
    jobs = [job_json(job, await service.position(job.id), user) for job in reply.jobs]
    return web.json_response(
        {
            "replies": texts,
            "job": jobs[0] if jobs else None,
            "jobs": jobs,
            "attachments": await _attachments_json(request, reply),
        }
    )


async def get_history(request: web.Request) -> web.Response:
    """The chat's recent jobs, oldest first (the page shows them when it opens); ?chat=<room>&limit=."""
    service = request.app[SERVICE_KEY]
    user, _ = await _caller(request)
    chat = _chat_of(request.query.get("chat", ""), user.removeprefix(PLATFORM))
    raw_limit = request.query.get("limit", str(HISTORY_JOBS))
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= 200:
        raise BadRequest("The limit must be a whole number from 1 to 200.")
    jobs = list(reversed(await service.store.recent_jobs(chat, int(raw_limit))))
    positions = [await service.position(job.id) if not job.status.finished else None for job in jobs]
    return web.json_response(
        {"jobs": [job_json(job, position, user) for job, position in zip(jobs, positions, strict=True)]}
    )


async def _attachments_json(request: web.Request, reply: Reply) -> list[dict[str, Any]]:
    """A stored picture is linked by its digest; any other file (an export) goes on the shelf."""
    service, shelf = request.app[SERVICE_KEY], request.app[SHELF_KEY]
    found = []
    for name, data in reply.attachments:
        digest = hashlib.sha256(data).hexdigest()
        if name.lower().endswith(".png") and await service.images.exists(digest):
            url: str | None = image_url(digest)
        else:
            token = shelf.put(name, data)
            url = f"/api/attachments/{token}/{_quoted(name)}" if token else None
        found.append({"name": name, "url": url})
    return found


async def get_attachment(request: web.Request) -> web.Response:
    token = request.match_info["token"]
    item = request.app[SHELF_KEY].get(token) if _TOKEN.fullmatch(token) else None
    if item is None:
        raise NotFound("That file has expired; ask for it again.")
    return _file_response(item.data, item.name)


def _quoted(name: str) -> str:
    return quote(name, safe="")


def _file_response(data: bytes, name: str, *, ascii_stem: str = "download") -> web.Response:
    """A download that opens in the browser; exported HTML may show its own inline pictures and styles.

    Browsers take the UTF-8 `filename*`; the plain `filename` is for old clients: the name's ASCII
    letters, or `ascii_stem` when there are none (never a bare `.pdf`)."""
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    stem, _, suffix = name.rpartition(".") if "." in name else (name, "", "")
    plain_stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-") or ascii_stem
    plain_suffix = re.sub(r"[^A-Za-z0-9]+", "", suffix)
    fallback = f"{plain_stem}.{plain_suffix}" if plain_suffix else plain_stem
    headers = {
        "Content-Disposition": f"inline; filename=\"{fallback}\"; filename*=UTF-8''{_quoted(name)}",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }
    if content_type == "text/html":
        headers["Content-Security-Policy"] = EXPORT_CSP
    return web.Response(body=data, content_type=content_type, headers=headers)


async def get_job(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    job = await service.get_job(request.match_info["job_id"])
    user, _ = await _caller(request)
    return web.json_response(job_json(job, await service.position(job.id), user))


async def post_action(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    data = await read_object(request)
    refuse_user_field(data)
    action = text_field(data, "action")
    if action not in {a.value for a in Action}:
        raise BadRequest("The action must be reroll, variation, upscale or cancel (or choose, for a story).")
    index = data.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise BadRequest("The field 'index' must be a whole number.")
    user, admin = await _caller(request)
    job = await service.act(request.match_info["job_id"], action, index, user, is_admin=admin)
    return web.json_response(job_json(job, await service.position(job.id), user))


async def get_image(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    digest = request.match_info["digest"]
    if not _DIGEST.fullmatch(digest):
        raise NotFound("There is no image with that id.")
    png = await service.image(digest)
    return web.Response(body=png, headers={"Cache-Control": IMAGE_CACHE, "Content-Type": "image/png"})


# stories ---------------------------------------------------------------------------------------


def _book(service: Huahua) -> StoryBook:
    book = service.handler("story")
    if not isinstance(book, StoryBook):
        raise ServiceUnavailable("Stories are not switched on for this server.")
    return book


async def _story_response(book: StoryBook, story: Story) -> web.Response:
    images: dict[int, list[str]] = {}
    chosen: dict[int, str | None] = {}
    for scene in story.scenes:
        images[scene.index] = [image_url(job.images[i]) for job, i in await book.variants(scene)]
        digest = await book.panel_image(scene)
        chosen[scene.index] = image_url(digest) if digest else None
    data = story_json(story, images, chosen)
    for member in data["cast"]:  # the reference picture as the page loads it
        digest = member.pop("reference")
        member["reference_url"] = image_url(digest) if digest else None
    return web.json_response(data)


async def get_chat_story(request: web.Request) -> web.Response:
    """The active story of a web room (the room name without the web: prefix)."""
    user, _ = await _caller(request)
    room = request.match_info["chat"]
    if room.strip() == PERSONAL_MARK:
        room = ""
    book = _book(request.app[SERVICE_KEY])
    story = await book.active(_chat_of(room, user.removeprefix(PLATFORM)))
    if story is None:
        raise NotFound("There is no story in this room yet: start one with /story new <title>.")
    return await _story_response(book, story)


async def get_story(request: web.Request) -> web.Response:
    book = _book(request.app[SERVICE_KEY])
    return await _story_response(book, await book.get(request.match_info["story_id"]))


async def export_story_html(request: web.Request) -> web.Response:
    book = _book(request.app[SERVICE_KEY])
    story = await book.get(request.match_info["story_id"])
    return _file_response(
        await export_html(story, await book.panel_pictures(story)),
        f"{_file_stem(story)}.html",
        ascii_stem="storybook",
    )


async def export_story_pdf(request: web.Request) -> web.Response:
    book = _book(request.app[SERVICE_KEY])
    story = await book.get(request.match_info["story_id"])
    try:
        pdf = await export_pdf(story, await book.panel_pictures(story))
    except NotFound:
        raise
    except HuahuaError as err:
        return error_response(err.code, err.message, 503)
    return _file_response(pdf, f"{_file_stem(story)}.pdf", ascii_stem="storybook")


def _file_stem(story: Story) -> str:
    return re.sub(r"[^\w-]+", "-", story.title).strip("-")[:60] or f"storybook-{story.id}"


async def choose_picture(request: web.Request) -> web.Response:
    """⭐ from the gallery: picture `picture` (1-based, among the scene's variants) becomes the panel."""
    data = await read_object(request)
    refuse_user_field(data)
    scene_number = int_field(data, "scene")
    picture = int_field(data, "picture")
    user, _ = await _caller(request)
    book = _book(request.app[SERVICE_KEY])
    story = await book.get(request.match_info["story_id"])
    scene = story.scene(scene_number)
    if scene is None:
        count = len(story.scenes)
        raise BadRequest(f"Choose a panel from 1 to {count}." if count else "The story has no panels yet.")
    variants = await book.variants(scene)
    if not 1 <= picture <= len(variants):
        raise BadRequest(
            f"Panel {scene.index} has pictures 1 to {len(variants)}."
            if variants
            else f"Panel {scene.index} has no finished pictures yet."
        )
    job, image_index = variants[picture - 1]
    story = await book.choose(job, image_index, user)
    return await _story_response(book, story)


async def post_cast_picture(request: web.Request) -> web.Response:
    """`/cast add` with a picture (multipart form: `picture`, `name`, `description`, and `chat` the room
    or `story` a story id, as the gallery page sends): the picture becomes the member's reference. The
    caller and the room are found as for a message; a story in someone else's own chat is refused."""
    form = await read_form(
        request,
        file_fields=frozenset({"picture"}),
        text_fields=frozenset({"chat", "story", "name", "description"}),
    )
    user, _ = await _caller(request)
    book = _book(request.app[SERVICE_KEY])
    if "story" in form.fields:
        chat = (await book.get(form.fields["story"])).chat
        if not chat.startswith(PLATFORM):
            raise BadRequest("That story belongs to another platform's chat: send the picture there.")
        if chat.startswith(PLATFORM + PERSONAL_MARK) and chat != _chat_of("", user.removeprefix(PLATFORM)):
            raise NotAllowed("That story is in someone else's own chat.")
    else:
        chat = _chat_of(form.fields.get("chat", ""), user.removeprefix(PLATFORM))
    picture = form.files.get("picture")
    if not picture:
        raise BadRequest("Choose a picture to upload.")
    name = without_invisible_start(form.fields.get("name", ""))
    if not name:
        raise BadRequest("Give the character's name.")
    if ":" in name or "：" in name:
        raise BadRequest("A character's name cannot contain a colon.")
    description = without_invisible_start(form.fields.get("description", ""))
    args = f"{name}: {description}" if description else name
    reply = await book.cast_add_with_picture(chat, user, args, picture)
    return web.json_response({"replies": list(reply.texts)})


async def story_page(request: web.Request) -> web.Response:
    """The gallery page; 404 (same page, it shows the API's sentence) for an unknown story."""
    status = 200
    try:
        await _book(request.app[SERVICE_KEY]).get(request.match_info["story_id"])
    except NotFound:
        status = 404
    return _page(request, "story.html", status)


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
) -> AsyncGenerator[JobEvent | None, None]:
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


# the application -------------------------------------------------------------------------------


def create_app(service: Huahua, settings: Settings, *, heartbeat_s: float = HEARTBEAT_S) -> web.Application:
    """The aiohttp application; the caller owns the service's start and stop."""
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[identity_middleware, errors_middleware],
        handler_args={"logger": protocol_logger()},
    )
    app[SERVICE_KEY] = service
    app[HEARTBEAT_KEY] = heartbeat_s
    app[SHELF_KEY] = AttachmentShelf()
    token = settings.web_token.get_secret_value() if settings.web_token is not None else None
    app[IDENTITIES_KEY] = Identities(load_secret(settings), token)
    app[RIGHTS_KEY] = Rights(service.store, settings.web_admin_ids, is_loopback(settings.web_host))
    app[GUARD_KEY] = LoginGuard()
    app[PAGES_KEY] = {name: (STATIC_DIR / name).read_text(encoding="utf-8") for name in PAGES}
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/api/login", login)
    app.router.add_get("/api/me", get_me)
    app.router.add_post("/api/messages", post_message)
    app.router.add_get("/api/history", get_history)
    app.router.add_get("/api/jobs/{job_id}", get_job)
    app.router.add_get("/api/jobs/{job_id}/events", job_events)
    app.router.add_post("/api/jobs/{job_id}/actions", post_action)
    app.router.add_get("/images/{digest}.png", get_image)
    app.router.add_get("/api/attachments/{token}/{name}", get_attachment)
    app.router.add_get("/api/chats/{chat}/story", get_chat_story)
    app.router.add_get("/api/stories/{story_id}", get_story)
    app.router.add_get("/api/stories/{story_id}/export.html", export_story_html)
    app.router.add_get("/api/stories/{story_id}/export.pdf", export_story_pdf)
    app.router.add_post("/api/stories/{story_id}/choose", choose_picture)
    app.router.add_post("/api/cast/picture", post_cast_picture)
    app.router.add_get("/stories/{story_id}", story_page)
    app[STATIC_KEY] = {path.name: path for path in STATIC_DIR.iterdir() if path.is_file()}
    app.router.add_get("/static/{name}", static_file)
    return app


async def run_web(service: Huahua, settings: Settings) -> None:
    """Serve the web chat on settings.web_host:web_port until cancelled."""
    runner = web.AppRunner(create_app(service, settings), access_log=None)
    await runner.setup()
    try:
        await start_site(
            runner,
            settings.web_host,
            settings.web_port,
            what="The web chat",
            settings="HUAHUA_WEB_HOST and HUAHUA_WEB_PORT",
        )
        logger.info("web chat on http://%s:%d/", settings.web_host, settings.web_port)
        warning = exposure_warning(settings)
        if warning:
            logger.warning(warning)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
