"""Turns job events into Discord messages: throttled status edits, then the result with its buttons."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import discord

from bots.discord.files import fit_image
from bots.discord.target import Target
from bots.discord.views import result_view, running_view
from core import presenter
from core.errors import HuahuaError
from core.types import EventType, Job, JobEvent, JobStatus

if TYPE_CHECKING:
    from core.service import Huahua

logger = logging.getLogger(__name__)

MAX_CONTENT = 2000
CALL_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 120.0
REMEMBERED = 2000
NO_MENTIONS = discord.AllowedMentions.none()
USER_MENTION = discord.AllowedMentions(everyone=False, roles=False, users=True)


def clip(text: str, limit: int = MAX_CONTENT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def user_id_of(job: Job) -> int | None:
    raw = job.user.removeprefix("dc:")
    return int(raw) if raw.isdigit() else None


class Delivery:
    """The service listener for "dc:" chats. Status goes to the interaction's original response while
    its token lives; the result goes out as a follow-up, or as a channel message once the token is dead."""

    def __init__(self, client: discord.Client, service: Huahua, *, edit_interval: float = 1.0) -> None:
        self.client = client
        self.service = service
        self.edit_interval = edit_interval
        self._gate = asyncio.Event()
        self._closed = False
        self._targets: OrderedDict[str, Target] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_edit: dict[str, float] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._last_result: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._orphans: OrderedDict[str, tuple[Job, JobEvent]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._answering: dict[str, asyncio.Event] = {}

    # lifecycle ---------------------------------------------------------------------------------

    def open(self) -> None:
        """The client is logged in: deliver what waited."""
        self._gate.set()

    def close(self) -> None:
        self._closed = True
        self._gate.set()

    # what adapters tell it ---------------------------------------------------------------------

    @asynccontextmanager
    async def answering(self, token: str) -> AsyncIterator[None]:
        """While a command posts its reply, hold back the results of the jobs it started.

        After a deferred response, Discord turns the first follow-up into the response itself: a fast
        job's result must not be sent before the command's own answer, or that answer would replace it."""
        done = self._answering.setdefault(token, asyncio.Event())
        try:
            yield
        finally:
            done.set()
            self._answering.pop(token, None)

    def remember(self, job_id: str, target: Target) -> None:
        """Route a job the service made without our meta (a plug-in that ignores it) to `target`.

        A final event that came before this call (a fast job) is delivered now."""
        _bounded_put(self._targets, job_id, target)
        orphan = self._orphans.pop(job_id, None)
        if orphan is not None:
            task = asyncio.create_task(self.on_event(*orphan))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def last_result(self, chat: str, user: str) -> str | None:
        return self._last_result.get((chat, user))

    def target_of(self, job: Job) -> Target | None:
        return self._targets.get(job.id) or Target.from_meta(job.meta)

    # the listener ------------------------------------------------------------------------------

    async def on_event(self, job: Job, event: JobEvent) -> None:
        if event.type == EventType.DONE:
            _bounded_put(self._last_result, (job.chat, job.user), job.id)
        try:
            await asyncio.wait_for(self._gate.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            logger.warning("discord client not ready; dropped %s event of job %s", event.type, job.id)
            return
        if self._closed:
            return
        target = self.target_of(job)
        if target is None:
            if event.type.final:
                _bounded_put(self._orphans, job.id, (job, event))
            return
        lock = self._locks.setdefault(job.id, asyncio.Lock())
        async with lock:
            if job.id in self._finished:
                return
            if event.type.final:
                _bounded_put(self._finished, job.id, None)
                self._locks.pop(job.id, None)
                self._last_edit.pop(job.id, None)
                await self._final(job, event, target)
            else:
                await self._status(job, event, target)

    async def _status(self, job: Job, event: JobEvent, target: Target) -> None:
        if not (target.edit_status and target.token_alive()):
            return
        now = time.monotonic()
        if event.type == EventType.PROGRESS and now - self._last_edit.get(job.id, 0.0) < self.edit_interval:
            return
        self._last_edit[job.id] = now
        await self._edit_original(target, status_text(job, event), running_view(job.id))

    async def _final(self, job: Job, event: JobEvent, target: Target) -> None:
        answered = self._answering.get(target.token or "")
        if answered is not None:
            try:
                await asyncio.wait_for(answered.wait(), CALL_TIMEOUT_S)
            except TimeoutError:
                logger.info("the command of job %s did not answer in time; delivering anyway", job.id)
        if event.type == EventType.DONE:
            if target.edit_status:
                await self._edit_original(target, presenter.status_line(job), None)
            try:
                await self.send_result(job, target)
            except HuahuaError as err:
                await self._to_channel(target, err.message, [], None)
            return
        line = presenter.status_line(replace(job, error=event.error or job.error))
        if target.edit_status and target.token_alive():
            if await self._edit_original(target, line, None):
                return
        mention = user_id_of(job)
        text = f"<@{mention}> {line}" if mention else line
        await self._to_channel(target, text, [], None)

    # sending -----------------------------------------------------------------------------------

    async def send_result(self, job: Job, target: Target) -> None:
        """The images with their caption and buttons: a follow-up, or a channel message."""
        images = [await self.service.image(digest) for digest in job.images]
        mention = user_id_of(job)
        caption = presenter.describe(job)
        content = f"<@{mention}>\n{caption}" if mention else caption
        if target.token_alive():
            files, links = self.files_for(job, images, target.size_limit)
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    await self._webhook(target).send(
                        content=clip(_with_links(content, links)),
                        files=files,
                        view=result_view(job),
                        allowed_mentions=USER_MENTION,
                        wait=True,
                    )
                return
            except (discord.HTTPException, TimeoutError) as err:
                logger.info("follow-up for job %s failed (%s); posting in the channel", job.id, _why(err))
        files, links = self.files_for(job, images, target.size_limit)
        await self._to_channel(target, _with_links(content, links), files, result_view(job))

    def files_for(self, job: Job, images: list[bytes], limit: int) -> tuple[list[discord.File], list[str]]:
        """Attachments that fit the limit, and links (or notes) for those that do not."""
        files: list[discord.File] = []
        links: list[str] = []
        for index, (digest, png) in enumerate(zip(job.images, images, strict=True)):
            fitted = fit_image(png, limit, f"huahua-{job.id}-{index + 1}")
            if fitted is not None:
                files.append(discord.File(io.BytesIO(fitted[1]), filename=fitted[0]))
            elif self.service.settings.public_url:
                links.append(f"{self.service.settings.public_url.rstrip('/')}/images/{digest}.png")
            else:
                links.append(f"(image {index + 1} is too large to attach here)")
        return files, links

    async def _edit_original(self, target: Target, content: str, view: discord.ui.View | None) -> bool:
        if not target.token_alive():
            return False
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await self._webhook(target).edit_message(  # type: ignore[call-overload]
                    "@original",  # the interaction's original response, as Discord names it
                    content=clip(content),
                    view=view,
                    allowed_mentions=NO_MENTIONS,
                )
            return True
        except (discord.HTTPException, TimeoutError) as err:
            logger.info("could not edit an interaction response (%s)", _why(err))
            return False

    async def _to_channel(
        self, target: Target, content: str, files: list[discord.File], view: discord.ui.View | None
    ) -> None:
        channel = self.client.get_partial_messageable(target.channel_id, guild_id=target.guild_id)
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                if view is None:
                    await channel.send(content=clip(content), files=files, allowed_mentions=USER_MENTION)
                else:
                    await channel.send(
                        content=clip(content), files=files, view=view, allowed_mentions=USER_MENTION
                    )
        except (discord.HTTPException, TimeoutError) as err:
            logger.warning("could not post in channel %s (%s)", target.channel_id, _why(err))

    def _webhook(self, target: Target) -> discord.Webhook:
        data: Any = {"id": target.application_id, "type": 3, "token": target.token}
        return discord.Webhook.from_state(data, self.client._connection)


def status_text(job: Job, event: JobEvent) -> str:
    """The status line for a non-final event, with the prompt under it while queued."""
    if event.type in (EventType.QUEUED, EventType.POSITION):
        queued = replace(job, status=JobStatus.QUEUED, error=event.error)
        return f"{presenter.status_line(queued, event.position)}\n提示词: {job.request.prompt}"
    running = replace(job, status=JobStatus.RUNNING, progress=event.progress)
    return f"{presenter.status_line(running)} {presenter.progress_bar(event.progress)}"


def _with_links(content: str, links: list[str]) -> str:
    return "\n".join([content, *links]) if links else content


def _why(err: BaseException) -> str:
    if isinstance(err, discord.HTTPException):
        return f"HTTP {err.status}, code {err.code}"
    if isinstance(err, HuahuaError):
        return err.message
    return type(err).__name__


def _bounded_put(mapping: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    mapping[key] = value
    mapping.move_to_end(key)
    while len(mapping) > REMEMBERED:
        mapping.popitem(last=False)
