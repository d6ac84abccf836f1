"""The delivery outbox: results and failures owed to platform chats, posted at least once and marked once.

`JobRunner.finish` stores a pending delivery for a Telegram or Discord job in the same transaction as
the job's final state. In each process that runs a platform's adapter, `Outbox.serve(platform, post)`
claims that platform's due deliveries (a claim lasts `claim_s`, so two processes never post one at the
same time), calls the adapter's `post(job)`, and marks the delivery sent with the platform's message id.
A delivery marked sent is never posted again; one whose post failed is retried with backoff (the
platform's own wait when it names one: Telegram's `retry_after`, Discord's rate limits) and, after a
restart, by whichever process serves the platform next.

The one window left: a crash after the platform accepted a post and before the mark is stored posts
that result again on the next attempt. It spans one store write after the platform's answer (a poster
awaits nothing after it); the Bot API and Discord's interaction follow-ups offer no idempotency key for
sending messages that would close it (Discord's channel posts take a nonce, honoured for minutes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from core.errors import HuahuaError
from core.events import EventBus
from core.types import Delivery, DeliveryState, EventType, Job, JobEvent

if TYPE_CHECKING:
    from core.storage.store import Store

logger = logging.getLogger(__name__)

Post = Callable[[Job], Awaitable[str | None]]
"""An adapter's poster: shows a finished job in its chat; returns the platform's message id."""

CLAIM_S = 60.0
"""How long a process holds a claimed delivery before another may take it (a post takes seconds)."""
POLL_S = 2.0
"""How often a served platform looks for due deliveries when no local event woke it."""
MAX_ATTEMPTS = 8
BACKOFF_S, MAX_BACKOFF_S = 2.0, 300.0
FINAL_EVENTS = frozenset({EventType.DONE, EventType.FAILED, EventType.CANCELLED})
STOP_GRACE_S = 10.0
"""How long `stop` lets a batch being posted finish before cancelling it (a cancelled post keeps its
claim until `claim_s` runs out)."""


class DeliveryRetry(Exception):
    """Raised by a poster: the platform asked to wait `after_s` seconds before trying again."""

    def __init__(self, after_s: float, reason: str = "rate limited") -> None:
        super().__init__(reason)
        self.after_s = after_s
        self.reason = reason


class DeliveryRefused(Exception):
    """Raised by a poster: the platform will never accept this post (chat gone, bot removed)."""


class Outbox:
    """Serves deliveries of one or more platforms from this process."""

    def __init__(
        self,
        store: Store,
        events: EventBus,
        *,
        owner: str,
        claim_s: float = CLAIM_S,
        poll_s: float = POLL_S,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.store = store
        self.events = events
        self.owner = owner
        self.claim_s = claim_s
        self.poll_s = poll_s
        self.max_attempts = max_attempts
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._stopping: set[str] = set()

    def serve(self, platform: str, post: Post) -> None:
        """Post `platform`'s deliveries with `post` from now on (a platform is served once per process)."""
        if platform in self._tasks:
            raise ValueError(f"the {platform} outbox is already served by this process")
        self._stopping.discard(platform)
        wake = self._wake[platform] = asyncio.Event()

        async def on_final(job: Job, event: JobEvent) -> None:
            wake.set()

        self.events.listen(f"{platform}:", on_final, FINAL_EVENTS)
        self._tasks[platform] = asyncio.create_task(self._loop(platform, post), name=f"outbox-{platform}")

    async def stop(self, platform: str, grace_s: float = STOP_GRACE_S) -> None:
        """Stop serving `platform` here (its adapter is stopping): the batch being posted may finish
        within `grace_s`; the platform's other deliveries wait for the next process that serves it."""
        task = self._tasks.pop(platform, None)
        if task is None:
            return
        self._stopping.add(platform)
        self._wake[platform].set()
        try:
            await asyncio.wait_for(asyncio.shield(task), grace_s)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        except Exception:
            logger.exception("the %s outbox failed", platform)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    async def _loop(self, platform: str, post: Post) -> None:
        wake = self._wake[platform]
        while platform not in self._stopping:
            wake.clear()
            try:
                deliveries = await self._claim(platform)
            except HuahuaError as err:
                logger.warning("the %s outbox cannot read the store: %s", platform, err.message)
                deliveries = []
            for delivery in deliveries:
                try:
                    await self._deliver(delivery, post)
                except HuahuaError as err:  # the store failed: the claim runs out and it is tried again
                    logger.warning("delivery %d of job %s: %s", delivery.id, delivery.job_id, err.message)
                except Exception:
                    logger.exception("delivery %d of job %s failed", delivery.id, delivery.job_id)
            if deliveries:
                continue
            try:
                await asyncio.wait_for(wake.wait(), self.poll_s)
            except TimeoutError:
                pass

    async def _claim(self, platform: str) -> list[Delivery]:
        return await self.store.claim_deliveries(platform, self.owner, self.claim_s, time.time())

    async def _deliver(self, delivery: Delivery, post: Post) -> None:
        try:
            job = await self.store.get_job(delivery.job_id)
            if job is None:
                raise DeliveryRefused("the job is gone")
            message_id = await post(job)
        except asyncio.CancelledError:
            raise
        except DeliveryRetry as retry:
            await self._retry(delivery, retry.reason, retry.after_s)
        except DeliveryRefused as refused:
            await self._retry(delivery, str(refused), 0.0, give_up=True)
        except Exception as err:
            reason = err.message if isinstance(err, HuahuaError) else type(err).__name__
            await self._retry(delivery, reason, min(BACKOFF_S * 2**delivery.attempts, MAX_BACKOFF_S))
        else:
            if not await self.store.mark_delivered(delivery.id, self.owner, message_id, time.time()):
                logger.warning("delivery %d of job %s: the claim expired while posting", delivery.id, job.id)

    async def _retry(self, delivery: Delivery, reason: str, after_s: float, *, give_up: bool = False) -> None:
        attempts = 0 if give_up else self.max_attempts
        state = await self.store.retry_delivery(
            delivery.id, self.owner, reason, time.time() + after_s, attempts
        )
        if state == DeliveryState.DEAD:
            logger.error("gave up delivering job %s to %s: %s", delivery.job_id, delivery.platform, reason)
        else:
            logger.warning(
                "delivery of job %s to %s failed (%s); trying again in %.0f s",
                delivery.job_id,
                delivery.platform,
                reason,
                after_s,
            )
