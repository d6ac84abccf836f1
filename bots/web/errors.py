"""HTTP statuses and JSON bodies for every refusal of the web chat, and a quiet log for broken requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from core.errors import (
    BlockedPrompt,
    CheckpointError,
    EngineUnavailable,
    HuahuaError,
    InvalidOption,
    JobCancelled,
    NotAllowed,
    NotFound,
    QueueFull,
    QuotaExceeded,
    ServiceUnavailable,
    StorageError,
    TooManyJobs,
)

logger = logging.getLogger(__name__)

GENERIC_500 = "Something went wrong on the server; please try again."
PROTOCOL_LOG_INTERVAL_S = 60.0

STATUS_BY_ERROR: tuple[tuple[type[HuahuaError], int], ...] = (
    (InvalidOption, 400),
    (BlockedPrompt, 400),
    (NotAllowed, 403),
    (NotFound, 404),
    (JobCancelled, 409),
    (QuotaExceeded, 429),
    (TooManyJobs, 429),
    (QueueFull, 429),
    (EngineUnavailable, 503),
    (CheckpointError, 503),
    (ServiceUnavailable, 503),
    (StorageError, 500),
)
"""The first matching class decides; any other HuahuaError is a 400."""

_HTTP_ERRORS: dict[int, tuple[str, str]] = {
    400: ("bad_request", "That request could not be understood."),
    401: ("login_required", "Enter the chat's access token first."),
    403: ("not_allowed", "You are not allowed to do that."),
    404: ("not_found", "There is nothing at that address."),
    405: ("method_not_allowed", "That address does not take this kind of request."),
    413: ("too_large", "That request is too large."),
    415: ("unsupported_media_type", "Send the request body as JSON."),
}


class BadRequest(Exception):
    """Malformed HTTP input (not JSON, wrong types); the message is one sentence for the user."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def status_for(err: HuahuaError) -> int:
    return next((status for kind, status in STATUS_BY_ERROR if isinstance(err, kind)), 400)


def error_response(
    code: str, message: str, status: int, headers: dict[str, str] | None = None
) -> web.Response:
    """The one error body of the API: {"error": {"code": ..., "message": ...}}."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def huahua_error_response(err: HuahuaError) -> web.Response:
    return error_response(err.code, err.message, status_for(err))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Core errors and aiohttp's own (404, 405, 413...) become JSON; anything unexpected a logged 500."""
    try:
        return await handler(request)
    except BadRequest as err:
        return error_response(err.code, err.message, err.status)
    except HuahuaError as err:
        return huahua_error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = _HTTP_ERRORS.get(exc.status, ("http_error", exc.reason or "That request failed."))
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(code, message, exc.status, headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("unexpected error on %s %s", request.method, request.path)
        return error_response("internal", GENERIC_500, 500)


class ProtocolErrorSummary(logging.Filter):
    """aiohttp logs an ERROR with a traceback for every request it cannot parse (anyone can send them):
    keep one WARNING line, without the traceback, per `interval_s`, counting the ones left out."""

    def __init__(
        self, interval_s: float = PROTOCOL_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._skipped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info:
            return True
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_s:
            self._skipped += 1
            return False
        error = record.exc_info[1]
        reason = type(error).__name__ + (f": {error}" if str(error) else "")
        reason = " ".join(reason.split())[:200]
        skipped = f" ({self._skipped} more since the last such line)" if self._skipped else ""
        record.msg = "refused a malformed HTTP request: %s%s"
        record.args = (reason, skipped)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        self._last, self._skipped = now, 0
        return True


def protocol_logger() -> logging.Logger:
    """The logger handed to aiohttp's request handler (`handler_args`), with the summary filter."""
    log = logging.getLogger(f"{__name__}.protocol")
    if not any(isinstance(f, ProtocolErrorSummary) for f in log.filters):
        log.addFilter(ProtocolErrorSummary())
    return log
