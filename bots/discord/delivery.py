"""Turns job events into Discord messages: throttled status edits, then the result with its buttons.

Status edits come from a service listener (non-final events only). A job's end is posted by
`Delivery.post`, which the process running the client serves from the core outbox: every finished "dc:"
job has a pending delivery in the store, retried after rate limits and outages, resent after a
restart, and never posted again once marked sent.
"""

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
from core.errors import HuahuaError, NotFound
from core.outbox import DeliveryRefused, DeliveryRetry
from core.types import EventType, Job, JobEvent, JobStatus

if TYPE_CHECKING:
    from core.service import Huahua

logger = logging.getLogger(__name__)

MAX_CONTENT = 2000
TOKEN_REFUSED = (401, 403, 404)
"""Discord's answers to a follow-up whose interaction token died: the result goes to the channel."""
CALL_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 120.0
REMEMBERED = 2000
TARGET_WAIT_S = 60.0
"""How long after its creation a job without a known target is retried: a plug-in's command names it
(`remember`) after the job is made."""
DEFAULT_RETRY_S = 5.0
"""The wait after a 429 that names none."""
STATUS_EVENTS = frozenset(t for t in EventType if not t.final)
"""What the listener shows; a job's end goes through the outbox (`Delivery.post`)."""
REFUSED = (403, 404)
"""Channel answers that no retry changes: missing access or permissions, unknown channel."""
NO_MENTIONS = discord.AllowedMentions.none()
USER_MENTION = discord.AllowedMentions(everyone=False, roles=False, users=True)


