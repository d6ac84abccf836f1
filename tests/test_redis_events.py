"""Job events and cancels between two real services sharing a Redis queue and one SQLite data dir."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from core.errors import ServiceUnavailable
from core.redis_events import RedisEventRelay
from core.service import Huahua
from core.types import EventType, Job, JobEvent, JobKind, JobStatus
from tests.conftest import REDIS_SERVER, _free_port
from tests.support import PatternEngine, make_service

_databases = itertools.cycle(range(10, 16))
WAIT_S = 10.0


@pytest.fixture
async def shared_url(redis_url: str) -> AsyncIterator[str]:
    """A freshly flushed Redis database of the session's server, for one test."""
    url = redis_url.rsplit("/", 1)[0] + f"/{next(_databases)}"
    client = redis.asyncio.from_url(url)
    await client.flushdb()
    await client.aclose()
    yield url


class Recorder:
    """A listener that keeps every (job, event) it is called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[Job, JobEvent]] = []
        self.changed = asyncio.Event()

    async def __call__(self, job: Job, event: JobEvent) -> None:
        self.calls.append((job, event))
        self.changed.set()

    def types(self) -> list[EventType]:
        return [event.type for _, event in self.calls]

    async def wait_for(self, event_type: EventType) -> Job:
        async def seen() -> Job:
            while True:
                for job, event in self.calls:
                    if event.type == event_type:
                        return job
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(seen(), WAIT_S)


async def _pair(tmp_path: Path, url: str, gate: asyncio.Event) -> tuple[Huahua, Huahua]:
    """A: takes requests only (workers=0); B: runs jobs; same queue, same data dir."""
    submitter = await make_service(tmp_path, PatternEngine(), queue="redis", redis_url=url, workers=0)
    runner = await make_service(tmp_path, PatternEngine(gate=gate), queue="redis", redis_url=url)
    runner.queue.max_poll_s = 0.05  # type: ignore[attr-defined]
    return submitter, runner


async def _submit(service: Huahua) -> Job:
    request = replace(service.default_request(), prompt="一只猫", seed=3, width=128, height=128)
    return await service.submit_request("web:alice", "web:room1", JobKind.IMAGINE, "a cat", request)


async def _collect(service: Huahua, job_id: str) -> list[JobEvent]:
    return [event async for event in service.subscribe(job_id)]


async def test_job_run_elsewhere_reaches_the_submitters_subscribers_and_listeners(
    tmp_path: Path, shared_url: str
) -> None:
    gate = asyncio.Event()
    submitter, runner = await _pair(tmp_path, shared_url, gate)
    heard_a, heard_b = Recorder(), Recorder()
    submitter.listen("web:", heard_a)
    runner.listen("web:", heard_b)
    try:
        job = await _submit(submitter)
        await heard_a.wait_for(EventType.STARTED)
        stream = asyncio.create_task(_collect(submitter, job.id))
        await asyncio.sleep(0.05)
        gate.set()
        events = await asyncio.wait_for(stream, WAIT_S)
        await heard_a.wait_for(EventType.DONE)
        await heard_b.wait_for(EventType.QUEUED)
        await submitter.events.drain()
        await runner.events.drain()
    finally:
        await submitter.stop()
        await runner.stop()

    assert events[-1].type == EventType.DONE
    assert [e.step for e in events if e.type == EventType.PROGRESS and e.step] == [1, 2, 3, 4]
    expected = [EventType.QUEUED, EventType.STARTED] + [EventType.PROGRESS] * 4 + [EventType.DONE]
    assert heard_a.types() == expected  # each once: A's own QUEUED does not come back through Redis
    assert heard_b.types() == expected
    done_job = heard_a.calls[-1][0]
    assert done_job.status == JobStatus.DONE and len(done_job.images) == 1
    assert submitter.engine.requests == []  # type: ignore[attr-defined]
    assert submitter._waiting == {} and submitter._watching == {}


async def test_cancel_in_the_submitting_process_stops_the_job_running_elsewhere(
    tmp_path: Path, shared_url: str
) -> None:
    gate = asyncio.Event()
    submitter, runner = await _pair(tmp_path, shared_url, gate)
    heard = Recorder()
    submitter.listen("web:", heard)
    try:
        job = await _submit(submitter)
        await heard.wait_for(EventType.STARTED)
        await submitter.cancel(job.id, "web:alice")
        await asyncio.sleep(0.2)
        gate.set()
        cancelled = await heard.wait_for(EventType.CANCELLED)
        stored = await submitter.get_job(job.id)
    finally:
        await submitter.stop()
        await runner.stop()

    assert cancelled.status == JobStatus.CANCELLED
    assert stored.status == JobStatus.CANCELLED and stored.images == ()
    assert EventType.DONE not in heard.types()


async def test_a_cancel_that_arrives_before_the_job_starts_still_applies(
    tmp_path: Path, shared_url: str
) -> None:
    gate = asyncio.Event()
    gate.set()
    submitter, runner = await _pair(tmp_path, shared_url, gate)
    heard = Recorder()
    submitter.listen("web:", heard)
    try:
        request = replace(submitter.default_request(), prompt="一只猫", width=128, height=128)
        job = submitter._new_job("web:alice", "web:room1", JobKind.IMAGINE, "a cat", request)
        assert submitter.relay is not None
        submitter.relay.request_cancel(job.id)  # e.g. sent while the runner was between get() and start

        for _ in range(int(WAIT_S / 0.01)):
            if job.id in runner.runner.early_cancels:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the runner never heard the cancel request")
        await submitter.submit(job)
        await heard.wait_for(EventType.CANCELLED)
        stored = await runner.get_job(job.id)
    finally:
        await submitter.stop()
        await runner.stop()
    assert EventType.DONE not in heard.types()
    assert EventType.PROGRESS not in heard.types()  # cancelled before its first step
    assert stored.status == JobStatus.CANCELLED


async def test_memory_queue_publishes_nothing_to_redis(tmp_path: Path, redis_url: str) -> None:
    watcher = redis.asyncio.from_url(redis_url)
    pubsub = watcher.pubsub()
    await pubsub.psubscribe("*")
    service = await make_service(tmp_path, PatternEngine())
    heard = Recorder()
    service.listen("web:", heard)
    try:
        await _submit(service)
        await heard.wait_for(EventType.DONE)
        assert service.relay is None and service.events.forward is None
        messages = []
        while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)) is not None:
            messages.append(message)
    finally:
        await service.stop()
        await pubsub.aclose()
        await watcher.aclose()
    assert messages == []


# the relay on its own -------------------------------------------------------------------------------


class Inbox:
    """What a relay hands to its service: delivered events, cancel requests, reconnects."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple[Job, JobEvent]] = asyncio.Queue()
        self.cancels: list[str] = []
        self.reconnects = asyncio.Event()
        self.running: set[str] = set()

    def deliver(self, job: Job, event: JobEvent) -> None:
        self.events.put_nowait((job, event))

    def cancel(self, job_id: str) -> bool:
        self.cancels.append(job_id)
        return job_id in self.running

    async def reconnected(self) -> None:
        self.reconnects.set()


