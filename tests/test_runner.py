"""The job runner: leases and fencing, shutdown, retries after worker outages, the recovery sweep."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
import redis.asyncio
from aiohttp import web

from core.errors import ServiceUnavailable
from core.storage.sqlite import SqliteStore
from core.types import Job, JobEvent, JobStatus
from core.worker_server import create_app
from tests.support import PatternEngine, make_service, until

IMAGINE = "/imagine 一只猫 --seed 5"


async def _submit(service, user: str = "web:alice", text: str = IMAGINE):  # type: ignore[no-untyped-def]
    reply = await service.handle_message("web:room1", user, text)
    assert reply.job is not None, reply.texts
    return reply.job


async def _status(service, job_id: str) -> JobStatus:  # type: ignore[no-untyped-def]
    job = await service.store.get_job(job_id)
    assert job is not None
    return job.status


async def test_stop_gives_the_running_job_back_and_the_next_process_finishes_it(tmp_path: Path) -> None:
    gate = asyncio.Event()
    first = await make_service(tmp_path, PatternEngine(gate=gate))
    job = await _submit(first)

    async def running() -> bool:
        return await _status(first, job.id) == JobStatus.RUNNING

    await until(running)
    await first.stop()
    store = await SqliteStore.open(first.settings.database_path)
    stored = await store.get_job(job.id)
    await store.close()
    assert stored is not None and (stored.status, stored.attempt) == (JobStatus.QUEUED, 1)
    second = await make_service(tmp_path, PatternEngine())
    try:

        async def done() -> bool:
            return await _status(second, job.id) == JobStatus.DONE

        await until(done)
        finished = await second.store.get_job(job.id)
        assert finished is not None and finished.attempt == 2 and len(finished.images) == 1
    finally:
        await second.stop()


async def test_a_superseded_attempt_stops_and_stores_nothing(tmp_path: Path) -> None:
    """Another process takes the job over after this one's lease lapsed: this attempt is fenced."""
    service = await make_service(tmp_path, PatternEngine(step_delay=0.1), job_lease_s=1.5)
    finals: list[JobEvent] = []

    async def heard(job, event: JobEvent) -> None:  # type: ignore[no-untyped-def]
        if event.type.final:
            finals.append(event)

    service.listen("web:", heard)
    try:
        job = await _submit(service, text=IMAGINE + " --steps 40")

        async def running() -> bool:
            return await _status(service, job.id) == JobStatus.RUNNING

        await until(running)
        # another process claims the job as if the lease had lapsed (its clock 10 s ahead)
        taken = await service.store.claim_job(job.id, "elsewhere", 60.0, time.time() + 10)
        assert taken is not None and taken.attempt == 2

        async def stopped() -> bool:
            return job.id not in service.runner.running

        await until(stopped, timeout=2.0)  # the next renewal (every 0.5 s) finds the attempt superseded
        stored = await service.store.get_job(job.id)
        assert stored is not None
        assert (stored.status, stored.attempt, stored.images) == (JobStatus.RUNNING, 2, ())
        assert finals == []
    finally:
        await service.stop()


async def test_one_shot_commands_leave_other_processes_jobs_alone(tmp_path: Path) -> None:
    front = await make_service(tmp_path, PatternEngine(), workers=0)
    job = await _submit(front)
    await front.stop()
    one_shot = await _start(tmp_path, recover=False)
    try:
        await asyncio.sleep(0.3)
        assert await _status(one_shot, job.id) == JobStatus.QUEUED
    finally:
        await one_shot.stop()
    later = await make_service(tmp_path, PatternEngine())
    try:

        async def done() -> bool:
            return await _status(later, job.id) == JobStatus.DONE

        await until(done)
    finally:
        await later.stop()


async def _start(tmp_path: Path, *, recover: bool, **overrides):  # type: ignore[no-untyped-def]
    from core.app import build_service
    from tests.support import make_settings

    service = await build_service(make_settings(tmp_path, **overrides), engine=PatternEngine())
    await service.start(recover=recover)
    return service


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_worker_is_waited_for_not_failed(tmp_path: Path) -> None:
    port = _free_port()
    service = await make_service(
        tmp_path,
        engine_name="http",
        worker_url=f"http://127.0.0.1:{port}",
        job_max_attempts=3,
        image_area=128 * 128,  # the size the worker's engine draws; it cannot be asked while it is down
    )
    events: list[JobEvent] = []

    async def heard(job, event: JobEvent) -> None:  # type: ignore[no-untyped-def]
        events.append(event)

    service.listen("web:", heard)
    runner: web.AppRunner | None = None
    try:
        job = await _submit(service)

        async def waiting() -> bool:
            return any(event.error and "image worker" in event.error for event in events)

        await until(waiting)
        assert await _status(service, job.id) == JobStatus.QUEUED
        runner = web.AppRunner(create_app(PatternEngine()))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

        async def done() -> bool:
            return await _status(service, job.id) == JobStatus.DONE

        await until(done, timeout=15.0)
        stored = await service.store.get_job(job.id)
        assert stored is not None and stored.attempt >= 2 and stored.images
    finally:
        await service.stop()
        if runner is not None:
            await runner.cleanup()


