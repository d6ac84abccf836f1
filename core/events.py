"""Fan-out of job events: per-job subscribers (web SSE) and per-platform listeners, in this process.

With a shared queue, an `EventRelay` carries events and cancel requests between processes: `publish`
hands each local event to `EventBus.forward`, and the relay delivers other processes' events with
`EventBus.deliver`, exactly as if they had been published here.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable

from core.types import EventType, Job, JobEvent

logger = logging.getLogger(__name__)

Listener = Callable[[Job, JobEvent], Awaitable[None]]
Forward = Callable[[Job, JobEvent], None]
ALL_EVENTS = frozenset(EventType)


class EventRelay(ABC):
    """Carries job events and cancel requests between service processes that share one queue."""

    @abstractmethod
    async def start(
        self,
        deliver: Callable[[Job, JobEvent], None],
        cancel: Callable[[str], bool],
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> Forward:
        """Connect; call `deliver` for other processes' events and `cancel` for their cancel requests.

        `cancel` returns whether the job was running here. `on_reconnect` runs after a lost
        connection is back (events sent meanwhile are lost: the service re-reads its jobs from the
        store). Returns the function the bus calls with every local event (`EventBus.forward`).
        """

    @abstractmethod
    def request_cancel(self, job_id: str) -> None:
        """Ask the process running `job_id` to cancel it."""

    @abstractmethod
    async def close(self) -> None:
        """Send what is still queued (briefly) and disconnect."""


class EventBus:
    """Delivers each event to the queues subscribed to its job and to listeners of its chat's platform."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[JobEvent]]] = defaultdict(set)
        self._listeners: list[tuple[str, frozenset[EventType], Listener]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.forward: Forward | None = None
        """Set by a relay: receives every event published here, to pass on to other processes."""

    def listen(self, chat_prefix: str, listener: Listener, types: frozenset[EventType] = ALL_EVENTS) -> None:
        """Call `listener` for the events (of `types`) of jobs whose chat id starts with `chat_prefix`."""
        self._listeners.append((chat_prefix, types, listener))

    def publish(self, job: Job, event: JobEvent) -> None:
        """Deliver an event of this process here, and hand it to the relay if there is one."""
        self.deliver(job, event)
        if self.forward is not None:
            self.forward(job, event)

    def deliver(self, job: Job, event: JobEvent) -> None:
        """Deliver to this process's subscribers and listeners only (relayed events come in here)."""
        for queue in self._subscribers.get(job.id, ()):
            queue.put_nowait(event)
        for prefix, types, listener in self._listeners:
            if event.type in types and job.chat.startswith(prefix):
                task = asyncio.create_task(self._call(listener, job, event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _call(listener: Listener, job: Job, event: JobEvent) -> None:
        try:
            await listener(job, event)
        except Exception:
            logger.exception("listener failed on %s event of job %s", event.type, job.id)

    async def subscribe(
        self, job_id: str, snapshot: Callable[[], Awaitable[JobEvent]] | None = None
    ) -> AsyncIterator[JobEvent]:
        """Yield the job's events until a final one.

        `snapshot` builds an event from the job's current state; it runs after the subscription is in
        place, so an event published meanwhile is queued rather than lost.
        """
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._subscribers[job_id].add(queue)
        try:
            if snapshot is not None:
                first = await snapshot()
                yield first
                if first.type.final:
                    return
            while True:
                event = await queue.get()
                yield event
                if event.type.final:
                    return
        finally:
            subscribers = self._subscribers.get(job_id)
            if subscribers is not None:
                subscribers.discard(queue)
                if not subscribers:
                    del self._subscribers[job_id]

    def subscribed(self) -> list[str]:
        """Ids of the jobs someone in this process is subscribed to."""
        return [job_id for job_id, queues in self._subscribers.items() if queues]

    def wants(self, job: Job, event_type: EventType) -> bool:
        """Whether anyone would receive an event of this type for this job."""
        if self._subscribers.get(job.id):
            return True
        return any(
            event_type in types and job.chat.startswith(prefix) for prefix, types, _ in self._listeners
        )

    async def drain(self) -> None:
        """Wait for listener calls in flight (used at shutdown and in tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