async def _relay(url: str, name: str, inbox: Inbox, **extra: Any) -> RedisEventRelay:
    relay = RedisEventRelay(url, name=name, **extra)
    relay.forward = await relay.start(inbox.deliver, inbox.cancel, inbox.reconnected)  # type: ignore[method-assign]
    return relay


async def test_relay_carries_events_and_cancels_and_skips_garbage(redis_url: str, make_job: Any) -> None:
    one, two = Inbox(), Inbox()
    first = await _relay(redis_url, "relay-t1", one)
    second = await _relay(redis_url, "relay-t1", two)
    raw = redis.asyncio.from_url(redis_url)
    job = make_job(status=JobStatus.DONE, images=("ab" * 32,))
    try:
        for garbage in (b"not json", b"[1]", json.dumps({"origin": "x", "job": {"id": 5}}).encode()):
            await raw.publish(first.events_channel, garbage)
        await raw.publish(first.cancel_channel, json.dumps({"origin": "x", "job_id": 7}))
        first.forward(job, JobEvent(job.id, EventType.DONE, progress=1.0))
        got_job, got_event = await asyncio.wait_for(two.events.get(), WAIT_S)
        first.request_cancel(job.id)
        await asyncio.sleep(0.2)
    finally:
        await first.close()
        await second.close()
        await raw.aclose()
    assert got_job == job
    assert got_event == JobEvent(job.id, EventType.DONE, progress=1.0)
    assert one.events.empty() and two.events.empty()
    assert two.cancels == [job.id] and one.cancels == []


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """A password-protected redis-server this test may stop and start again on the same port."""
    port = _free_port()
    processes: list[subprocess.Popen[bytes]] = []
    yield port, processes
    for process in processes:
        process.terminate()
        process.wait(timeout=5)


def _start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "no", "--requirepass", "relay-secret-pw"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"-NOAUTH"):
                    return process
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start in time")