def clip(text: str, limit: int = MAX_CONTENT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def user_id_of(job: Job) -> int | None:
    raw = job.user.removeprefix("dc:")
    return int(raw) if raw.isdigit() else None


class Delivery:
    """The service listener for "dc:" chats and the outbox's poster. Status goes to the interaction's
    original response while its token lives; the result goes out as a follow-up, or as a channel
    message once the token is dead."""

    def __init__(self, client: discord.Client, service: Huahua, *, edit_interval: float = 1.0) -> None:
        self.client = client
        self.service = service
        self.edit_interval = edit_interval
        self._gate = asyncio.Event()
        self._closed = False
        self._targets: OrderedDict[str, Target] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_edit: dict[str, float] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        """Jobs whose end was posted here: a late progress event must not edit their status again."""
        self._last_result: OrderedDict[tuple[str, str], str] = OrderedDict()
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
        """Route a job the service made without our meta (a plug-in that ignores it) to `target`; the
        caller also stores the target on the job, where the outbox's next attempt finds it."""
        _bounded_put(self._targets, job_id, target)

    def last_result(self, chat: str, user: str) -> str | None:
        return self._last_result.get((chat, user))

    def target_of(self, job: Job) -> Target | None:
        return self._targets.get(job.id) or Target.from_meta(job.meta)

    # the listener ------------------------------------------------------------------------------

    async def on_event(self, job: Job, event: JobEvent) -> None:
        if event.type.final:
            return  # posted by the outbox (`post`)
        try:
            await asyncio.wait_for(self._gate.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            logger.warning("discord client not ready; dropped %s event of job %s", event.type, job.id)
            return
        if self._closed:
            return
        target = self.target_of(job)
        if target is None:
            return
        async with self._lock(job.id):
            if job.id not in self._ended:
                await self._status(job, event, target)

    async def _status(self, job: Job, event: JobEvent, target: Target) -> None:
        if not (target.edit_status and target.token_alive()):
            return
        now = time.monotonic()
        if event.type == EventType.PROGRESS and now - self._last_edit.get(job.id, 0.0) < self.edit_interval:
            return
        self._last_edit[job.id] = now
        await self._edit_original(target, status_text(job, event), running_view(job.id))

    def _lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    # the end of a job: posted by the outbox ----------------------------------------------------

    async def post(self, job: Job) -> str | None:
        """Show a finished job: the final status edit, then the pictures with their buttons (or the
        failure). Returns the id of the message that shows the result. Discord's errors become the
        outbox's: a 429 waits its `retry_after`, a channel closed to the bot (403) or gone (404)
        refuses, other failures are retried."""
        target = self.target_of(job)
        if target is None:
            if time.time() - job.created_at < TARGET_WAIT_S:
                raise DeliveryRetry(1.0, "the job's command has not named its channel yet")
            raise DeliveryRefused("the job has no Discord channel to post in")
        await self._after_answer(job, target)
        async with self._lock(job.id):
            _bounded_put(self._ended, job.id, None)
            try:
                message_id = await self._show_end(job, target)
            except discord.RateLimited as err:
                raise DeliveryRetry(err.retry_after, "Discord rate limit") from err
            except discord.HTTPException as err:
                if err.status == 429:
                    raise DeliveryRetry(_retry_after(err), f"Discord rate limit ({_why(err)})") from err
                if err.status in REFUSED:
                    raise DeliveryRefused(_why(err)) from err
                raise
        self._locks.pop(job.id, None)
        self._last_edit.pop(job.id, None)
        if job.status == JobStatus.DONE:
            _bounded_put(self._last_result, (job.chat, job.user), job.id)
        return message_id

    async def _after_answer(self, job: Job, target: Target) -> None:
        """Wait while the job's command posts its own answer (see `answering`)."""
        answered = self._answering.get(target.token or "")
        if answered is None:
            return
        try:
            await asyncio.wait_for(answered.wait(), CALL_TIMEOUT_S)
        except TimeoutError:
            logger.info("the command of job %s did not answer in time; delivering anyway", job.id)

    async def _show_end(self, job: Job, target: Target) -> str | None:
        """The final status edit (repeating it is harmless), then the one message that shows the end."""
        if job.status == JobStatus.DONE:
            if target.edit_status:
                await self._edit_original(target, presenter.status_line(job), None)
            try:
                return await self.send_result(job, target)
            except NotFound as err:  # the pictures are gone from the image store
                return await self._to_channel(job, target, err.message, [], None)
        line = presenter.status_line(job)
        if target.edit_status and target.token_alive():
            edited = await self._edit_original(target, line, None)
            if edited is not None:
                return edited
        mention = user_id_of(job)
        text = f"<@{mention}> {line}" if mention else line
        return await self._to_channel(job, target, text, [], None)

    # sending -----------------------------------------------------------------------------------

    async def send_result(self, job: Job, target: Target) -> str:
        """The images with their caption and buttons: a follow-up while the interaction token lives
        (Discord refusing the token sends it to the channel instead), else a channel message."""
        images = [await self.service.image(digest) for digest in job.images]
        mention = user_id_of(job)
        caption = presenter.describe(job)
        content = f"<@{mention}>\n{caption}" if mention else caption
        if target.token_alive():
            files, links = self.files_for(job, images, target.size_limit)
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    sent = await self._webhook(target).send(
                        content=clip(_with_links(content, links)),
                        files=files,
                        view=result_view(job),
                        allowed_mentions=USER_MENTION,
                        wait=True,
                    )
                return str(sent.id)
            except discord.HTTPException as err:
                if err.status not in TOKEN_REFUSED:
                    raise
                logger.info("follow-up for job %s refused (%s); posting in the channel", job.id, _why(err))
        files, links = self.files_for(job, images, target.size_limit)
        return await self._to_channel(job, target, _with_links(content, links), files, result_view(job))

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

    async def _edit_original(self, target: Target, content: str, view: discord.ui.View | None) -> str | None:
        """Edit the interaction's original response; its message id, or None when that failed."""
        if not target.token_alive():
            return None
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                edited = await self._webhook(target).edit_message(  # type: ignore[call-overload]
                    "@original",  # the interaction's original response, as Discord names it
                    content=clip(content),
                    view=view,
                    allowed_mentions=NO_MENTIONS,
                )
            return str(edited.id)
        except (discord.HTTPException, TimeoutError) as err:
            logger.info("could not edit an interaction response (%s)", _why(err))
            return None

    async def _to_channel(
        self, job: Job, target: Target, content: str, files: list[discord.File], view: discord.ui.View | None
    ) -> str:
        """Post in the job's channel; the message id. The nonce makes Discord answer a repeat of this
        post (a retry after a lost answer) with the message it already made, for a few minutes."""
        channel = self.client.get_partial_messageable(target.channel_id, guild_id=target.guild_id)
        extra: dict[str, Any] = {} if view is None else {"view": view}
        async with asyncio.timeout(CALL_TIMEOUT_S):
            sent = await channel.send(
                content=clip(content),
                files=files,
                allowed_mentions=USER_MENTION,
                nonce=nonce_of(job),
                **extra,
            )
        return str(sent.id)

    def _webhook(self, target: Target) -> discord.Webhook:
        data: Any = {"id": target.application_id, "type": 3, "token": target.token}
        return discord.Webhook.from_state(data, self.client._connection)


def status_text(job: Job, event: JobEvent) -> str:
    """The status line for a non-final event, with the prompt under it while queued."""
    if event.type in (EventType.QUEUED, EventType.POSITION):
        queued = replace(job, status=JobStatus.QUEUED, error=event.error)
        return "\n".join(
            [presenter.status_line(queued, event.position), *presenter.prompt_lines(job.request)]
        )
    running = replace(job, status=JobStatus.RUNNING, progress=event.progress)
    return f"{presenter.status_line(running)} {presenter.progress_bar(event.progress)}"


def nonce_of(job: Job) -> str:
    """The nonce of a job's channel post (Discord takes up to 25 characters)."""
    return f"hh{job.id}"[:25]


def _retry_after(err: discord.HTTPException) -> float:
    """The wait a 429 names (Retry-After, in seconds), or `DEFAULT_RETRY_S`."""
    try:
        return max(0.0, float(err.response.headers.get("Retry-After", DEFAULT_RETRY_S)))
    except (AttributeError, ValueError):
        return DEFAULT_RETRY_S


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
