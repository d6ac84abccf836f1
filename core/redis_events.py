"""Job events and cancel requests between service processes, over Redis pub/sub.

Two channels per queue, `<name>:<db>:events` and `<name>:<db>:cancel` (pub/sub ignores the database
number, so it is part of the name). Every message is JSON with the sender's `origin` id; a relay skips
its own messages, so a process never gets its own events twice. Pub/sub delivers at most once: events
published while a relay is disconnected are lost, but the job's state in the store stays right, and
the `on_reconnect` callback lets the service catch its subscribers up. Payloads hold the job record
(image hashes, never image bytes) and the event's fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from core.codec import job_from_dict, job_to_dict
from core.errors import ServiceUnavailable, StorageError
from core.events import EventRelay, Forward
from core.types import EventType, Job, JobEvent

logger = logging.getLogger(__name__)

MAX_BACKLOG = 1000
"""Messages waiting to be sent; beyond this, new ones are dropped (and that is logged once)."""
CLOSE_FLUSH_S = 2.0


class RedisEventRelay(EventRelay):
    """Publishes this process's job events to Redis and delivers other processes' events here."""

    def __init__(
        self,
        url: str,
        *,
        name: str = "huahua",
        origin: str | None = None,
        retry_max_s: float = 5.0,
    ) -> None:
        self.origin = origin or uuid.uuid4().hex
        self.retry_max_s = retry_max_s
        self._on_reconnect: Callable[[], Awaitable[None]] | None = None
        self._url = url
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        db = aioredis.ConnectionPool.from_url(url).connection_kwargs.get("db", 0)
        self.events_channel = f"{name}:{db}:events"
        self.cancel_channel = f"{name}:{db}:cancel"
        self._outbox: asyncio.Queue[tuple[str, Job | str, JobEvent | None]] = asyncio.Queue(MAX_BACKLOG)
        self._tasks: list[asyncio.Task[None]] = []
        self._deliver: Callable[[Job, JobEvent], None] = lambda job, event: None
        self._cancel: Callable[[str], bool] = lambda job_id: False
        self._down = False
        self._dropping = False
        self._closed = False

    async def start(
        self,
        deliver: Callable[[Job, JobEvent], None],
        cancel: Callable[[str], bool],
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> Forward:
        self._deliver, self._cancel, self._on_reconnect = deliver, cancel, on_reconnect
        self._client = aioredis.Redis.from_url(self._url, decode_responses=True, socket_connect_timeout=5)
        try:
            await self._client.ping()
            await self._subscribe()
        except (RedisError, OSError) as err:
            logger.warning("event relay cannot reach Redis: %s", type(err).__name__)
            await self._client.aclose()
            raise ServiceUnavailable(
                "The event relay (Redis) cannot be reached right now; please try again later."
            ) from err
        self._tasks = [
            asyncio.create_task(self._receive(), name="huahua-relay-receive"),
            asyncio.create_task(self._send_all(), name="huahua-relay-send"),
        ]
        logger.info("event relay on %s started (origin %s)", self.events_channel, self.origin[:8])
        return self.forward

    def forward(self, job: Job, event: JobEvent) -> None:
        """Queue a local event for the other processes; cheap, never blocks."""
        self._enqueue((self.events_channel, job, event))

    def request_cancel(self, job_id: str) -> None:
        self._enqueue((self.cancel_channel, job_id, None))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._outbox.join(), CLOSE_FLUSH_S)
        except TimeoutError:
            logger.warning("event relay closed with %d event(s) unsent", self._outbox.qsize())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._drop_pubsub()
        if self._client is not None:
            await self._client.aclose()

    # sending -----------------------------------------------------------------------------------

    def _enqueue(self, item: tuple[str, Job | str, JobEvent | None]) -> None:
        if self._closed:
            return
        try:
            self._outbox.put_nowait(item)
            self._dropping = False
        except asyncio.QueueFull:
            if not self._dropping:
                logger.warning("event relay backlog is full; dropping events until Redis catches up")
            self._dropping = True

    async def _send_all(self) -> None:
        while True:
            channel, subject, event = await self._outbox.get()
            try:
                await self._send(channel, _encode(self.origin, subject, event))
            finally:
                self._outbox.task_done()

    async def _send(self, channel: str, message: str) -> None:
        """Publish, retrying with backoff while Redis is away (the message waits, in order)."""
        assert self._client is not None
        delay = 0.05
        while True:
            try:
                await self._client.publish(channel, message)
                return
            except (RedisError, OSError) as err:
                self._lost(err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)

    # receiving ---------------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        assert self._client is not None
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.events_channel, self.cancel_channel)
        except BaseException:
            await pubsub.aclose()
            raise
        self._pubsub = pubsub

    async def _drop_pubsub(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            try:
                await pubsub.aclose()
            except (RedisError, OSError):
                pass

    async def _receive(self) -> None:
        delay = 0.05
        while True:
            try:
                if self._pubsub is None:
                    await self._subscribe()
                    await self._restored()
                    delay = 0.05
                assert self._pubsub is not None
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (RedisError, OSError) as err:
                self._lost(err)
                await self._drop_pubsub()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            if message is not None and message.get("type") == "message":
                self._handle(str(message.get("channel")), message.get("data"))

    def _handle(self, channel: str, data: Any) -> None:
        try:
            payload = json.loads(data)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
            if payload.get("origin") == self.origin:
                return
            if channel == self.cancel_channel:
                job_id = payload.get("job_id")
                if not isinstance(job_id, str):
                    raise ValueError("job_id must be text")
                if self._cancel(job_id):
                    logger.info("cancelled job %s at another process's request", job_id)
                return
            job = job_from_dict(payload.get("job"))
            self._deliver(job, _event_from_dict(job.id, payload.get("event")))
        except (ValueError, TypeError, StorageError) as err:
            logger.warning("event relay ignored a malformed message on %s: %s", channel, err)

    # connection state --------------------------------------------------------------------------

    def _lost(self, err: BaseException) -> None:
        if not self._down:
            logger.warning("event relay lost Redis (%s); reconnecting with backoff", type(err).__name__)
        self._down = True

    async def _restored(self) -> None:
        if not self._down:
            return
        self._down = False
        logger.info("event relay reconnected to Redis")
        if self._on_reconnect is not None:
            try:
                await self._on_reconnect()
            except Exception:
                logger.exception("catching up after a reconnect failed")


def _encode(origin: str, subject: Job | str, event: JobEvent | None) -> str:
    if event is None:
        return json.dumps({"origin": origin, "job_id": subject})
    assert isinstance(subject, Job)
    return json.dumps(
        {
            "origin": origin,
            "job": job_to_dict(subject),
            "event": {
                "type": event.type.value,
                "progress": event.progress,
                "position": event.position,
                "step": event.step,
                "total_steps": event.total_steps,
                "error": event.error,
            },
        },
        ensure_ascii=False,
    )


def _event_from_dict(job_id: str, data: Any) -> JobEvent:
    if not isinstance(data, dict):
        raise ValueError("event must be an object")
    progress, position, error = data.get("progress"), data.get("position"), data.get("error")
    step, total = data.get("step"), data.get("total_steps")
    if not isinstance(progress, int | float) or isinstance(progress, bool):
        raise ValueError("progress must be a number")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (step, total)):
        raise ValueError("step and total_steps must be whole numbers")
    if position is not None and (not isinstance(position, int) or isinstance(position, bool)):
        raise ValueError("position must be a whole number")
    if error is not None and not isinstance(error, str):
        raise ValueError("error must be text")
    return JobEvent(
        job_id,
        EventType(str(data.get("type"))),
        progress=float(progress),
        position=position,
        step=int(step),  # type: ignore[arg-type]
        total_steps=int(total),  # type: ignore[arg-type]
        error=error,
    )
