"""A fake Discord REST API on loopback: records every call and answers with plausible payloads.

discord.py is pointed at it by setting `discord.http.Route.BASE` to `FakeDiscord.base`. It understands
the routes the Huahua adapter uses: login, application info, command sync, interaction callbacks,
webhook (interaction) messages and channel messages. Tokens in `expired_tokens` get the 401 Discord
sends for a dead interaction token. A channel message with `enforce_nonce` whose nonce the channel saw
before is answered with the first message, as Discord does. `fail_next` scripts the failures of a busy or
unreachable API: 429 (with or without the `Via` header that discord.py takes as a real rate limit), 5xx,
403, a dropped connection, or an answer lost after the call was carried out (`LOST_ANSWER`).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import discord
import pytest
from aiohttp import web

APP_ID = 1100000000000000001
BOT_ID = 1100000000000000002
OWNER_ID = 1100000000000000003
VALID_TOKEN = "fake-bot-token"
LOST_ANSWER = -1
"""A scripted failure: the call is carried out, then the connection drops before the answer."""

_ids = itertools.count(1300000000000000000)


def snowflake() -> int:
    return next(_ids)


@dataclass(frozen=True)
class Part:
    """One part of a multipart request: `payload_json` or a file."""

    name: str
    filename: str | None
    content_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    """The path after /api/v10, e.g. /channels/5/messages."""
    query: dict[str, str]
    json: Any
    parts: tuple[Part, ...] = ()
    at: float = 0.0
    """time.monotonic() when the call arrived."""
    status: int = 200
    """The HTTP status answered (0: the connection was dropped)."""
    made: dict[str, Any] | None = None
    """The message this call created, if it created one (not a failure, nor a repeated nonce)."""

    @property
    def files(self) -> tuple[Part, ...]:
        return tuple(part for part in self.parts if part.filename is not None)

    def custom_ids(self) -> list[str]:
        """Every component custom id in the message body."""
        found: list[str] = []
        for row in (self.json or {}).get("components") or []:
            for component in row.get("components", []):
                if "custom_id" in component:
                    found.append(component["custom_id"])
        return found


def user_payload(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "global_name": name,
        "discriminator": "0",
        "avatar": None,
        "bot": bot,
        "flags": 0,
    }


@dataclass(frozen=True)
class Failure:
    """A scripted answer: an HTTP error status, 0 to drop the connection unanswered, or `LOST_ANSWER`."""

    method: str
    pattern: str
    status: int
    retry_after: float = 1.0
    via: bool = True
    """429 only: Discord's proxy header; without it discord.py takes the 429 for a Cloudflare ban."""


