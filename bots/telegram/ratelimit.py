"""PTB's AIORateLimiter, with a way for a call to skip its retries after Telegram's flood control.

Handlers keep the limiter's retries: they answer a person who is waiting. The outbox's posts pass
`rate_limit_args=NO_RETRIES` instead: a `RetryAfter` then reaches the poster, which hands the wait to the
outbox (`DeliveryRetry`), so a result is never slept on while its delivery is claimed.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from telegram.error import RetryAfter
from telegram.ext import AIORateLimiter

NO_RETRIES = -1
"""`rate_limit_args` for a call whose `RetryAfter` must reach the caller at once."""

Answer = bool | dict[str, Any] | list[dict[str, Any]]


class _PassedOn(Exception):
    def __init__(self, error: RetryAfter) -> None:
        super().__init__(str(error))
        self.error = error


class RateLimiter(AIORateLimiter):
    """AIORateLimiter (Telegram's message rates, and `max_retries` after a `RetryAfter`) whose retries a
    call can turn off with `rate_limit_args=NO_RETRIES`."""

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, Answer]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> Answer:
        if rate_limit_args != NO_RETRIES:
            return await super().process_request(callback, args, kwargs, endpoint, data, rate_limit_args)

        async def once(*call_args: Any, **call_kwargs: Any) -> Answer:
            try:
                return await callback(*call_args, **call_kwargs)
            except RetryAfter as err:
                raise _PassedOn(err) from err

        try:
            return await super().process_request(once, args, kwargs, endpoint, data, None)
        except _PassedOn as passed:
            raise passed.error from None
