"""Who is asking: each browser's signed identity cookie, the optional access token, and admin rights."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from bots.web.errors import Handler, error_response
from core.settings import Settings
from core.storage.store import Store

logger = logging.getLogger(__name__)

COOKIE = "huahua_id"
COOKIE_MAX_AGE_S = 400 * 24 * 3600
"""Browsers cap cookie lifetimes at 400 days."""
SECRET_FILE = "web_secret"
SETTINGS_SCOPE = "web"
FIRST_USER_KEY = "first_user"
LOGIN_FAILURES_PER_MINUTE = 10

_USER_ID = re.compile(r"[A-Za-z0-9_-]{16}")
_OPEN_PATHS = frozenset({"/", "/healthz", "/api/login", "/favicon.ico"})
"""Served without an identity, also when the chat asks for a token (the page shows its login form)."""
_OPEN_PREFIXES = ("/static/", "/images/")
"""Pictures are named by their sha256 (unguessable) and linked from other platforms (HUAHUA_PUBLIC_URL)."""


def is_loopback(host: str) -> bool:
    """True when the web chat listens on this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(settings: Settings) -> str | None:
    """The one line logged at start when anyone on the network may use the chat without a token."""
    if is_loopback(settings.web_host) or settings.web_token is not None:
        return None
    return (
        f"the web chat listens on {settings.web_host or 'every address'} without an access token: "
        "anyone who reaches it can draw; set HUAHUA_WEB_TOKEN"
    )


def load_secret(settings: Settings) -> bytes:
    """HUAHUA_WEB_SECRET, else a random key made once and kept in the data dir (identities survive
    restarts), readable by this user only."""
    if settings.web_secret is not None and settings.web_secret.get_secret_value():
        return settings.web_secret.get_secret_value().encode()
    path = settings.data_dir / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(32))
    key = Path(path).read_text().strip()
    if len(key) < 32:
        raise RuntimeError(f"{path} holds no usable key: delete it and a new one is made")
    return key.encode()


class Identities:
    """Signs and checks identity cookies: `<user id>.<HMAC-SHA256>`.

    The signature covers a fingerprint of the access token, so changing the token signs everyone out."""

    def __init__(self, secret: bytes, token: str | None = None) -> None:
        self._secret = secret
        self.token = token or None
        self._token_tag = hashlib.sha256((token or "").encode()).hexdigest()[:16]

    @staticmethod
    def new_user() -> str:
        return secrets.token_urlsafe(12)

    def _signature(self, user: str) -> str:
        message = f"huahua-web-identity|{user}|{self._token_tag}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def cookie_value(self, user: str) -> str:
        return f"{user}.{self._signature(user)}"

    def user_of(self, value: str | None) -> str | None:
        """The user id a cookie carries, or None when it is missing, malformed or not signed by us."""
        if not value or len(value) > 128:
            return None
        user, _, signature = value.partition(".")
        if not _USER_ID.fullmatch(user) or not hmac.compare_digest(signature, self._signature(user)):
            return None
        return user

    def token_matches(self, given: str) -> bool:
        if self.token is None:
            return True
        return hmac.compare_digest(given.encode(), self.token.encode())

    def set_cookie(self, request: web.Request, response: web.StreamResponse, user: str) -> None:
        response.set_cookie(
            COOKIE,
            self.cookie_value(user),
            max_age=COOKIE_MAX_AGE_S,
            path="/",
            httponly=True,
            samesite="Lax",
            secure=request.secure,
        )


class Rights:
    """Admins: the configured web user ids, and on a loopback-only chat the first browser it saw
    (kept in the store's settings, scope "web", so it stays the admin after a restart)."""

    def __init__(self, store: Store, admins: frozenset[str], local_only: bool) -> None:
        self.store = store
        self.admins = admins
        self.local_only = local_only
        self._first: str | None = None
        self._lock = asyncio.Lock()

    async def seen(self, user: str) -> None:
        """Note a user; on a local-only chat the first one becomes its admin."""
        if not self.local_only or self._first is not None:
            return
        async with self._lock:
            if self._first is None:
                stored = (await self.store.get_settings(SETTINGS_SCOPE)).get(FIRST_USER_KEY)
                if not isinstance(stored, str):
                    await self.store.update_settings(SETTINGS_SCOPE, {FIRST_USER_KEY: user})
                    logger.info("the first web user of this local chat is its admin")
                    stored = user
                self._first = stored

    async def is_admin(self, user: str) -> bool:
        if user in self.admins:
            return True
        await self.seen(user)
        return self.local_only and user == self._first


class LoginGuard:
    """At most LOGIN_FAILURES_PER_MINUTE wrong tokens per client address per minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, list[float]] = {}

    def blocked(self, remote: str) -> bool:
        now = self._clock()
        recent = [t for t in self._failures.get(remote, []) if now - t < 60]
        if recent:
            self._failures[remote] = recent
        else:
            self._failures.pop(remote, None)
        return len(recent) >= LOGIN_FAILURES_PER_MINUTE

    def failed(self, remote: str) -> None:
        if len(self._failures) > 10_000:
            self._failures.clear()
        self._failures.setdefault(remote, []).append(self._clock())


IDENTITIES_KEY: web.AppKey[Identities] = web.AppKey("identities", Identities)
RIGHTS_KEY: web.AppKey[Rights] = web.AppKey("rights", Rights)
GUARD_KEY: web.AppKey[LoginGuard] = web.AppKey("login_guard", LoginGuard)
USER: web.RequestKey[str] = web.RequestKey("huahua_user", str)
"""The caller's web user id (without the web: prefix)."""


def current_user(request: web.Request) -> str:
    if USER not in request:
        raise web.HTTPUnauthorized()
    return request[USER]


def _open(path: str) -> bool:
    return path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES)


@web.middleware
async def identity_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take the user from the signed cookie. Without one: 401 when a token is asked for, else a new
    identity (set as a cookie on the answer)."""
    identities = request.app[IDENTITIES_KEY]
    user = identities.user_of(request.cookies.get(COOKIE))
    fresh = False
    if user is None:
        if identities.token is not None:
            if not _open(request.path):
                return error_response("login_required", "Enter the chat's access token first.", 401)
        elif request.path == "/" or not _open(request.path):
            user, fresh = identities.new_user(), True
    if user is not None:
        request[USER] = user
        await request.app[RIGHTS_KEY].seen(user)
    response = await handler(request)
    if fresh and user is not None and not response.prepared:
        identities.set_cookie(request, response, user)
    return response


async def login(request: web.Request) -> web.Response:
    """POST {"token": ...}: the access token once; the answer sets the identity cookie."""
    from bots.web.payload import read_object, text_field

    identities, guard = request.app[IDENTITIES_KEY], request.app[GUARD_KEY]
    remote = request.remote or "?"
    if guard.blocked(remote):
        return error_response("too_many_attempts", "Too many wrong tokens; wait a minute and try again.", 429)
    token = text_field(await read_object(request), "token", max_length=256)
    if not identities.token_matches(token):
        guard.failed(remote)
        return error_response("wrong_token", "That access token is not right.", 403)
    user = identities.user_of(request.cookies.get(COOKIE)) or identities.new_user()
    await request.app[RIGHTS_KEY].seen(user)
    response = web.json_response({"user": user, "admin": await request.app[RIGHTS_KEY].is_admin(user)})
    identities.set_cookie(request, response, user)
    return response
