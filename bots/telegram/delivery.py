"""Job events to Telegram: throttled status-message edits and the finished picture with its buttons.

Progress reaches the status message through a service listener (non-final events only). A job's end is
posted by `Delivery.post`, which the process running the adapter serves from the core outbox: the
store keeps a pending delivery for every finished "tg:" job, so a result is retried after Telegram's
`retry_after` or a network failure, resent after a restart, and never posted again once marked sent.

Where a job's status message and reply target live: in memory for jobs this process started, and in the
job's `meta` ("tg_status", "tg_reply_to") so delivery works after a restart. The service gives every job
the adapter's meta from creation and never copies a parent's platform ids to its children.

Chat keys: "tg:<chat_id>" for a chat, "tg:<chat_id>:<thread_id>" for a forum topic, so a topic keeps its
own story, jobs and chat settings (a topic's gallery, like its other settings, starts unset). Messages
sent for a topic's job without a reply target carry its thread id.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from telegram import InlineKeyboardMarkup, Message, ReplyParameters
from telegram.error import BadRequest, ChatMigrated, Forbidden, RetryAfter, TelegramError
from telegram.ext import ExtBot
from telegram.warnings import PTBDeprecationWarning

from bots.telegram import keyboards, messages
from bots.telegram.ratelimit import NO_RETRIES
from core import images, presenter
from core.errors import HuahuaError, NotFound
from core.outbox import DeliveryRefused, DeliveryRetry
from core.service import Huahua
from core.types import EventType, Job, JobEvent, JobStatus

logger = logging.getLogger(__name__)

META_STATUS = "tg_status"
META_REPLY = "tg_reply_to"
META_RESULT = "tg_result"
"""The message id of the job's result photo, so /share as a reply to it finds the job."""
LEGACY_META_JOB = "tg_job"
"""Written by earlier versions beside ids that a child job may have inherited from its parent."""
PLATFORM = "tg:"
STORY_ID = "story_id"
READY_TIMEOUT_S = 30.0
CREATION_WAIT_S = 10.0
STATUS_EVENTS = frozenset(t for t in EventType if not t.final)
"""What the listener shows; a job's end goes through the outbox (`Delivery.post`)."""
REMEMBERED = 2000


@dataclass(frozen=True)
class StatusRef:
    """Where a job's updates go: the chat, its status message (if any) and the message to reply to."""

    chat_id: int
    status_id: int | None = None
    reply_to: int | None = None
    thread_id: int | None = None
    """The forum topic the job belongs to, None outside topics."""


def chat_key(chat_id: int, thread_id: int | None = None) -> str:
    """The service's chat id: "tg:-100123", or "tg:-100123:11" for forum topic 11."""
    return f"{PLATFORM}{chat_id}" if thread_id is None else f"{PLATFORM}{chat_id}:{thread_id}"


def parse_chat_key(chat: str) -> tuple[int, int | None] | None:
    """ "tg:-100123:11" -> (-100123, 11), "tg:-100123" -> (-100123, None); None for other platforms or
    malformed ids."""
    if not chat.startswith(PLATFORM):
        return None
    head, _, thread = chat[len(PLATFORM) :].partition(":")
    try:
        return int(head), (int(thread) if thread else None)
    except ValueError:
        return None


def meta_for(status_id: int | None, reply_to: int | None) -> dict[str, str]:
    """The job meta that keeps a job's Telegram ids."""
    meta = {}
    if status_id is not None:
        meta[META_STATUS] = str(status_id)
    if reply_to is not None:
        meta[META_REPLY] = str(reply_to)
    return meta


