"""/share and the ↗️ button: post a result, or the chat's storybook, to the chat's gallery channel.

The gallery is the chat setting `gallery` (`/settings gallery @my_gallery`, admins only): a Telegram
chat id such as -1001234567890 or a public @channelusername. The bot must be an admin of that channel
with the right to post.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from telegram import Bot, InputMediaPhoto, Message
from telegram.error import BadRequest, Forbidden, TelegramError

from bots.telegram import keyboards, messages
from bots.telegram.delivery import META_RESULT, result_picture
from core import images, presenter
from core.errors import HuahuaError, InvalidOption, NotAllowed, ServiceUnavailable
from core.service import Huahua
from core.story.book import StoryBook
from core.types import Job, JobStatus

logger = logging.getLogger(__name__)

RECENT_RESULTS = 50
"""How far back a /share reply looks for the picture it answers."""
"""How far back /share looks for the sender's latest result in the chat."""
ALBUM_MAX = 10
NAME_LIMIT = 64
NO_GALLERY = "This chat has no gallery channel yet. An admin can set one with /settings gallery @channel."
_USERNAME = re.compile(r"^@[A-Za-z][A-Za-z0-9_]{3,31}$")
_CHAT_ID = re.compile(r"^-?[1-9][0-9]{0,19}$")
_NO_ACCESS = (
    "chat not found",
    "not enough rights",
    "have no rights",
    "need administrator rights",
    "chat_write_forbidden",
    "chat_admin_required",
    "not a member",
)
"""Telegram's 400 descriptions that mean the bot cannot post in the gallery."""

AdminCheck = Callable[[], Awaitable[bool]]
"""Asked only when the sharer does not own what they share (it may cost a getChatMember call)."""


@dataclass(frozen=True)
class Sharer:
    """Who shares, and from which chat."""

    user: str
    name: str
    chat: str
    chat_title: str

    @property
    def credit(self) -> str:
        name = messages.truncate(self.name.strip() or "someone", NAME_LIMIT)
        return f"shared by {name} from {messages.truncate(self.chat_title, NAME_LIMIT)}"


@dataclass(frozen=True)
class GalleryTarget:
    """Where to post: a chat id or an @username, and how to name it to users."""

    chat_id: int | str

    @property
    def shown(self) -> str:
        return str(self.chat_id)


def job_id_in(message: Message) -> str | None:
    """The job behind one of our result messages, read from its inline buttons."""
    markup = message.reply_markup
    for row in markup.inline_keyboard if markup else ():
        for button in row:
            press = keyboards.decode(button.callback_data)
            if press is not None:
                return press.job_id
    return None