async def test_a_worker_that_never_returns_fails_the_job_after_the_last_attempt(tmp_path: Path) -> None:
    service = await make_service(
        tmp_path, engine_name="http", worker_url=f"http://127.0.0.1:{_free_port()}", job_max_attempts=2
    )
    try:
        job = await _submit(service)

        async def failed() -> bool:
            return await _status(service, job.id) == JobStatus.FAILED

        await until(failed, timeout=10.0)
        stored = await service.store.get_job(job.id)
        assert stored is not None and stored.attempt == 2 and "cannot be reached" in (stored.error or "")
    finally:
        await service.stop()


# several processes on one Redis ------------------------------------------------------------------


async def test_sigterm_returns_the_job_to_the_shared_queue_at_once(tmp_path: Path, redis_url: str) -> None:
    gate = asyncio.Event()
    shared = {"queue": "redis", "redis_url": redis_url, "job_lease_s": 60.0}
    first = await make_service(tmp_path, PatternEngine(gate=gate), **shared)
    second = await make_service(tmp_path, PatternEngine(gate=gate), **shared, workers=0)
    try:
        job = await _submit(first)

        async def running() -> bool:
            return await _status(first, job.id) == JobStatus.RUNNING

        await until(running)
        await first.stop()
        takeover = await make_service(tmp_path, PatternEngine(), **shared)
        try:

            async def done() -> bool:
                return await _status(takeover, job.id) == JobStatus.DONE

            await until(done, timeout=10.0)  # well before the 60 s lease would have lapsed
        finally:
            await takeover.stop()
    finally:
        await second.stop()


async def test_jobs_come_back_after_redis_loses_its_data(tmp_path: Path, redis_url: str) -> None:
    gate = asyncio.Event()
    service = await make_service(
        tmp_path, PatternEngine(gate=gate), queue="redis", redis_url=redis_url, job_lease_s=3.0
    )
    try:
        jobs = [await _submit(service, user=f"web:user{i}") for i in range(4)]

        async def first_running() -> bool:
            return await _status(service, jobs[0].id) == JobStatus.RUNNING

        await until(first_running)
        client = redis.asyncio.from_url(redis_url)
        await client.flushall()
        await client.aclose()
        gate.set()

        async def all_done() -> bool:
            return all([await _status(service, job.id) == JobStatus.DONE for job in jobs])

        await until(all_done, timeout=15.0)
    finally:
        await service.stop()


@pytest.mark.parametrize("processes", [2])
async def test_quota_holds_exactly_between_processes(tmp_path: Path, processes: int) -> None:
    services = [
        await make_service(tmp_path, PatternEngine(), daily_image_quota=5, user_max_pending=50)
        for _ in range(processes)
    ]
    try:
        replies = await asyncio.gather(
            *(services[i % processes].handle_message("web:room1", "web:bob", IMAGINE) for i in range(16))
        )
        assert sum(reply.job is not None for reply in replies) == 5
        refused = [reply.texts[0] for reply in replies if reply.job is None]
        assert all("daily quota is 5 pictures" in text for text in refused)
    finally:
        for service in services:
            await service.stop()