def ref_from_meta(job: Job) -> StatusRef | None:
    """The job's own Telegram ids from its meta, or None when the meta is missing (or, in jobs stored by
    earlier versions, a parent's)."""
    parsed = parse_chat_key(job.chat)
    if parsed is None:
        return None
    if job.meta.get(LEGACY_META_JOB, job.id) != job.id:
        return None
    if META_STATUS not in job.meta and META_REPLY not in job.meta:
        return None
    chat_id, thread_id = parsed
    return StatusRef(chat_id, _int(job.meta.get(META_STATUS)), _int(job.meta.get(META_REPLY)), thread_id)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class Delivery:
    """The service listener for "tg:" chats (one edit per chat per `min_edit_interval` seconds) and the
    outbox's poster of finished jobs."""

    def __init__(self, service: Huahua, *, min_edit_interval: float = 1.0) -> None:
        self.service = service
        self.min_edit_interval = min_edit_interval
        self._bot: ExtBot[Any] | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self._refs: dict[str, StatusRef] = {}
        self._latest: dict[str, tuple[Job, JobEvent]] = {}
        self._flushing: dict[str, asyncio.Task[None]] = {}
        self._last_edit: dict[int, float] = {}
        self._locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._creating: dict[int, int] = defaultdict(int)
        self._created = asyncio.Condition()
        self._ended: OrderedDict[str, None] = OrderedDict()
        """Jobs whose end was posted here: a late progress event must not edit their status again."""
        self._background: set[asyncio.Task[None]] = set()

    # lifecycle ---------------------------------------------------------------------------------

    def attach(self, bot: ExtBot[Any]) -> None:
        """Start delivering through `bot` (after the application is initialised)."""
        self._bot = bot
        self._closed = False
        self._ready.set()

    def close(self) -> None:
        """Stop delivering: later events are dropped, pending throttled edits are cancelled."""
        self._closed = True
        self._ready.set()
        for task in self._flushing.values():
            task.cancel()
        self._flushing.clear()
        for task in self._background:
            task.cancel()

    # jobs started by the handlers -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def creating(self, chat_id: int) -> AsyncIterator[None]:
        """Wrap the creation of a job whose status message is not yet known; events wait for it."""
        self._creating[chat_id] += 1
        try:
            yield
        finally:
            self._creating[chat_id] -= 1
            async with self._created:
                self._created.notify_all()

    async def track(self, job: Job, ref: StatusRef) -> None:
        """Remember a job's status message, here and in its meta (for restarts)."""
        self._refs[job.id] = ref
        async with self._created:
            self._created.notify_all()
        if ref_from_meta(job) != ref:
            try:
                await self.service.update_meta(job.id, meta_for(ref.status_id, ref.reply_to))
            except HuahuaError as err:
                logger.warning("could not keep Telegram ids on job %s: %s", job.id, err.message)

    # the listener ------------------------------------------------------------------------------

    async def on_event(self, job: Job, event: JobEvent) -> None:
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), READY_TIMEOUT_S)
            except TimeoutError:
                logger.warning("telegram bot not started: dropped %s event of job %s", event.type, job.id)
                return
        if self._closed or self._bot is None:
            return
        if event.type.final:
            return  # posted by the outbox (`post`)
        ref = await self._ref(job)
        if ref is None:
            return
        async with self._locks[ref.chat_id]:
            if job.id in self._ended:
                return
            try:
                await self._progress(self._bot, job, event, ref)
            except TelegramError as err:
                logger.warning("status edit of job %s failed: %s", job.id, type(err).__name__)

    async def _ref(self, job: Job) -> StatusRef | None:
        parsed = parse_chat_key(job.chat)
        if parsed is None:
            return None
        chat_id, thread_id = parsed
        if job.id not in self._refs and self._creating[chat_id] > 0:
            with contextlib.suppress(TimeoutError):
                async with self._created:
                    await asyncio.wait_for(
                        self._created.wait_for(lambda: job.id in self._refs or self._creating[chat_id] == 0),
                        CREATION_WAIT_S,
                    )
        if job.id in self._refs:
            return self._refs[job.id]
        ref = ref_from_meta(job)
        if ref is None:
            with contextlib.suppress(HuahuaError):
                ref = ref_from_meta(await self.service.get_job(job.id))
        return ref or StatusRef(chat_id, thread_id=thread_id)

    async def _progress(self, bot: ExtBot[Any], job: Job, event: JobEvent, ref: StatusRef) -> None:
        if ref.status_id is None:
            return
        self._latest[job.id] = (job, event)
        if job.id in self._flushing:
            return
        wait = self._edit_wait(ref.chat_id)
        if wait > 0:
            self._flushing[job.id] = asyncio.create_task(self._flush_later(job.id, ref.chat_id, wait))
            return
        await self._edit_latest(bot, job.id)

    async def _flush_later(self, job_id: str, chat_id: int, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self._locks[chat_id]:
            self._flushing.pop(job_id, None)
            if self._bot is None or self._closed or job_id not in self._latest or job_id in self._ended:
                return
            try:
                await self._edit_latest(self._bot, job_id)
            except TelegramError as err:
                logger.warning("status edit of job %s failed: %s", job_id, type(err).__name__)

    async def _edit_latest(self, bot: ExtBot[Any], job_id: str) -> None:
        job, event = self._latest[job_id]
        ref = self._refs.get(job_id) or ref_from_meta(job)
        if ref is None or ref.status_id is None:
            return
        await self._edit(
            bot, job_id, ref, messages.status_text(job, event), keyboards.cancel_keyboard(job_id)
        )

    def _edit_wait(self, chat_id: int) -> float:
        last = self._last_edit.get(chat_id)
        if last is None:
            return 0.0
        return max(0.0, last + self.min_edit_interval - time.monotonic())

    async def _edit(
        self,
        bot: ExtBot[Any],
        job_id: str,
        ref: StatusRef,
        text: str,
        markup: InlineKeyboardMarkup | None,
        **call: Any,
    ) -> None:
        assert ref.status_id is not None
        self._last_edit[ref.chat_id] = time.monotonic()
        try:
            await bot.edit_message_text(
                text, chat_id=ref.chat_id, message_id=ref.status_id, reply_markup=markup, **call
            )
        except BadRequest as err:
            if "not modified" in err.message.lower():
                return
            if _chat_gone(err):
                raise
            logger.info("status message of job %s is gone (%s); no more edits", job_id, err.message)
            self._refs[job_id] = replace(ref, status_id=None)

    # the end of a job: posted by the outbox ----------------------------------------------------

    async def post(self, job: Job) -> str:
        """Show a finished job in its chat: the final status edit, then the picture with its buttons
        (or the failure, when there is no status message to carry it). Returns the id of the message
        that shows the result. Telegram's errors become the outbox's: `RetryAfter` waits, a chat that
        is gone or closed to the bot refuses, network failures are retried."""
        if self._bot is None or self._closed:
            raise DeliveryRetry(1.0, "the Telegram adapter is not running")
        bot = self._bot
        ref = await self._ref(job)
        if ref is None:
            raise DeliveryRefused(f"{job.chat} is not a Telegram chat")
        async with self._locks[ref.chat_id]:
            self._end(job.id)
            try:
                shown = await self._show_end(bot, job, ref)
            except RetryAfter as err:
                raise DeliveryRetry(_wait_of(err), "Telegram flood control") from err
            except (Forbidden, ChatMigrated) as err:
                raise DeliveryRefused(err.message) from err
            except BadRequest as err:
                if _chat_gone(err):
                    raise DeliveryRefused(err.message) from err
                raise
        self._refs.pop(job.id, None)
        if job.status == JobStatus.DONE:
            self._in_background(self._keep_result_id(job.id, shown))
        return str(shown)

    def _end(self, job_id: str) -> None:
        """No more progress edits for this job: its end is being posted."""
        self._ended[job_id] = None
        while len(self._ended) > REMEMBERED:
            self._ended.popitem(last=False)
        self._latest.pop(job_id, None)
        pending = self._flushing.pop(job_id, None)
        if pending is not None:
            pending.cancel()

    async def _show_end(self, bot: ExtBot[Any], job: Job, ref: StatusRef) -> int:
        """The final status edit (repeating it is harmless), then the one message Telegram cannot
        take back: the picture, or the failure when there is no status message to show it. Returns
        the id of the message that shows the end."""
        text = messages.truncate(presenter.status_line(job), messages.MESSAGE_LIMIT)
        if ref.status_id is not None:
            await asyncio.sleep(self._edit_wait(ref.chat_id))
            await self._edit(bot, job.id, ref, text, None, rate_limit_args=NO_RETRIES)
            ref = self._refs.get(job.id, ref)
        if job.status != JobStatus.DONE:
            if ref.status_id is not None:
                return ref.status_id
            return (await self._send_text(bot, ref, text)).message_id
        try:
            return (await self._send_result(bot, job, ref)).message_id
        except NotFound as err:  # the pictures are gone from the image store
            return (await self._send_text(bot, ref, err.message)).message_id

    async def _send_text(self, bot: ExtBot[Any], ref: StatusRef, text: str) -> Message:
        return await bot.send_message(
            ref.chat_id,
            text,
            reply_parameters=_reply(ref.reply_to),
            message_thread_id=ref.thread_id,
            rate_limit_args=NO_RETRIES,
        )

    async def _send_result(self, bot: ExtBot[Any], job: Job, ref: StatusRef) -> Message:
        if not job.images:
            return await self._send_text(bot, ref, "The job finished without a picture.")
        picture = await result_picture(self.service, job)
        width, height = images.png_size(picture)
        caption = messages.truncate(presenter.describe(job), messages.CAPTION_LIMIT)
        keyboard = keyboards.result_keyboard(
            job.id, len(job.images), choose=STORY_ID in job.meta, share=await self._has_gallery(job.chat)
        )
        common: dict[str, Any] = {
            "caption": caption,
            "reply_markup": keyboard,
            "reply_parameters": _reply(ref.reply_to),
            "filename": f"huahua-{job.id}.png",
            "message_thread_id": ref.thread_id,
            "rate_limit_args": NO_RETRIES,
        }
        if messages.fits_as_photo(len(picture), width, height):
            return await bot.send_photo(ref.chat_id, picture, **common)
        return await bot.send_document(ref.chat_id, picture, **common)

    async def _keep_result_id(self, job_id: str, message_id: int) -> None:
        """The result's message id on the job, for /share as a reply to it. Runs once the outbox got
        the id, so that marking the delivery sent is the only await after Telegram's answer."""
        try:
            await self.service.update_meta(job_id, {META_RESULT: str(message_id)})
        except HuahuaError as err:
            logger.warning("could not keep the result message id on job %s: %s", job_id, err.message)

    def _in_background(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _has_gallery(self, chat: str) -> bool:
        try:
            return bool((await self.service.chat_settings(chat)).gallery)
        except HuahuaError as err:
            logger.warning("could not read the settings of chat %s: %s", chat, err.message)
            return False


async def result_picture(service: Huahua, job: Job) -> bytes:
    """What a finished job shows in the chat: its one picture, or a grid of its pictures."""
    pngs = [await service.image(digest) for digest in job.images]
    return pngs[0] if len(pngs) == 1 else images.grid(pngs)


def _reply(message_id: int | None) -> ReplyParameters | None:
    if message_id is None:
        return None
    return ReplyParameters(message_id=message_id, allow_sending_without_reply=True)


def _chat_gone(err: BadRequest) -> bool:
    """Telegram's 400 for a chat the bot can no longer reach (deleted, or never shared with it)."""
    return "chat not found" in err.message.lower()


def _wait_of(err: RetryAfter) -> float:
    """Telegram's `retry_after` in seconds (an int or a timedelta, depending on PTB_TIMEDELTA)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        retry_after = err.retry_after
    if isinstance(retry_after, datetime.timedelta):
        return retry_after.total_seconds()
    return float(retry_after)
