"""The Telegram adapter: updates in, service calls, replies and job deliveries out.

In a forum supergroup every topic is its own chat for the service ("tg:<chat_id>:<thread_id>"): it has
its own active story, its own jobs, and its own chat settings (`/settings` in a topic changes that topic
only; a topic's gallery is unset until set there). Messages outside topics use "tg:<chat_id>".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections import defaultdict
from dataclasses import dataclass
from urllib.parse import urlsplit

from telegram import BotCommand, Chat, InputMediaPhoto, Message, MessageEntity, Update, User
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    ContextTypes,
    filters,
)
from telegram.ext import MessageHandler as TgMessageHandler

from bots.telegram import keyboards, messages, pictures
from bots.telegram.delivery import STATUS_EVENTS, Delivery, StatusRef, chat_key, meta_for
from bots.telegram.gallery import Gallery, Sharer
from bots.telegram.ratelimit import RateLimiter
from core import images
from core.errors import HuahuaError, InvalidOption, NotAllowed, ServiceUnavailable
from core.listening import cannot_listen
from core.logs import RedactSecrets
from core.service import Huahua, MessageContext, Reply
from core.settings import Settings
from core.story.book import StoryBook
from core.story.model import picture_panel
from core.types import Action

logger = logging.getLogger(__name__)

BUILTIN_COMMANDS = (
    ("imagine", "Draw a picture: /imagine a cat under cherry blossoms --ar 3:2"),
    ("settings", "Show or change this chat's settings"),
    ("help", "How to use Huahua"),
    ("start", "Say hello"),
)
ADAPTER_COMMANDS = (("share", "Post your latest picture (or /share story) to the gallery channel"),)
"""Commands the adapter answers itself, listed after the service's."""
COMMAND_DESCRIPTIONS = {
    "story": "Start or continue a story",
    "cast": "Describe the story's characters",
    "illustrate": "Illustrate a story excerpt",
}
ADMIN_STATUSES = ("creator", "administrator")
ALBUM_MAX = 10
WORKING = "⏳ …"
_COMMAND_NAME = re.compile(r"^[a-z0-9_]{1,32}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


@dataclass(frozen=True)
class Incoming:
    """A message the bot should answer: the text for the service and whether it asks for a picture."""

    text: str
    command: str


class TelegramAdapter:
    """Translates between python-telegram-bot and the Huahua service; holds no job state of its own."""

    def __init__(self, service: Huahua, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        self.delivery = Delivery(service)
        self.gallery = Gallery(service)
        self._chat_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        """One message at a time per chat (or topic), so passages and commands keep the chat's order."""

    # incoming messages -------------------------------------------------------------------------

    async def on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, chat, sender = update.effective_message, update.effective_chat, update.effective_user
        if message is None or chat is None or sender is None or sender.is_bot or not message.text:
            return
        async with self._chat_locks[chat_key(chat.id, topic_of(message))]:
            await self._on_message(message, chat, sender, context)

    async def _on_message(
        self, message: Message, chat: Chat, sender: User, context: ContextTypes.DEFAULT_TYPE
    ) -> None:
        sender_id = sender.id
        thread_id = topic_of(message)
        user, key = f"tg:{sender_id}", chat_key(chat.id, thread_id)
        incoming = await self.incoming(message, chat, context.bot.username)
        if incoming is None:
            return
        if incoming.command == "share":
            await self._share(message, chat, sender, incoming.text.partition(" ")[2].strip(), context)
            return
        is_admin = await self._is_admin(context, chat, sender_id, incoming.command)
        reply_to = message.reply_to_message
        meta = meta_for(None, message.message_id)
        if incoming.command == "imagine":
            status = await message.reply_text(WORKING, do_quote=True)
            meta = meta_for(status.message_id, message.message_id)
            reply = await self.service.handle_message(
                key, user, incoming.text, MessageContext(is_admin=is_admin, meta=meta)
            )
            if reply.jobs:
                await self.delivery.track(
                    reply.jobs[0], StatusRef(chat.id, status.message_id, message.message_id, thread_id)
                )
            else:
                await status.edit_text(
                    messages.truncate("\n".join(reply.texts) or "🤷", messages.MESSAGE_LIMIT)
                )
            await self._send_attachments(message, reply)
            return
        context_ = MessageContext(
            is_admin=is_admin,
            reply_to_text=(reply_to.text or reply_to.caption) if reply_to else None,
            meta=meta,
        )
        async with self.delivery.creating(chat.id):
            reply = await self.service.handle_message(key, user, incoming.text, context_)
            await self._answer(message, reply)

    async def on_picture(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A photo or image document captioned `/cast add <name>: <description>`: the cast member's
        reference picture. Pictures with any other caption are left alone."""
        message, chat, sender = update.effective_message, update.effective_chat, update.effective_user
        if message is None or chat is None or sender is None or sender.is_bot:
            return
        args = pictures.cast_add_args(message.caption or "", context.bot.username)
        book = self.service.handler("cast")
        if args is None or not isinstance(book, StoryBook):
            return
        key = chat_key(chat.id, topic_of(message))
        async with self._chat_locks[key]:
            try:
                picture = await pictures.download_picture(context.bot, message)
                reply = await book.cast_add_with_picture(key, f"tg:{sender.id}", args, picture)
            except HuahuaError as err:
                reply = Reply(texts=(err.message,), error=err)
            await self._answer(message, reply)

    async def incoming(self, message: Message, chat: Chat, username: str) -> Incoming | None:
        """What to pass to the service; None ignores it (group chatter, other bots' commands).

        Plain text asks for a picture in private chats and when the bot is mentioned; in a chat whose
        story is on auto (`/story auto on`) it is a story passage instead. Telegram only hands a bot the
        group's plain messages when its privacy mode is off (@BotFather /setprivacy) or it is an admin."""
        text = message.text or ""
        stripped = text.strip()
        if stripped.startswith("/"):
            head, _, rest = stripped[1:].partition(" ")
            name, _, target = head.partition("@")
            if target and target.lower() != username.lower():
                return None
            return Incoming(f"/{name} {rest}".strip(), name.lower())
        mentioned = None if chat.type == Chat.PRIVATE else _without_mention(message, username)
        if mentioned is not None:
            return Incoming(f"/imagine {mentioned}".strip(), "imagine")
        if await self._story_auto(chat_key(chat.id, topic_of(message))):
            return Incoming(stripped, "")
        if chat.type == Chat.PRIVATE:
            return Incoming(f"/imagine {stripped}", "imagine")
        return None

    async def _story_auto(self, key: str) -> bool:
        if "" not in self.service.commands():
            return False
        try:
            return (await self.service.chat_settings(key)).story_auto
        except HuahuaError as err:
            logger.warning("could not read the settings of chat %s: %s", key, err.message)
            return False

    async def _is_admin(
        self, context: ContextTypes.DEFAULT_TYPE, chat: Chat, user_id: int, command: str
    ) -> bool:
        if chat.type == Chat.PRIVATE:
            return True
        if command in ("imagine", "start", "help", ""):
            return False
        try:
            member = await context.bot.get_chat_member(chat.id, user_id)
        except TelegramError as err:
            logger.warning("getChatMember failed in chat %s: %s", chat.id, type(err).__name__)
            return False
        return member.status in ADMIN_STATUSES

    async def _answer(self, message: Message, reply: Reply) -> None:
        """The reply's sentences, a status message per job (its sentence, when it has one), then files."""
        texts = list(reply.texts)
        split_at = max(0, len(texts) - len(reply.jobs))
        plain, job_texts = texts[:split_at], texts[split_at:]
        for text in plain:
            for chunk in messages.split(text):
                await message.reply_text(chunk, do_quote=True)
        for number, job in enumerate(reply.jobs):
            first = job_texts[number] if number < len(job_texts) else WORKING
            status = await message.reply_text(
                messages.truncate(first, messages.MESSAGE_LIMIT),
                do_quote=True,
                reply_markup=keyboards.cancel_keyboard(job.id),
            )
            ref = StatusRef(message.chat_id, status.message_id, message.message_id, topic_of(message))
            await self.delivery.track(job, ref)
        await self._send_attachments(message, reply)

    async def _send_attachments(self, message: Message, reply: Reply) -> None:
        """Files in the reply's order: PNGs as photos (consecutive ones as albums), others as documents."""
        photos: list[tuple[str, bytes]] = []
        for name, data in reply.attachments:
            if _is_photo(name, data):
                photos.append((name, data))
                continue
            await self._send_photos(message, photos)
            photos = []
            await message.reply_document(data, filename=name, do_quote=True)
        await self._send_photos(message, photos)

    async def _send_photos(self, message: Message, photos: list[tuple[str, bytes]]) -> None:
        for start in range(0, len(photos), ALBUM_MAX):
            album = photos[start : start + ALBUM_MAX]
            if len(album) == 1:
                name, data = album[0]
                await message.reply_photo(data, filename=name, do_quote=True)
            else:
                media = [InputMediaPhoto(data, filename=name) for name, data in album]
                await message.reply_media_group(media, do_quote=True)

    # sharing to the gallery --------------------------------------------------------------------

    async def _share(
        self, message: Message, chat: Chat, sender: User, args: str, context: ContextTypes.DEFAULT_TYPE
    ) -> None:
        """/share, /share story, or /share as a reply to a result: the outcome as one sentence."""
        sharer = _sharer(message, sender)

        async def is_admin() -> bool:
            return await self._is_admin(context, chat, sender.id, "share")

        try:
            if args.lower() == "story":
                text = await self.gallery.share_story(context.bot, sharer, is_admin)
            else:
                text = await self.gallery.share_picture(
                    context.bot, sharer, is_admin, job_id=args or None, reply_to=message.reply_to_message
                )
        except HuahuaError as err:
            text = err.message
        await message.reply_text(messages.truncate(text, messages.MESSAGE_LIMIT), do_quote=True)

    async def _share_button(
        self, query_message: Message | None, sender: User, job_id: str, context: ContextTypes.DEFAULT_TYPE
    ) -> str:
        if query_message is None:
            raise InvalidOption("That message is too old for its buttons; use /share instead.")
        chat = query_message.chat

        async def is_admin() -> bool:
            return await self._is_admin(context, chat, sender.id, "share")

        sharer = _sharer(query_message, sender)
        return await self.gallery.share_picture(context.bot, sharer, is_admin, job_id=job_id)

    # buttons -----------------------------------------------------------------------------------

    async def on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        press = keyboards.decode(query.data)
        if press is None:
            await query.answer("That button no longer works.")
            return
        user = f"tg:{query.from_user.id}"
        message = query.message if isinstance(query.message, Message) else None
        try:
            if press.action == Action.CANCEL:
                await self._cancel(context, query.message.chat if query.message else None, press.job_id, user)
                await query.answer("Cancelling…")
                return
            if press.action == keyboards.SHARE:
                text = await self._share_button(message, query.from_user, press.job_id, context)
                await query.answer(messages.truncate(text, 200))
                return
            if press.action == Action.CHOOSE:
                job = await self.service.act(press.job_id, Action.CHOOSE, press.index, user)
                panel = picture_panel(job, press.index)
                await query.answer(f"⭐ Panel {panel or '?'} uses this picture.")
                return
            if message is None:
                raise InvalidOption("That message is too old for its buttons; ask again with /imagine.")
            await self._act_with_status(message, press, user)
            await query.answer(_ACK.get(press.action, "…"))
        except HuahuaError as err:
            await query.answer(messages.truncate(err.message, 200), show_alert=True)

    async def _act_with_status(self, message: Message, press: keyboards.ButtonPress, user: str) -> None:
        """Reroll, variation, upscale: a status message first, so the new job has its ids from creation."""
        async with self.delivery.creating(message.chat_id):
            status = await message.reply_text(WORKING, do_quote=True)
            meta = meta_for(status.message_id, message.message_id)
            try:
                job = await self.service.act(press.job_id, press.action, press.index, user, meta)
            except HuahuaError:
                with contextlib.suppress(TelegramError):
                    await status.delete()
                raise
            ref = StatusRef(message.chat_id, status.message_id, message.message_id, topic_of(message))
            await self.delivery.track(job, ref)

    async def _cancel(
        self, context: ContextTypes.DEFAULT_TYPE, chat: Chat | None, job_id: str, user: str
    ) -> None:
        try:
            await self.service.cancel(job_id, user)
        except NotAllowed:
            if chat is None or chat.type == Chat.PRIVATE:
                raise
            if not await self._is_admin(context, chat, int(user[3:]), "cancel"):
                raise
            await self.service.cancel(job_id, user, is_admin=True)

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        err = context.error
        network = _is_network(err)
        logger.error("telegram handler failed: %s", type(err).__name__, exc_info=None if network else err)

    # commands menu -----------------------------------------------------------------------------

    def commands(self) -> list[BotCommand]:
        """The /command menu: the built-in commands and the registered command families."""
        menu = [BotCommand(name, description) for name, description in BUILTIN_COMMANDS]
        for name in sorted(set(self.service.commands())):
            if _COMMAND_NAME.match(name) and name not in dict(BUILTIN_COMMANDS):
                menu.append(BotCommand(name, COMMAND_DESCRIPTIONS.get(name, f"/{name}")))
        menu.extend(BotCommand(name, description) for name, description in ADAPTER_COMMANDS)
        return menu


_ACK = {
    Action.REROLL: "Rerolling…",
    Action.VARIATION: "Making a variation…",
    Action.UPSCALE: "Upscaling…",
    Action.CANCEL: "Cancelling…",
}


def topic_of(message: Message) -> int | None:
    """The forum topic a message belongs to; None outside topics (a reply chain is not a topic)."""
    return message.message_thread_id if message.is_topic_message else None


def _sharer(message: Message, sender: User) -> Sharer:
    chat = message.chat
    title = "a private chat" if chat.type == Chat.PRIVATE else (chat.title or "a group")
    key = chat_key(chat.id, topic_of(message))
    return Sharer(user=f"tg:{sender.id}", name=sender.full_name, chat=key, chat_title=title)


def _is_photo(name: str, data: bytes) -> bool:
    if not name.lower().endswith(".png"):
        return False
    try:
        width, height = images.png_size(data)
    except HuahuaError:
        return False
    return messages.fits_as_photo(len(data), width, height)


def _is_network(err: object) -> bool:
    return isinstance(err, NetworkError)


def _without_mention(message: Message, username: str) -> str | None:
    """The text with the bot's @mention removed, or None when the bot is not mentioned."""
    text = message.text or ""
    target = f"@{username}".lower()
    for entity in message.entities:
        if entity.type != MessageEntity.MENTION:
            continue
        found = message.parse_entity(entity)
        if found.lower() == target:
            start = entity.offset
            utf16 = text.encode("utf-16-le")
            before = utf16[: start * 2].decode("utf-16-le")
            after = utf16[(start + entity.length) * 2 :].decode("utf-16-le")
            return f"{before} {after}".strip()
    return None


def build_application(service: Huahua, settings: Settings) -> Application:  # type: ignore[type-arg]
    """A python-telegram-bot Application wired to the service; it does no I/O until started."""
    if settings.telegram_token is None or not settings.telegram_token.get_secret_value().strip():
        raise InvalidOption("Set HUAHUA_TELEGRAM_TOKEN to the token @BotFather gave you.")
    _redact_in_logs(settings.telegram_token.get_secret_value().strip())
    root = settings.telegram_base_url.rstrip("/")
    adapter = TelegramAdapter(service, settings)
    app = (
        ApplicationBuilder()
        .token(settings.telegram_token.get_secret_value().strip())
        .base_url(f"{root}/bot")
        .base_file_url(f"{root}/file/bot")
        .rate_limiter(RateLimiter(max_retries=2))
        .concurrent_updates(True)
        .build()
    )
    app.bot_data["adapter"] = adapter
    app.add_handler(TgMessageHandler(filters.TEXT & ~filters.UpdateType.EDITED, adapter.on_message))
    pictures_sent = (filters.PHOTO | filters.Document.IMAGE) & filters.CAPTION & ~filters.UpdateType.EDITED
    app.add_handler(TgMessageHandler(pictures_sent, adapter.on_picture))
    app.add_handler(CallbackQueryHandler(adapter.on_button))
    app.add_error_handler(adapter.on_error)
    service.listen("tg:", adapter.delivery.on_event, STATUS_EVENTS)
    return app


LOGGERS_SEEING_THE_TOKEN = ("httpx", "telegram.Bot", "telegram.ext.ExtBot", "telegram.ext.Updater")


def _redact_in_logs(token: str) -> None:
    for name in LOGGERS_SEEING_THE_TOKEN:
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) and token in f.secrets for f in target.filters):
            target.addFilter(RedactSecrets([token]))


def adapter_of(app: Application) -> TelegramAdapter:  # type: ignore[type-arg]
    adapter = app.bot_data["adapter"]
    assert isinstance(adapter, TelegramAdapter)
    return adapter


async def start_application(
    app: Application,  # type: ignore[type-arg]
    settings: Settings,
    *,
    webhook_listen: str = "0.0.0.0",
    poll_timeout: int = 10,
) -> None:
    """Connect (getMe), publish the command menu, start delivering (serving the "tg" outbox from this
    process), then poll or serve the webhook."""
    adapter = adapter_of(app)
    secret = webhook_secret(settings) if settings.telegram_webhook_url else None
    try:
        await app.initialize()
    except InvalidToken:
        await app.bot.shutdown()
        raise ServiceUnavailable("Telegram rejected the bot token: check HUAHUA_TELEGRAM_TOKEN.") from None
    except NetworkError:
        await app.bot.shutdown()
        raise ServiceUnavailable(
            f"I can't reach the Telegram Bot API at {settings.telegram_base_url}; is the network up?"
        ) from None
    await app.bot.set_my_commands(adapter.commands())
    adapter.delivery.attach(app.bot)
    adapter.service.outbox.serve("tg", adapter.delivery.post)
    await app.start()
    assert app.updater is not None
    if settings.telegram_webhook_url:
        url_path = urlsplit(settings.telegram_webhook_url).path.lstrip("/")
        try:
            await app.updater.start_webhook(
                listen=webhook_listen,
                port=settings.telegram_webhook_port,
                url_path=url_path,
                webhook_url=settings.telegram_webhook_url,
                secret_token=secret,
                allowed_updates=[Update.MESSAGE, Update.CALLBACK_QUERY],
            )
        except OSError as err:
            await stop_application(app)
            raise cannot_listen(
                err,
                webhook_listen,
                settings.telegram_webhook_port,
                what="The Telegram webhook",
                settings="HUAHUA_TELEGRAM_WEBHOOK_PORT",
            ) from None
        logger.info("telegram webhook listening on port %d", settings.telegram_webhook_port)
    else:
        await app.updater.start_polling(
            poll_interval=0.0, timeout=poll_timeout, allowed_updates=[Update.MESSAGE, Update.CALLBACK_QUERY]
        )
        logger.info("telegram long polling as @%s", app.bot.username)


def webhook_secret(settings: Settings) -> str:
    """The configured secret_token, or a random one for this run; Telegram allows A-Z a-z 0-9 _ -."""
    if settings.telegram_webhook_secret is None:
        return secrets.token_urlsafe(32)
    secret = settings.telegram_webhook_secret.get_secret_value()
    if not _SECRET.match(secret):
        raise InvalidOption(
            "HUAHUA_TELEGRAM_WEBHOOK_SECRET must be 1-256 characters of A-Z, a-z, 0-9, _ and -."
        )
    return secret


async def stop_application(app: Application) -> None:  # type: ignore[type-arg]
    """Stop delivering (pending results wait in the outbox), stop receiving updates, close the pool."""
    adapter = adapter_of(app)
    await adapter.service.outbox.stop("tg")
    adapter.delivery.close()
    if app.updater is not None and app.updater.running:
        await app.updater.stop()
    if app.running:
        await app.stop()
    await app.shutdown()


async def run_telegram(service: Huahua, settings: Settings) -> None:
    """Run the bot until cancelled.

    The status listener is registered before the first await: call this right after `service.start()`
    (or before it) so that recovered jobs show their progress. Results owed to Telegram chats wait in
    the outbox and are posted once the bot has started.
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = build_application(service, settings)
    await start_application(app, settings)
    try:
        await asyncio.Event().wait()
    finally:
        await stop_application(app)
