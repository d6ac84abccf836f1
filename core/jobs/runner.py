"""The job runner: takes jobs from the queue and runs each attempt on the engine under a store lease.

The walk of one attempt:
1. `queue.get()` hands out a job id; `store.claim_job` starts attempt k+1 under a lease held by this
   process (`owner`). No claim (the job ended, or a live process holds it) means nothing to do.
2. While the engine draws, a heartbeat renews the lease every third of `job_lease_s`. A renewal that
   finds the attempt no longer current (another process took the job over after this one stalled)
   cancels the drawing: this attempt is fenced.
3. The result is stored only while the attempt is current (`store.finish_attempt`), in the same
   transaction as the job's deliveries (the outbox), so a fenced attempt can neither overwrite nor post.
4. A passing engine outage (`EngineUnreachable`) gives the job back (`release_attempt`) and queues it
   again after a backoff, up to `job_max_attempts` attempts; on shutdown a running job goes back to the
   queue (`queue.release`) instead of being acknowledged.

Recovery: `recover()` queues every job the store holds as queued, or as running under an expired lease;
a sweeper repeats it every few seconds, so jobs come back after a Redis that lost its data or a process
that died, without a restart. Putting a job that is already in the queue is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from core.engine import CancelToken, Engine
from core.errors import EngineUnreachable, HuahuaError, JobCancelled
from core.events import EventBus
from core.jobs.queue import JobQueue, QueueClosed
from core.settings import Settings
from core.types import EventType, GenerationRequest, Job, JobEvent, JobStatus

if TYPE_CHECKING:
    from core.storage.images import ImageStore
    from core.storage.store import Store

logger = logging.getLogger(__name__)

QUEUE_RETRY_MIN_S, QUEUE_RETRY_MAX_S = 0.5, 10.0
RETRY_BACKOFF_S = 2.0
"""The first retry after an engine outage waits this long, each later one twice as long."""
SWEEP_INTERVAL_S = 5.0
_RECOVERABLE = (JobStatus.QUEUED, JobStatus.RUNNING)
"""States a job the recovery sweep found may still be in when it is put back."""
OUTBOX_PLATFORMS = frozenset({"tg", "dc"})
"""Chat platforms whose results reach them through the outbox (the web chat streams them instead)."""
REMEMBERED_IDS = 256
WAITING_FOR_WORKER = "Waiting for the image worker to come back (attempt {attempt} of {attempts})."
DRAWING_FAILED = "Something went wrong while drawing; please try again."
FINAL_EVENTS = {
    JobStatus.DONE: EventType.DONE,
    JobStatus.FAILED: EventType.FAILED,
    JobStatus.CANCELLED: EventType.CANCELLED,
}


def process_owner() -> str:
    """A name for this process's leases and claims: host, pid and a random tail (pids are reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class JobRunner:
    """Runs jobs: `settings.workers` worker tasks, the lease heartbeats and the recovery sweeper."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        images: ImageStore,
        queue: JobQueue,
        engine: Engine,
        events: EventBus,
        owner: str,
        on_started: Callable[[str], None] = lambda job_id: None,
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.images = images
        self.queue = queue
        self.engine = engine
        self.events = events
        self.owner = owner
        self._on_started = on_started
        self._on_idle = on_idle
        """Called after each job leaves a worker (the service then announces new positions)."""
        self.running: dict[str, CancelToken] = {}
        self.progress: dict[str, float] = {}
        self.early_cancels: OrderedDict[str, None] = OrderedDict()
        """Cancel requests for jobs about to start here (between `get()` and the claim)."""
        self._fenced: set[str] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        """Worker tasks running a job now."""
        self._sweeper: asyncio.Task[None] | None = None
        self._later: set[asyncio.Task[None]] = set()
        self._stopping = False

    # lifecycle -------------------------------------------------------------------------------

    async def start(self, *, recover: bool = True) -> None:
        """Recover unfinished jobs (unless `recover` is False), then start the workers and the sweeper.

        A recovery that fails here (Redis or the database away for a moment) does not stop the start:
        the sweeper tries again within seconds, as it does for every later failure."""
        if recover and self.settings.workers > 0:
            try:
                await self.recover()
            except HuahuaError as err:
                logger.warning("recovery at start skipped, the sweeper will try again: %s", err.message)
        for index in range(self.settings.workers):
            self._workers.append(asyncio.create_task(self._work(), name=f"huahua-worker-{index}"))
        if recover and self.settings.workers > 0:
            self._sweeper = asyncio.create_task(self._sweep(), name="huahua-sweeper")

    async def stop(self) -> None:
        """Stop drawing: running jobs go back to the queue within `shutdown_grace_s`, then workers end."""
        self._stopping = True
        for task in (self._sweeper, *self._later):
            if task is not None:
                task.cancel()
        for token in self.running.values():
            token.cancel()
        if self._busy:  # they give their jobs back and leave the loop
            await asyncio.wait(set(self._busy), timeout=self.settings.shutdown_grace_s)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, *self._later, return_exceptions=True)
        if self._sweeper is not None:
            await asyncio.gather(self._sweeper, return_exceptions=True)
        self._workers.clear()

    async def recover(self) -> int:
        """Queue every job that is queued, or running under an expired lease; returns how many were put.

        Runs every few seconds in every process, so the usual sweep, where the queue already holds every
        such job, reads only ids: the store's, then one question to the queue about them all. Only the
        jobs the queue lacks (a Redis that lost its data, a process that died between store and queue)
        are read and put, each only if it is still queued or running (it may have moved on meanwhile)."""
        now = time.time()
        ids = [job_id for job_id in await self.store.recoverable_ids(now) if job_id not in self.running]
        held = await self.queue.holding(ids) if ids else set()
        put = 0
        for job_id in ids:
            if job_id in held:
                continue
            job = await self.store.get_job(job_id)
            if job is None or job.status not in _RECOVERABLE or job.id in self.running:
                continue
            try:
                await self.queue.put(job)
                put += 1
            except HuahuaError as err:
                logger.debug("job %s stays in the store for the next sweep: %s", job.id, err.message)
        return put

    async def _sweep(self) -> None:
        # Ends on `_stopping` too: a library may turn the stop's cancel into its own error (asyncpg's
        # timeouts can), and a sweeper that only left on cancellation then kept the process alive.
        while not self._stopping:
            await asyncio.sleep(min(SWEEP_INTERVAL_S, self.settings.job_lease_s / 3))
            try:
                await self.recover()
            except HuahuaError as err:
                logger.debug("recovery sweep skipped: %s", err.message)
            except Exception:
                logger.exception("recovery sweep failed")

    # cancelling --------------------------------------------------------------------------------

    def cancel_running(self, job_id: str, *, remember: bool) -> bool:
        """Cancel a job running here; else (with `remember`) keep the request in case it starts soon."""
        token = self.running.get(job_id)
        if token is not None:
            token.cancel()
            return True
        if remember:
            self.early_cancels[job_id] = None
            while len(self.early_cancels) > REMEMBERED_IDS:
                self.early_cancels.popitem(last=False)
        return False

    # finishing ---------------------------------------------------------------------------------

    async def finish(
        self, job: Job, status: JobStatus, *, error: str | None = None, images: tuple[str, ...] = ()
    ) -> Job | None:
        """Store the final state of the job's current attempt with its deliveries and publish it; None
        (nothing stored or published) when the attempt was superseded."""
        done = replace(
            job,
            status=status,
            error=error,
            images=images,
            progress=1.0 if status == JobStatus.DONE else job.progress,
            finished_at=time.time(),
        )
        platform = job.chat.partition(":")[0]
        if not await self.store.finish_attempt(done, [platform] if platform in OUTBOX_PLATFORMS else []):
            logger.warning(
                "job %s attempt %d was taken over elsewhere; its result is dropped", job.id, job.attempt
            )
            return None
        event = JobEvent(job.id, FINAL_EVENTS[status], progress=done.progress, error=error)
        self.events.publish(done, event)
        if status == JobStatus.DONE:
            try:
                await self.store.incr_counter("jobs_done")
            except HuahuaError as err:
                logger.warning("could not count job %s: %s", job.id, err.message)
        return done

    # the worker loop ---------------------------------------------------------------------------

    async def _work(self) -> None:
        """Take jobs until stopped; an unreachable queue (Redis down) is retried with backoff."""
        delay = QUEUE_RETRY_MIN_S
        while not self._stopping:
            try:
                job = await self.queue.get()
            except QueueClosed:
                return
            except HuahuaError as err:
                logger.warning("the job queue is unavailable (%s); retrying in %.1f s", err.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, QUEUE_RETRY_MAX_S)
                continue
            delay = QUEUE_RETRY_MIN_S
            released = False
            task = asyncio.current_task()
            if task is not None:
                self._busy.add(task)
            try:
                released = await self._run(job)
            except Exception:
                logger.exception("job %s crashed the worker loop", job.id)
            finally:
                await self._leave_queue(job, released)
                if task is not None:
                    self._busy.discard(task)

    async def _leave_queue(self, job: Job, released: bool) -> None:
        try:
            if released and self._stopping:
                await self.queue.release(job)
            else:
                await self.queue.task_done(job.id)
            self._on_idle()
        except HuahuaError as err:
            logger.warning("could not report job %s to the queue: %s", job.id, err.message)

    async def _run(self, queued: Job) -> bool:
        """Run one attempt; True when the job went back to the store's queue (shutdown or retry)."""
        job = await self._claim(queued.id)
        if job is None:
            return False
        self._on_started(job.id)
        token = CancelToken()
        self.running[job.id] = token
        if job.id in self.early_cancels:
            del self.early_cancels[job.id]
            token.cancel()
        heartbeat = asyncio.create_task(self._keep_lease(job, token), name=f"lease-{job.id}")
        self.events.publish(job, JobEvent(job.id, EventType.STARTED))
        try:
            request = await self._engine_request(job)
            pictures = await self.engine.generate(request, self._progress_callback(job), token)
            digests = tuple([await self.images.put(picture.png) for picture in pictures])
            await self.finish(job, JobStatus.DONE, images=digests)
            return False
        except (JobCancelled, asyncio.CancelledError):
            if job.id in self._fenced:
                logger.warning("job %s: this attempt lost its lease and stopped", job.id)
                return False
            if self._stopping:
                await asyncio.shield(self.store.release_attempt(replace(job, progress=0.0)))
                return True
            await self.finish(job, JobStatus.CANCELLED)
            return False
        except EngineUnreachable as err:
            return await self._retry_later(job, err)
        except HuahuaError as err:
            await self.finish(job, JobStatus.FAILED, error=err.message)
            return False
        except Exception:
            logger.exception("job %s failed", job.id)
            await self.finish(
                job, JobStatus.FAILED, error="Something went wrong while drawing; please try again."
            )
            return False
        finally:
            heartbeat.cancel()
            self._fenced.discard(job.id)
            self.running.pop(job.id, None)
            self.progress.pop(job.id, None)

    async def _claim(self, job_id: str) -> Job | None:
        """Start the job's next attempt. The queue may hand over a job whose worker died a moment before
        the store's lease on it ran out (both wait about one lease): then wait one lease and try once more
        (a live holder renews its lease meanwhile and keeps the job)."""
        lease = self.settings.job_lease_s
        job = await self.store.claim_job(job_id, self.owner, lease, time.time())
        if job is None and not self._stopping:
            stored = await self.store.get_job(job_id)
            if stored is not None and stored.status == JobStatus.RUNNING and job_id not in self.running:
                await asyncio.sleep(lease)
                job = await self.store.claim_job(job_id, self.owner, lease, time.time())
        return job

    async def _retry_later(self, job: Job, err: EngineUnreachable) -> bool:
        attempts = self.settings.job_max_attempts
        if job.attempt >= attempts:
            await self.finish(job, JobStatus.FAILED, error=err.message)
            return False
        if not await self.store.release_attempt(replace(job, progress=0.0)):
            return False
        note = WAITING_FOR_WORKER.format(attempt=job.attempt + 1, attempts=attempts)
        logger.warning("job %s: %s %s", job.id, err.message, note)
        self.events.publish(job, JobEvent(job.id, EventType.POSITION, error=note))
        delay = RETRY_BACKOFF_S * 2 ** (job.attempt - 1)
        task = asyncio.create_task(self._put_later(job, delay))
        self._later.add(task)
        task.add_done_callback(self._later.discard)
        return True

    async def _put_later(self, job: Job, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.queue.put(job)
        except HuahuaError as err:
            logger.info("job %s waits for the recovery sweep: %s", job.id, err.message)

    async def _keep_lease(self, job: Job, token: CancelToken) -> None:
        """Renew the lease while the attempt runs; stop the drawing once it is no longer current."""
        lease = self.settings.job_lease_s
        while True:
            await asyncio.sleep(lease / 3)
            try:
                current = await self.store.renew_lease(job.id, job.attempt, lease, time.time())
            except HuahuaError as err:
                logger.warning("could not renew the lease of job %s: %s", job.id, err.message)
                continue
            if not current:
                self._fenced.add(job.id)
                token.cancel()
                return

    async def _engine_request(self, job: Job) -> GenerationRequest:
        request = job.request
        if request.references:  # a story's cast pictures, loaded like the init image
            request = replace(
                request, reference_images=tuple([await self.images.get(d) for d in request.references])
            )
        if job.init_image is None:
            return request
        return replace(request, init_image=await self.images.get(job.init_image))

    def _progress_callback(self, job: Job) -> Callable[[int, int], None]:
        def on_progress(step: int, total: int) -> None:
            fraction = step / total if total else 0.0
            self.progress[job.id] = fraction
            self.events.publish(
                job, JobEvent(job.id, EventType.PROGRESS, progress=fraction, step=step, total_steps=total)
            )

        return on_progress
