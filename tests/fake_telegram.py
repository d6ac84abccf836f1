"""A fake Telegram Bot API on loopback: scripted updates in, every bot call recorded.

It speaks the wire format python-telegram-bot uses (form, multipart with files, or JSON bodies) and
answers like the real API for the methods the adapter calls, including its 400s for edits of missing or
unchanged messages, so the real `telegram.ext.Application` runs against it unchanged. `fail_next` scripts
the failures of a busy or unreachable API: 429 with `retry_after`, 5xx, 403, or a dropped connection.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

BOT_USER = {
    "id": 4242,
    "is_bot": True,
    "first_name": "Huahua",
    "username": "huahua_bot",
    "can_join_groups": True,
    "can_read_all_group_messages": False,
    "supports_inline_queries": False,
}
STRING_PARAMS = {"text", "caption", "callback_query_id", "secret_token", "url", "parse_mode", "file_id"}
MAX_POLL_WAIT_S = 0.3


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    filenames: dict[str, str] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)
    status: int = 200
    """The HTTP status answered (0: the connection was dropped); only a 200 did anything."""
    result: Any = None
    """What a 200 answered with (for send* methods, the message the fake made)."""


@dataclass(frozen=True)
class Failure:
    """A scripted answer to one call: an HTTP error status, or 0 to drop the connection unanswered."""

    status: int
    retry_after: int | None = None
    description: str = ""


class FakeTelegram:
    """Start with `await fake.start()`; point the bot at `fake.root` (the Bot API root URL)."""

    def __init__(self, token: str = "123456:TEST-token-not-real") -> None:
        self.token = token
        self.calls: list[Call] = []
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}
        self.admins: set[tuple[int, int]] = set()
        self.files: dict[str, bytes] = {}
        self.channels: dict[str, int] = {}
        """Public channels: "@username" -> chat id; an unknown @username answers 400 chat not found."""
        self.forbidden: set[int] = set()
        """Chats the bot may not post in (a channel it is not in, a group it was removed from): sending or
        editing there answers 403."""
        self.forums: set[int] = set()
        """Supergroups with topics: messages there may carry a `message_thread_id`."""
        self.failures: dict[str, list[Failure]] = defaultdict(list)
        """Scripted answers per method, used (in order) before the method runs."""
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(100)
        self._file_ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.root = ""

    # server ------------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.*}", self._file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.root = f"http://127.0.0.1:{port}"
        return self.root

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _api(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params, files, filenames = await _read_params(request)
        call = Call(method, params, files, filenames)
        failure = self.failures[method].pop(0) if self.failures.get(method) else None
        if failure is not None:
            call.status = failure.status
        if method != "getUpdates":
            self.calls.append(call)
            async with self._changed:
                self._changed.notify_all()
        if failure is not None:
            return _failed(request, failure)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return _error(404, "Not Found: method not found")
        try:
            if "chat_id" in params and method.startswith("send"):
                params = {**params, "chat_id": self._chat_id(params["chat_id"])}
            elif "chat_id" in params and method.startswith(("edit", "delete")):
                if int(params["chat_id"]) in self.forbidden:
                    raise ForbiddenError("bot was kicked from the group chat")
            result = await handler(params, files)
        except ForbiddenError as err:
            call.status = 403
            return _error(403, f"Forbidden: {err}")
        except ApiError as err:
            call.status = 400
            return _error(400, f"Bad Request: {err}")
        call.result = result
        return web.json_response({"ok": True, "result": result})

    async def _file(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["path"])
        if data is None or request.match_info["token"] != self.token:
            return web.Response(status=404)
        return web.Response(body=data)

    # scripting from tests ----------------------------------------------------------------------

    def user(self, user_id: int, name: str = "Alice") -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": name}

    def chat(self, chat_id: int) -> dict[str, Any]:
        for username, channel_id in self.channels.items():
            if channel_id == chat_id:
                return {"id": chat_id, "type": "channel", "title": "Gallery", "username": username[1:]}
        if chat_id in self.forums:
            return {"id": chat_id, "type": "supergroup", "title": "Test forum", "is_forum": True}
        if chat_id < 0:
            return {"id": chat_id, "type": "supergroup", "title": "Test group"}
        return {"id": chat_id, "type": "private", "first_name": "Alice"}

    def send_text(
        self,
        chat_id: int,
        user_id: int,
        text: str,
        *,
        reply_to: dict[str, Any] | None = None,
        thread_id: int | None = None,
    ) -> dict[str, Any]:
        """A user writes `text` (in forum topic `thread_id`, if given); returns the message as the bot
        will receive it."""
        message = self._message(chat_id, self.user(user_id), text=text, entities=_entities(text))
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        if thread_id is not None:
            if chat_id not in self.forums:
                raise ValueError(f"chat {chat_id} is not a forum: add it to fake.forums")
            message.update(message_thread_id=thread_id, is_topic_message=True)
        self._push({"message": message})
        return message

    def send_picture(
        self,
        chat_id: int,
        user_id: int,
        data: bytes,
        caption: str,
        *,
        as_document: str | None = None,
        reported_size: int | None = None,
    ) -> dict[str, Any]:
        """A user sends a picture with `caption`: a photo (a thumbnail of at most 90 pixels a side,
        then the full size, as Telegram lists them), or with `as_document` a document of that MIME
        type. The file is kept for getFile and download; `reported_size` overrides the size the
        update claims."""
        file_id = self._store_file(data)
        size = len(data) if reported_size is None else reported_size
        if as_document is not None:
            document = {
                "file_id": file_id,
                "file_unique_id": f"u{file_id}",
                "file_name": "picture",
                "mime_type": as_document,
                "file_size": size,
            }
            content: dict[str, Any] = {"document": document}
        else:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
            scale = min(1.0, 90 / max(width, height))
            thumb_w, thumb_h = max(1, int(width * scale)), max(1, int(height * scale))
            thumb = io.BytesIO()
            Image.new("RGB", (thumb_w, thumb_h)).save(thumb, format="JPEG")
            thumb_id = self._store_file(thumb.getvalue())
            content = {
                "photo": [
                    {
                        "file_id": thumb_id,
                        "file_unique_id": f"u{thumb_id}",
                        "width": thumb_w,
                        "height": thumb_h,
                    },
                    {
                        "file_id": file_id,
                        "file_unique_id": f"u{file_id}",
                        "width": width,
                        "height": height,
                        "file_size": size,
                    },
                ]
            }
        message = self._message(
            chat_id, self.user(user_id), caption=caption, caption_entities=_entities(caption), **content
        )
        self._push({"message": message})
        return message

    def press(self, chat_id: int, user_id: int, message: dict[str, Any], data: str) -> str:
        """A user presses an inline button carrying `data` under `message`; returns the query id."""
        query_id = f"q{next(self._update_ids)}"
        query = {
            "id": query_id,
            "from": self.user(user_id),
            "message": message,
            "chat_instance": f"ci{chat_id}",
            "data": data,
        }
        self._push({"callback_query": query})
        return query_id

    def _push(self, update: dict[str, Any]) -> None:
        self._updates.append({"update_id": next(self._update_ids), **update})

        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def fail_next(
        self,
        method: str,
        status: int,
        *,
        retry_after: int | None = None,
        times: int = 1,
        description: str = "",
    ) -> None:
        """Answer the next `times` calls of `method` with `status` (429 carries `retry_after`; 0 drops
        the connection without an answer) instead of running them."""
        self.failures[method].extend([Failure(status, retry_after, description)] * times)

    def calls_of(self, method: str, chat_id: int | str | None = None) -> list[Call]:
        """The bot's calls of `method`, to one chat (by id, or by the @username it was addressed by)."""
        return [
            c
            for c in self.calls
            if c.method == method and (chat_id is None or str(c.params.get("chat_id", 0)) == str(chat_id))
        ]

    def posted(self, method: str, chat_id: int | str | None = None) -> list[Call]:
        """The calls of `method` that the fake carried out (answered 200)."""
        return [c for c in self.calls_of(method, chat_id) if c.status == 200]

    async def wait_for(
        self,
        method: str,
        count: int = 1,
        *,
        chat_id: int | str | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> list[Call]:
        """Wait until the bot has called `method` at least `count` times; returns those calls."""

        async def enough() -> list[Call]:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.calls_of(method, chat_id)) >= count)
            return self.calls_of(method, chat_id)

        try:
            return await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            seen = [c.method for c in self.calls]
            raise AssertionError(f"no {count}x {method} within {timeout}s; calls so far: {seen}") from None

    # Bot API methods ---------------------------------------------------------------------------

    async def _m_getMe(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return BOT_USER

    async def _m_getUpdates(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        offset = int(params.get("offset") or 0)
        self._updates = [u for u in self._updates if u["update_id"] >= offset]
        wait = min(float(params.get("timeout") or 0), MAX_POLL_WAIT_S)
        if not self._updates and wait > 0:
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: bool(self._updates)), wait)
                except TimeoutError:
                    pass
        limit = int(params.get("limit") or 100)
        return self._updates[:limit]

    async def _m_deleteWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _m_setWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return True

    async def _m_setMyCommands(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        for command in params["commands"]:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", command["command"]) or not command["description"]:
                raise ApiError("BOT_COMMAND_INVALID")
        return True

    async def _m_answerCallbackQuery(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        if len(params.get("text") or "") > 200:
            raise ApiError("MESSAGE_TOO_LONG")
        return True

    async def _m_getChatMember(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        chat_id, user_id = int(params["chat_id"]), int(params["user_id"])
        if (chat_id, user_id) in self.admins:
            return {"status": "creator", "user": self.user(user_id), "is_anonymous": False}
        return {"status": "member", "user": self.user(user_id)}

    async def _m_sendMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        text = params.get("text") or ""
        if not text.strip() or len(text.encode("utf-16-le")) // 2 > 4096:
            raise ApiError("message text is empty or too long")
        return self._bot_message(params, text=text)

    async def _m_editMessageText(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        message = self._existing(params)
        markup = params.get("reply_markup")
        if message.get("text") == params["text"] and message.get("reply_markup") == markup:
            raise ApiError("message is not modified: specified new message content is exactly the same")
        message["text"] = params["text"]
        _set_markup(message, markup)
        return message

    async def _m_editMessageReplyMarkup(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        message = self._existing(params)
        _set_markup(message, params.get("reply_markup"))
        return message

    async def _m_deleteMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        self._existing(params)
        del self.messages[(int(params["chat_id"]), int(params["message_id"]))]
        return True

    async def _m_sendPhoto(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        data = _upload(params, files, "photo")
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        if len(data) > 10 * 1024 * 1024 or width + height > 10_000:
            raise ApiError("PHOTO_INVALID_DIMENSIONS")
        file_id = self._store_file(data)
        photo = [
            {"file_id": file_id, "file_unique_id": f"u{file_id}", "width": width, "height": height},
        ]
        return self._bot_message(params, photo=photo, **_caption(params))

    async def _m_sendDocument(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        data = _upload(params, files, "document")
        file_id = self._store_file(data)
        document = {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_size": len(data)}
        return self._bot_message(params, document=document, **_caption(params))

    async def _m_sendMediaGroup(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        media = params["media"]
        if not 2 <= len(media) <= 10:
            raise ApiError("MEDIA_GROUP_INVALID")
        sent = []
        for item in media:
            file_id = self._store_file(_upload({"m": item["media"]}, files, "m"))
            photo = [{"file_id": file_id, "file_unique_id": f"u{file_id}", "width": 1, "height": 1}]
            sent.append(self._bot_message(params, photo=photo, **_caption(item)))
        return sent

    async def _m_getFile(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        file_id = params["file_id"]
        if file_id not in self.files:
            raise ApiError("wrong file_id or the file is temporarily unavailable")
        size = len(self.files[file_id])
        return {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_size": size, "file_path": file_id}

    # helpers -----------------------------------------------------------------------------------

    def _message(self, chat_id: int, sender: dict[str, Any], **content: Any) -> dict[str, Any]:
        message = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": self.chat(chat_id),
            "from": sender,
            **{k: v for k, v in content.items() if v is not None},
        }
        self.messages[(chat_id, message["message_id"])] = message
        return message

    def _bot_message(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        message = self._message(chat_id, BOT_USER, **content)
        _set_markup(message, params.get("reply_markup"))
        reply = params.get("reply_parameters")
        if reply is not None:
            target = self.messages.get((chat_id, int(reply["message_id"])))
            if target is None and not reply.get("allow_sending_without_reply"):
                raise ApiError("message to be replied not found")
            if target is not None:
                message["reply_to_message"] = {k: v for k, v in target.items() if k != "reply_to_message"}
        thread_id = params.get("message_thread_id")
        if thread_id is not None:
            if chat_id not in self.forums:
                raise ApiError("message thread not found")
            message.update(message_thread_id=int(thread_id), is_topic_message=True)
        return message

    def _existing(self, params: dict[str, Any]) -> dict[str, Any]:
        key = (int(params["chat_id"]), int(params["message_id"]))
        if key not in self.messages:
            raise ApiError("message to edit not found")
        return self.messages[key]

    def _chat_id(self, value: Any) -> int:
        """The numeric id of a send* target; @usernames of known channels resolve, others are 400."""
        text = str(value)
        if text.startswith("@"):
            if text not in self.channels:
                raise ApiError("chat not found")
            chat_id = self.channels[text]
        else:
            chat_id = int(text)
        if chat_id in self.forbidden:
            raise ForbiddenError("bot is not a member of the channel chat")
        return chat_id

    def _store_file(self, data: bytes) -> str:
        file_id = f"file{next(self._file_ids)}"
        self.files[file_id] = data
        return file_id


class ApiError(Exception):
    """Answered as HTTP 400 with Telegram's description."""


class ForbiddenError(Exception):
    """Answered as HTTP 403 with Telegram's description."""


def _error(status: int, description: str) -> web.Response:
    return web.json_response({"ok": False, "error_code": status, "description": description}, status=status)


def _failed(request: web.Request, failure: Failure) -> web.Response:
    if failure.status == 0:
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)  # never written: the client sees the connection drop
    if failure.status == 429:
        retry_after = failure.retry_after or 1
        return web.json_response(
            {
                "ok": False,
                "error_code": 429,
                "description": f"Too Many Requests: retry after {retry_after}",
                "parameters": {"retry_after": retry_after},
            },
            status=429,
        )
    default = {403: "Forbidden: bot was kicked from the group chat", 500: "Internal Server Error"}
    return _error(failure.status, failure.description or default.get(failure.status, "Bad Gateway"))


async def _read_params(
    request: web.Request,
) -> tuple[dict[str, Any], dict[str, bytes], dict[str, str]]:
    """Parameters from a JSON, urlencoded or multipart body (or the query string); files and their
    names separately."""
    params: dict[str, Any] = dict(request.query)
    files: dict[str, bytes] = {}
    filenames: dict[str, str] = {}
    if request.content_type == "application/json":
        body = await request.json()
        return {**params, **body}, files, filenames
    if request.content_type == "multipart/form-data":
        reader = await request.multipart()
        async for part in reader:
            name = part.name or ""
            if part.filename is not None:  # type: ignore[union-attr]
                filenames[name] = part.filename  # type: ignore[union-attr]
                files[name] = bytes(await part.read())  # type: ignore[union-attr]
            else:
                params[name] = await part.text()  # type: ignore[union-attr]
    elif request.can_read_body:
        params.update(await request.post())
    return {k: _decode(k, v) for k, v in params.items()}, files, filenames


def _decode(key: str, value: Any) -> Any:
    if key in STRING_PARAMS or not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _upload(params: dict[str, Any], files: dict[str, bytes], name: str) -> bytes:
    value = params.get(name)
    if isinstance(value, str) and value.startswith("attach://"):
        value = value[len("attach://") :]
        if value in files:
            return files[value]
    if name in files:
        return files[name]
    raise ApiError(f"there is no {name} in the request")


def _caption(params: dict[str, Any]) -> dict[str, Any]:
    caption = params.get("caption")
    if caption is not None and len(caption.encode("utf-16-le")) // 2 > 1024:
        raise ApiError("message caption is too long")
    return {"caption": caption}


def _set_markup(message: dict[str, Any], markup: Any) -> None:
    if markup:
        message["reply_markup"] = markup
    else:
        message.pop("reply_markup", None)


def _entities(text: str) -> list[dict[str, Any]] | None:
    """bot_command and mention entities, with offsets in UTF-16 code units as Telegram sends them."""
    found = []
    for match in re.finditer(r"(?<!\w)(/[A-Za-z0-9_]+(?:@\w+)?|@\w{5,32})", text):
        offset = len(text[: match.start()].encode("utf-16-le")) // 2
        length = len(match.group(0).encode("utf-16-le")) // 2
        kind = "bot_command" if match.group(0).startswith("/") else "mention"
        if kind == "bot_command" and offset != 0:
            continue
        found.append({"type": kind, "offset": offset, "length": length})
    return found or None