class Gallery:
    """Shares results and storybooks; holds no state of its own."""

    def __init__(self, service: Huahua) -> None:
        self.service = service

    # a picture ---------------------------------------------------------------------------------

    async def share_picture(
        self,
        bot: Bot,
        sharer: Sharer,
        is_admin: AdminCheck,
        *,
        job_id: str | None = None,
        reply_to: Message | None = None,
    ) -> str:
        """Post a result with its caption and a credit line; returns the sentence for the sharer."""
        target = await self.target(sharer.chat)
        job = await self._job_to_share(sharer, job_id, reply_to)
        if job.chat != sharer.chat:
            raise InvalidOption("That picture was not made in this chat.")
        if job.user != sharer.user and not await is_admin():
            raise NotAllowed("Only the person who asked for this picture, or an admin, can share it.")
        if job.status != JobStatus.DONE or not job.images:
            raise InvalidOption("That picture is not ready yet: wait for it to finish.")
        picture = await result_picture(self.service, job)
        credit = f"↗️ {sharer.credit}"
        room = messages.CAPTION_LIMIT - len(credit.encode("utf-16-le")) // 2 - 1
        caption = f"{messages.truncate(presenter.describe(job), room)}\n{credit}"
        name = f"huahua-{job.id}.png"
        async with _posting(target, "picture"):
            if _fits_as_photo(picture):
                await bot.send_photo(target.chat_id, picture, caption=caption, filename=name)
            else:
                await bot.send_document(target.chat_id, picture, caption=caption, filename=name)
        return f"↗️ Shared to {target.shown}."

    async def _job_to_share(self, sharer: Sharer, job_id: str | None, reply_to: Message | None) -> Job:
        if job_id is not None:
            if not job_id.isalnum() or len(job_id) > 64:
                raise InvalidOption(
                    "Use /share alone for your latest picture, /share as a reply to a picture, "
                    "or /share story."
                )
            return await self.service.get_job(job_id)
        if reply_to is not None:
            return await self._job_of_message(sharer.chat, reply_to)
        return await self.service.last_result(sharer.chat, sharer.user)

    async def _job_of_message(self, chat: str, message: Message) -> Job:
        found = job_id_in(message)
        if found is not None:
            return await self.service.get_job(found)
        for job in await self.service.store.recent_jobs(chat, RECENT_RESULTS):
            if job.meta.get(META_RESULT) == str(message.message_id):
                return job
        raise InvalidOption("Reply with /share to one of my pictures, or send /share alone for your latest.")

    # a storybook -------------------------------------------------------------------------------

    async def share_story(self, bot: Bot, sharer: Sharer, is_admin: AdminCheck) -> str:
        """Post the active story's panels as albums, then its HTML and PDF, to the gallery."""
        target = await self.target(sharer.chat)
        book = self.service.handler("story")
        if not isinstance(book, StoryBook):
            raise InvalidOption("Stories are not switched on for this bot.")
        shared = await book.for_sharing(sharer.chat, sharer.user, is_admin)
        story, panels = shared.story, list(shared.panels)
        title = f"📚 “{story.title}” — {len(panels)} panels, {sharer.credit}"
        async with _posting(target, "storybook"):
            await _send_album(bot, target, messages.truncate(title, messages.CAPTION_LIMIT), panels)
            for name, data in shared.files:
                await bot.send_document(target.chat_id, data, filename=name)
        return f"📚 Shared “{story.title}” to {target.shown}: {len(panels)} panels, HTML and PDF."

    # the gallery -------------------------------------------------------------------------------

    async def target(self, chat: str) -> GalleryTarget:
        """The chat's gallery; a friendly error when none is set or the setting is malformed."""
        value = ((await self.service.chat_settings(chat)).gallery or "").strip()
        if not value:
            raise InvalidOption(NO_GALLERY)
        if _CHAT_ID.match(value):
            return GalleryTarget(int(value))
        if _USERNAME.match(value):
            return GalleryTarget(value)
        raise InvalidOption(
            "The gallery must be a chat id like -1001234567890 or a @channelusername: "
            "an admin can set it with /settings gallery @channel."
        )


async def _send_album(bot: Bot, target: GalleryTarget, caption: str, panels: list[tuple[str, bytes]]) -> None:
    """Panels as albums of at most ten (a lone one as a photo); the caption goes on the first."""
    photos = [(name, data) for name, data in panels if _fits_as_photo(data)]
    for name, data in [(name, data) for name, data in panels if not _fits_as_photo(data)]:
        await bot.send_document(target.chat_id, data, filename=name)
    for start in range(0, len(photos), ALBUM_MAX):
        album = photos[start : start + ALBUM_MAX]
        first = caption if start == 0 else None
        if len(album) == 1:
            name, data = album[0]
            await bot.send_photo(target.chat_id, data, caption=first, filename=name)
            continue
        media = [
            InputMediaPhoto(data, filename=name, caption=first if index == 0 else None)
            for index, (name, data) in enumerate(album)
        ]
        await bot.send_media_group(target.chat_id, media)


def _fits_as_photo(png: bytes) -> bool:
    try:
        width, height = images.png_size(png)
    except HuahuaError:
        return False
    return messages.fits_as_photo(len(png), width, height)


@contextlib.asynccontextmanager
async def _posting(target: GalleryTarget, what: str) -> AsyncIterator[None]:
    """Telegram's refusals as one sentence: no access means the bot must be a posting admin there."""
    no_access = (
        f"I can't post in {target.shown}: add me to that channel as an admin who can post messages, "
        "then share again."
    )
    try:
        yield
    except Forbidden:
        raise NotAllowed(no_access) from None
    except BadRequest as err:
        if any(marker in err.message.lower() for marker in _NO_ACCESS):
            raise NotAllowed(no_access) from None
        logger.warning("the gallery %s refused a %s: %s", target.shown, what, err.message)
        raise ServiceUnavailable(
            f"Telegram did not take the {what} for {target.shown}; please try again."
        ) from None
    except TelegramError as err:
        logger.warning("posting a %s to the gallery failed: %s", what, type(err).__name__)
        raise ServiceUnavailable(
            f"I couldn't reach Telegram to post the {what} to {target.shown}; please try again."
        ) from None
