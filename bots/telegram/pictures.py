"""Pictures users send: a photo (or an image document) captioned `/cast add <name>: <description>`."""

from __future__ import annotations

import logging

from telegram import Bot, Message
from telegram.error import TelegramError

from core.errors import InvalidOption, ServiceUnavailable
from core.images import check_upload_bytes

logger = logging.getLogger(__name__)


def cast_add_args(caption: str, username: str) -> str | None:
    """The `<name>: <description>` of a `/cast add` caption (also `/cast@<this bot> add`); None for any
    other caption, which the bot leaves alone."""
    stripped = caption.strip()
    if not stripped.startswith("/"):
        return None
    head, _, rest = stripped[1:].partition(" ")
    name, _, target = head.partition("@")
    if name.lower() != "cast" or (target and target.lower() != username.lower()):
        return None
    sub, _, args = rest.strip().partition(" ")
    return args.strip() if sub.lower() == "add" else None


def picture_file(message: Message) -> tuple[str, int | None] | None:
    """(file id, size Telegram reports) of the message's picture: the largest photo size, or an image
    document; None when it has neither."""
    if message.photo:
        largest = max(message.photo, key=lambda size: (size.width * size.height, size.file_size or 0))
        return largest.file_id, largest.file_size
    document = message.document
    if document is not None and (document.mime_type or "").startswith("image/"):
        return document.file_id, document.file_size
    return None


async def download_picture(bot: Bot, message: Message) -> bytes:
    """The picture's bytes; a picture Telegram says is over the upload limit is refused unread."""
    found = picture_file(message)
    if found is None:
        raise InvalidOption("Send the picture as a photo or an image file with the /cast add caption.")
    file_id, size = found
    if size is not None:
        check_upload_bytes(size)
    try:
        remote = await bot.get_file(file_id)
        if remote.file_size is not None:
            check_upload_bytes(remote.file_size)
        return bytes(await remote.download_as_bytearray())
    except TelegramError as err:
        logger.warning("could not download a picture from Telegram: %s", type(err).__name__)
        raise ServiceUnavailable(
            "I couldn't fetch that picture from Telegram; please send it again."
        ) from None