class FakeDiscord:
    """The fake API server; `async with FakeDiscord() as api:` then point discord.py at `api.base`."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.expired_tokens: set[str] = set()
        self.forbidden_channels: set[int] = set()
        self.failures: list[Failure] = []
        self._nonces: dict[tuple[int, str], dict[str, Any]] = {}
        self._made: dict[str, Any] | None = None
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.cdn: dict[str, bytes] = {}
        """Users' uploads served on the fake CDN, by path; `attachment()` adds one."""
        self.cdn_reads: list[str] = []
        """The CDN paths the bot downloaded, in order."""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._handle)
        app.router.add_get("/cdn/{tail:.*}", self._cdn)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # users' uploads --------------------------------------------------------------------------

    def attachment(
        self, filename: str, data: bytes, content_type: str | None, *, size: int | None = None
    ) -> dict[str, Any]:
        """A user's upload, as an interaction's `data.resolved.attachments` entry; its URL is on this
        server's CDN. `size` overrides the byte count the payload claims."""
        attachment_id = str(snowflake())
        path = f"attachments/{attachment_id}/{filename}"
        self.cdn[path] = data
        payload: dict[str, Any] = {
            "id": attachment_id,
            "filename": filename,
            "size": len(data) if size is None else size,
            "url": f"http://127.0.0.1:{self.port}/cdn/{path}",
            "proxy_url": f"http://127.0.0.1:{self.port}/cdn/{path}",
        }
        if content_type is not None:
            payload["content_type"] = content_type
        return payload

    async def _cdn(self, request: web.Request) -> web.Response:
        path = request.match_info["tail"]
        self.cdn_reads.append(path)
        data = self.cdn.get(path)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    # queries -----------------------------------------------------------------------------------

    def find(self, method: str, pattern: str) -> list[Call]:
        """Calls with this method whose path fully matches the regex `pattern`."""
        regex = re.compile(pattern)
        return [c for c in self.calls if c.method == method and regex.fullmatch(c.path)]

    def messages_made(self) -> list[Call]:
        """The calls that created a message (follow-ups and channel messages that Discord kept)."""
        return [c for c in self.calls if c.made is not None]

    def fail_next(
        self,
        method: str,
        pattern: str,
        status: int,
        *,
        retry_after: float = 1.0,
        via: bool = True,
        times: int = 1,
    ) -> None:
        """Answer the next `times` calls of `method` to a path matching `pattern` with `status`
        (429 with `retry_after`; 0 drops the connection) instead of carrying them out."""
        self.failures.extend([Failure(method, pattern, status, retry_after, via)] * times)

    async def wait_for(self, predicate: Callable[[], Any], limit_s: float = 20.0) -> Any:
        """Wait until `predicate()` is truthy (re-checked after every call) and return its value."""

        async def check() -> Any:
            async with self._changed:
                while not (value := predicate()):
                    await self._changed.wait()
                return value

        return await asyncio.wait_for(check(), limit_s)

    # the API -----------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body, parts = await self._read_body(request)
        call = Call(request.method, path, dict(request.query), body, parts, time.monotonic())
        failure = self._failure_for(call)
        if failure is not None and failure.status != LOST_ANSWER:
            call = replace(call, status=failure.status)
            response = _failed(request, failure)
        else:
            self._made = None
            response = self._answer(call, request.headers.get("Authorization", ""))
            call = replace(call, status=response.status, made=self._made)
            if failure is not None:
                call = replace(call, status=LOST_ANSWER)
                response = _failed(request, replace(failure, status=0))
        self.calls.append(call)
        async with self._changed:
            self._changed.notify_all()
        return response

    def _failure_for(self, call: Call) -> Failure | None:
        for failure in self.failures:
            if failure.method == call.method and re.fullmatch(failure.pattern, call.path):
                self.failures.remove(failure)
                return failure
        return None

    @staticmethod
    async def _read_body(request: web.Request) -> tuple[Any, tuple[Part, ...]]:
        if request.content_type.startswith("multipart/"):
            parts: list[Part] = []
            body: Any = None
            reader = await request.multipart()
            async for part in reader:
                data = await part.read()  # type: ignore[union-attr]
                parts.append(
                    Part(part.name or "", part.filename, part.headers.get("Content-Type", ""), bytes(data))
                )
                if part.name == "payload_json":
                    body = json.loads(data)
            return body, tuple(parts)
        if request.can_read_body:
            raw = await request.read()
            return (json.loads(raw) if raw else None), ()
        return None, ()

    def _answer(self, call: Call, authorization: str) -> web.Response:
        method, path = call.method, call.path
        if path == "/users/@me":
            if authorization != f"Bot {VALID_TOKEN}":
                return _json({"message": "401: Unauthorized", "code": 0}, status=401)
            return _json(user_payload(BOT_ID, "huahua", bot=True))
        if path == "/oauth2/applications/@me":
            return _json(_application())
        if re.fullmatch(r"/applications/\d+(/guilds/\d+)?/commands", path) and method == "PUT":
            return _json(
                [
                    {
                        "description": "",  # context menus are sent without one; Discord answers ""
                        **cmd,
                        "id": str(snowflake()),
                        "application_id": str(APP_ID),
                        "version": "1",
                    }
                    for cmd in call.json
                ]
            )
        if match := re.fullmatch(r"/interactions/(\d+)/([^/]+)/callback", path):
            return self._callback(int(match[1]), match[2], call)
        if match := re.fullmatch(r"/webhooks/(\d+)/([^/]+)(/messages/(@original|\d+))?", path):
            token = match[2]
            if token in self.expired_tokens:
                return _json({"message": "Invalid Webhook Token", "code": 50027}, status=401)
            if method == "DELETE":
                return web.Response(status=204)
            message = message_payload(call.json, channel_id=0, parts=call.files, webhook=True)
            if method == "POST":
                self._made = message
            return _json(message)
        if match := re.fullmatch(r"/channels/(\d+)/messages", path):
            channel_id = int(match[1])
            if channel_id in self.forbidden_channels:
                return _json({"message": "Missing Access", "code": 50001}, status=403)
            body = call.json or {}
            key = (channel_id, str(body.get("nonce")))
            if body.get("enforce_nonce") and key in self._nonces:
                return _json(self._nonces[key])
            message = message_payload(call.json, channel_id=channel_id, parts=call.files)
            if body.get("nonce") is not None:
                message["nonce"] = str(body["nonce"])
                if body.get("enforce_nonce"):
                    self._nonces[key] = message
            self._made = message
            return _json(message)
        return _json({"message": f"404: Not Found ({method} {path})", "code": 0}, status=404)

    def _callback(self, interaction_id: int, token: str, call: Call) -> web.Response:
        if token in self.expired_tokens:
            return _json({"message": "Unknown interaction", "code": 10062}, status=404)
        kind = int((call.json or {}).get("type", 0))
        data = (call.json or {}).get("data") or {}
        answer: dict[str, Any] = {
            "interaction": {
                "id": str(interaction_id),
                "type": 2,
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(int(data.get("flags", 0)) & 64),
            },
            "resource": {"type": kind},
        }
        if kind == 4:
            message = message_payload(data, channel_id=0, parts=call.files, webhook=True)
            answer["interaction"]["response_message_id"] = message["id"]
            answer["resource"]["message"] = message
        return _json(answer)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON the way Discord sends it: discord.py wants exactly `application/json`, without a charset."""
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _failed(request: web.Request, failure: Failure) -> web.Response:
    if failure.status == 0:
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=500)  # never written: the client sees the connection drop
    if failure.status == 429:
        headers = {"Retry-After": f"{failure.retry_after:g}"}
        if failure.via:
            headers["Via"] = "1.1 google"
        body = {"message": "You are being rate limited.", "retry_after": failure.retry_after, "global": False}
        return _json(body, status=429, headers=headers)
    if failure.status == 403:
        return _json({"message": "Missing Access", "code": 50001}, status=403)
    return _json({"message": f"{failure.status}: Server Error", "code": 0}, status=failure.status)


def _application() -> dict[str, Any]:
    return {
        "id": str(APP_ID),
        "name": "Huahua",
        "description": "",
        "icon": None,
        "bot_public": True,
        "bot_require_code_grant": False,
        "owner": user_payload(OWNER_ID, "owner"),
        "verify_key": "0" * 64,
        "flags": 0,
        "summary": "",
    }


def message_payload(
    body: Any, *, channel_id: int, parts: tuple[Part, ...], webhook: bool = False
) -> dict[str, Any]:
    body = body or {}
    now = datetime.datetime.now(datetime.UTC).isoformat()
    attachments = [
        {
            "id": str(snowflake()),
            "filename": part.filename,
            "size": len(part.data),
            "url": f"https://cdn.example/{part.filename}",
            "proxy_url": f"https://cdn.example/{part.filename}",
        }
        for part in parts
    ]
    message: dict[str, Any] = {
        "id": str(snowflake()),
        "channel_id": str(channel_id),
        "type": 0,
        "content": body.get("content") or "",
        "author": user_payload(BOT_ID, "huahua", bot=True),
        "attachments": attachments,
        "embeds": body.get("embeds") or [],
        "mentions": [],
        "mention_roles": [],
        "mention_everyone": False,
        "pinned": False,
        "tts": False,
        "timestamp": now,
        "edited_timestamp": None,
        "flags": int(body.get("flags") or 0),
        "components": body.get("components") or [],
    }
    if webhook:
        message["webhook_id"] = str(APP_ID)
        message["application_id"] = str(APP_ID)
    return message


@pytest.fixture
async def api() -> AsyncIterator[FakeDiscord]:
    """A fake Discord REST API on loopback, with discord.py's routes pointed at it."""
    async with FakeDiscord() as fake:
        saved = discord.http.Route.BASE
        discord.http.Route.BASE = fake.base
        try:
            yield fake
        finally:
            discord.http.Route.BASE = saved
