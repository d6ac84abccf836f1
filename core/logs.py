"""Logging: set-up for entry points, a filter that keeps secrets out of log output, and rate limits."""

from __future__ import annotations

import logging
import re
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from core.settings import Settings

REDACTED = "***"
_TELEGRAM_TOKEN = re.compile(r"\d{5,}:[A-Za-z0-9_-]{30,}")
QUIET_LOGGERS = ("httpx", "fontTools")
"""Libraries that log a line per request (httpx: Telegram URLs carry the token) or per font subset."""


class RedactSecrets(logging.Filter):
    """Replaces secret values (and anything shaped like a bot token) in everything a record prints:
    the message with its arguments, the traceback of `logger.exception`, and `stack_info`."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = tuple(sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return _TELEGRAM_TOKEN.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: keep what the handler would print
            message = f"{record.msg!r} {record.args!r}"
        cleaned = self.redact(message)
        if cleaned != message or record.args:
            # the arguments are folded into the message, so no handler sees an unredacted one
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # formatted here, once; every formatter then prints `exc_text` instead of formatting again
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


@dataclass
class _Window:
    opened: float
    held_back: int = 0


class RateLimit(logging.Filter):
    """At most one record of each kind (logger, level, message template, exception type) per `interval_s`.

    The records held back are counted, and the next one let through says how many there were, so a
    flood of refused or malformed requests costs one line a minute instead of one line a request."""

    MAX_KINDS = 1024

    def __init__(self, interval_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._windows: OrderedDict[tuple[str, int, str, str], _Window] = OrderedDict()

    def reset(self) -> None:
        """Forget every window (and the counts held back in them)."""
        self._windows.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        error = type(record.exc_info[1]).__name__ if record.exc_info else ""
        key = (record.name, record.levelno, str(record.msg), error)
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window.opened < self.interval_s:
            window.held_back += 1
            return False
        if window is not None and window.held_back:
            seconds = now - window.opened
            record.msg = (
                f"{record.msg} [{window.held_back} more like this in the last {seconds:.0f} s not logged]"
            )
        self._windows[key] = _Window(now)
        self._windows.move_to_end(key)
        while len(self._windows) > self.MAX_KINDS:
            self._windows.popitem(last=False)
        return True


class ClientErrorsBriefly(logging.Filter):
    """A malformed request is the client's fault: one line with the reason, no server traceback."""

    def __init__(self, client_errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.client_errors = client_errors

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, self.client_errors):
            reason = " ".join(str(error).split())[:200]
            record.msg = f"{record.msg}: {type(error).__name__}: {reason.replace('%', '%%')}"
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


def rate_limited_logger(name: str, interval_s: float = 60.0) -> logging.Logger:
    """The logger `name`, letting through one record of each kind per `interval_s` (see RateLimit).

    For lines that anyone on the network can cause (refused requests, malformed HTTP)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RateLimit) for f in logger.filters):
        logger.addFilter(RateLimit(interval_s))
    return logger


def http_error_logger(name: str, interval_s: float = 60.0) -> logging.Logger:
    """A logger for aiohttp's server (`AppRunner(app, logger=...)`): malformed requests become one
    warning without a traceback, and every kind of line is rate limited."""
    from aiohttp.http_exceptions import HttpProcessingError

    logger = rate_limited_logger(name, interval_s)  # first, so it counts by the message template
    if not any(isinstance(f, ClientErrorsBriefly) for f in logger.filters):
        logger.addFilter(ClientErrorsBriefly((HttpProcessingError,)))
    return logger


def secret_values(settings: Settings) -> list[str]:
    """Every secret setting's value and, for URLs such as HUAHUA_DATABASE_URL, the password inside it."""
    values = [
        value.get_secret_value()
        for value in settings.__dict__.values()
        if isinstance(value, SecretStr) and value.get_secret_value()
    ]
    return values + [password for value in values for password in _url_passwords(value)]


def _url_passwords(value: str) -> list[str]:
    if "://" not in value:
        return []
    try:
        password = urlsplit(value).password
    except ValueError:
        return []
    return [password, unquote(password)] if password else []


def log_handler(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """The handler entry points log through (stderr by default): timestamps, and no secrets."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secret_values(settings)))
    return handler


def configure_logging(settings: Settings) -> None:
    root = logging.getLogger()
    root.handlers[:] = [log_handler(settings)]
    root.setLevel(settings.log_level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