class StallingProxy:
    """A TCP proxy to Redis on loopback whose traffic this test can stall, then cut (refusing reconnects)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers += [writer, up_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, held: bool) -> None:
            while data := await source.read(65536):
                if held:
                    await self.flowing.wait()
                if sink.is_closing():
                    break
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(
            pump(reader, up_writer, True), pump(up_reader, writer, False), return_exceptions=True
        )

    def stall(self) -> None:
        """Requests from now on reach Redis only after `cut` (that is, never)."""
        self.flowing.clear()

    def cut(self) -> None:
        """Drop every connection and refuse new ones, as a network that went away."""
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        self.flowing.set()  # held data meets closed connections and is dropped

    async def close(self) -> None:
        self.cut()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 5.0)


async def test_a_request_whose_queue_failed_after_a_sweep_queued_it_is_accepted(
    tmp_path: Path, redis_url: str
) -> None:
    """The front's put fails (its link to Redis stalls, then breaks) after another process's recovery sweep
    found the admitted job in the shared store and ran it: the user must get the job, not a refusal."""
    proxy = StallingProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    front = await make_service(
        tmp_path, PatternEngine(), queue="redis", redis_url=await proxy.start(), workers=0
    )
    worker = await make_service(
        tmp_path, PatternEngine(), queue="redis", redis_url=redis_url, job_lease_s=1.0
    )
    try:
        proxy.stall()
        asked = asyncio.create_task(front.handle_message("web:room1", "web:carol", IMAGINE))

        async def swept_and_done() -> bool:
            jobs = await worker.store.recent_jobs("web:room1")
            return bool(jobs) and jobs[0].status == JobStatus.DONE

        await until(swept_and_done, timeout=15.0)
        proxy.cut()
        reply = await asyncio.wait_for(asked, 30.0)
        [job] = await worker.store.recent_jobs("web:room1")
        assert reply.job is not None and reply.job.id == job.id, reply.texts
        assert job.attempt == 1 and len(job.images) == 1
    finally:
        await worker.stop()
        await front.stop()
        await proxy.close()


async def test_a_job_handed_over_before_its_dead_holders_lease_ran_out_runs_once_it_has(
    tmp_path: Path, redis_url: str
) -> None:
    """The queue may notice a dead worker a moment before the store's lease on its job expires (both wait
    about one lease): the worker it hands the job to waits for the lease instead of dropping the job."""
    front = await make_service(tmp_path, PatternEngine(), queue="redis", redis_url=redis_url, workers=0)
    job = await _submit(front, user="web:dora")
    claimed = await front.store.claim_job(job.id, "a-process-that-died", 1.5, time.time())
    assert claimed is not None and claimed.attempt == 1
    # no recovery sweep: only the queue's hand-over can bring the job back
    worker = await _start(tmp_path, recover=False, queue="redis", redis_url=redis_url, job_lease_s=1.5)
    try:

        async def done() -> bool:
            return await _status(worker, job.id) == JobStatus.DONE

        await until(done, timeout=10.0)
        finished = await worker.store.get_job(job.id)
        assert finished is not None and finished.attempt == 2
    finally:
        await worker.stop()
        await front.stop()


async def test_the_sweep_reads_only_the_jobs_its_queue_lacks(tmp_path: Path) -> None:
    """Every few seconds in every process: the usual sweep, where the queue holds every queued job, reads
    none of them and puts none; a job the queue lost is read and waits again, in its place."""
    service = await make_service(tmp_path, PatternEngine(), workers=0)
    try:
        jobs = [await _submit(service, user=f"web:u{i}") for i in range(3)]
        read: list[str] = []
        get_job = service.store.get_job

        async def counted(job_id: str) -> Job | None:
            read.append(job_id)
            return await get_job(job_id)

        service.store.get_job = counted  # type: ignore[method-assign]
        assert await service.runner.recover() == 0
        assert read == []
        assert await service.queue.remove(jobs[1].id)  # as a Redis that lost this entry
        assert await service.runner.recover() == 1
        assert read == [jobs[1].id]
        assert await service.queue.positions() == {jobs[0].id: 1, jobs[2].id: 2, jobs[1].id: 3}
        await service.store.claim_job(jobs[1].id, "elsewhere", 30.0, time.time())
        assert await service.queue.remove(jobs[1].id)  # now running elsewhere under a live lease
        assert await service.runner.recover() == 0
    finally:
        await service.stop()


async def test_a_recovery_that_fails_at_start_is_left_to_the_sweeper(tmp_path: Path) -> None:
    """Seen in the 1,000-job chaos run: a `huahua jobs` restarted while Redis restarted too exited at its
    first recovery. It must start, and its sweeper must bring the waiting job back once it can."""
    from core.app import build_service
    from tests.support import make_settings

    front = await make_service(tmp_path, PatternEngine(), workers=0)
    job = await _submit(front)
    await front.stop()
    worker = await build_service(make_settings(tmp_path, job_lease_s=1.0), engine=PatternEngine())
    recoverable = worker.store.recoverable_ids
    failures: list[float] = []

    async def away_at_first(now: float) -> list[str]:
        if not failures:
            failures.append(now)
            raise ServiceUnavailable("The database cannot be reached right now; please try again.")
        return await recoverable(now)

    worker.store.recoverable_ids = away_at_first  # type: ignore[method-assign]
    await worker.start()
    try:

        async def done() -> bool:
            return await _status(worker, job.id) == JobStatus.DONE

        await until(done, timeout=10.0)
        assert len(failures) == 1
    finally:
        await worker.stop()


async def test_stop_ends_the_sweeper_when_a_database_call_swallows_the_cancel(tmp_path: Path) -> None:
    """Seen in the chaos run: a SIGTERMed `huahua jobs` never exited, its sweeper looping on a PostgreSQL
    call whose timeout had turned the shutdown's cancel into a storage error."""
    service = await make_service(tmp_path, PatternEngine(), job_lease_s=1.0)
    recoverable = service.store.recoverable_ids
    entered = asyncio.Event()

    async def unanswered(now: float) -> list[str]:
        if entered.is_set():
            return await recoverable(now)
        entered.set()
        try:
            await asyncio.sleep(30)  # a database that does not answer in time
        except asyncio.CancelledError:
            raise ServiceUnavailable("The database cannot be reached right now; please try again.") from None
        return await recoverable(now)

    service.store.recoverable_ids = unanswered  # type: ignore[method-assign]
    await asyncio.wait_for(entered.wait(), 5)
    await asyncio.wait_for(service.stop(), 10)