async def test_relay_reconnects_after_redis_restarts_and_logs_it_once(
    tmp_path: Path, private_redis: tuple[int, list[subprocess.Popen[bytes]]], make_job: Any, caplog: Any
) -> None:
    port, processes = private_redis
    processes.append(_start_redis(port, tmp_path))
    url = f"redis://:relay-secret-pw@127.0.0.1:{port}/0"
    one, two = Inbox(), Inbox()
    first = await _relay(url, "relay-t2", one, retry_max_s=0.2)
    second = await _relay(url, "relay-t2", two, retry_max_s=0.2)
    job = make_job()
    caplog.set_level(logging.INFO, logger="core.redis_events")
    try:
        stopped = processes.pop()
        stopped.terminate()
        stopped.wait(timeout=5)
        await asyncio.sleep(0.5)
        processes.append(_start_redis(port, tmp_path))
        await asyncio.wait_for(two.reconnects.wait(), WAIT_S)
        await asyncio.wait_for(one.reconnects.wait(), WAIT_S)
        first.forward(job, JobEvent(job.id, EventType.PROGRESS, progress=0.5, step=2, total_steps=4))
        _, event = await asyncio.wait_for(two.events.get(), WAIT_S)
    finally:
        await first.close()
        await second.close()
    assert event.step == 2 and event.progress == 0.5
    lost = [r for r in caplog.records if "lost Redis" in r.getMessage()]
    assert len(lost) == 2  # once per relay, however many retries
    assert "relay-secret-pw" not in caplog.text


async def test_unreachable_redis_is_a_friendly_error_without_the_password(caplog: Any) -> None:
    relay = RedisEventRelay(f"redis://:hidden-pw@127.0.0.1:{_free_port()}/0")
    inbox = Inbox()
    with pytest.raises(ServiceUnavailable, match="cannot be reached"):
        await relay.start(inbox.deliver, inbox.cancel)
    assert "hidden-pw" not in caplog.text


async def test_a_job_that_ends_while_redis_is_away_is_delivered_once_after_reconnecting(
    tmp_path: Path, private_redis: tuple[int, list[subprocess.Popen[bytes]]]
) -> None:
    port, processes = private_redis
    processes.append(_start_redis(port, tmp_path))
    url = f"redis://:relay-secret-pw@127.0.0.1:{port}/0"
    gate = asyncio.Event()
    submitter, runner = await _pair(tmp_path, url, gate)
    heard = Recorder()
    submitter.listen("web:", heard)
    try:
        job = await _submit(submitter)
        await heard.wait_for(EventType.STARTED)
        stopped = processes.pop()
        stopped.terminate()
        stopped.wait(timeout=5)
        gate.set()
        for _ in range(int(WAIT_S / 0.02)):
            if (await submitter.store.get_job(job.id)).status.finished:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.02)
        processes.append(_start_redis(port, tmp_path))
        done = await heard.wait_for(EventType.DONE)
        await asyncio.sleep(0.5)  # the runner's retried DONE arrives too, and must not be delivered again
        await submitter.events.drain()
    finally:
        await submitter.stop()
        await runner.stop()
    assert done.status == JobStatus.DONE and done.images
    assert heard.types().count(EventType.DONE) == 1


async def test_workers_keep_taking_jobs_after_a_redis_outage(
    tmp_path: Path, private_redis: tuple[int, list[subprocess.Popen[bytes]]], caplog: Any
) -> None:
    port, processes = private_redis
    processes.append(_start_redis(port, tmp_path))
    url = f"redis://:relay-secret-pw@127.0.0.1:{port}/0"
    service = await make_service(tmp_path, PatternEngine(), queue="redis", redis_url=url)
    service.queue.max_poll_s = 0.05  # type: ignore[attr-defined]
    caplog.set_level(logging.WARNING, logger="core.service")
    try:
        stopped = processes.pop()
        stopped.terminate()
        stopped.wait(timeout=5)
        for _ in range(int(WAIT_S / 0.05)):  # the worker notices the outage and backs off
            if "job queue is unavailable" in caplog.text:
                break
            await asyncio.sleep(0.05)
        assert "job queue is unavailable" in caplog.text
        processes.append(_start_redis(port, tmp_path))
        for _ in range(int(WAIT_S / 0.1)):  # the relay and the queue reconnect
            try:
                job = await _submit(service)
                break
            except ServiceUnavailable:
                await asyncio.sleep(0.1)
        events = await asyncio.wait_for(_collect(service, job.id), WAIT_S * 2)
    finally:
        await service.stop()
    assert events[-1].type == EventType.DONE
    assert "relay-secret-pw" not in caplog.text
