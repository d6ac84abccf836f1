"""One contract suite run against MemoryQueue and RedisStreamsQueue (a real redis-server), plus Redis-only
tests for sharing between processes and crash recovery."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio

from core.errors import InvalidOption, QueueFull, ServiceUnavailable, TooManyJobs
from core.jobs import redis_queue
from core.jobs.queue import JobQueue, MemoryQueue, QueueClosed, fair_order
from core.jobs.redis_queue import RedisStreamsQueue
from core.types import Job

MakeQueue = Callable[..., Awaitable[JobQueue]]


@pytest.fixture(params=["memory", "redis"])
async def make_queue(request: pytest.FixtureRequest):
    created: list[JobQueue] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    name = f"t{uuid.uuid4().hex[:8]}"

    async def make(
        max_size: int = 100, user_max_pending: int = 10, user_concurrency: int = 1, **extra: object
    ) -> JobQueue:
        queue: JobQueue
        if request.param == "memory":
            queue = MemoryQueue(max_size, user_max_pending, user_concurrency)
        else:
            queue = RedisStreamsQueue(
                url,
                max_size=max_size,
                user_max_pending=user_max_pending,
                user_concurrency=user_concurrency,
                name=name,
                max_poll_s=0.05,
                **extra,  # type: ignore[arg-type]
            )
            await queue.connect()
        created.append(queue)
        return queue

    yield make
    for queue in created:
        await queue.close()


async def _drain(queue: JobQueue, count: int) -> list[str]:
    """Get `count` jobs, finishing each before the next, as one worker would."""
    order = []
    for _ in range(count):
        job = await asyncio.wait_for(queue.get(), 5)
        order.append(job.id)
        await queue.task_done(job.id)
    return order


async def _expect_blocked(queue: JobQueue) -> asyncio.Task[Job]:
    getter = asyncio.create_task(queue.get())
    done, _ = await asyncio.wait({getter}, timeout=0.3)
    assert not done, "get() handed out a job it should have held back"
    return getter


async def test_fifo_per_user(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue()
    jobs = [make_job("web:alice") for _ in range(4)]
    assert [await queue.put(job) for job in jobs] == [1, 2, 3, 4]
    assert await queue.size() == 4
    assert await _drain(queue, 4) == [job.id for job in jobs]
    assert await queue.size() == 0


async def test_round_robin_between_users(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue()
    a = [make_job("web:a") for _ in range(5)]
    b = make_job("tg:b")
    for job in a:
        await queue.put(job)
    assert await queue.put(b) == 2
    assert await _drain(queue, 6) == [a[0].id, b.id, a[1].id, a[2].id, a[3].id, a[4].id]


async def test_a_released_job_is_first_in_its_users_line(make_queue: MakeQueue, make_job) -> None:
    """A job given back by a stopping worker is its user's oldest: it goes before the user's later jobs."""
    queue = await make_queue()
    jobs = [make_job("web:alice") for _ in range(3)]
    other = make_job("web:bob")
    for job in [*jobs, other]:
        await queue.put(job)
    first = await asyncio.wait_for(queue.get(), 5)
    assert first.id == jobs[0].id
    await queue.release(first)
    assert await queue.position(first.id) == 2  # bob's turn first, then alice's oldest
    assert await _drain(queue, 4) == [other.id, jobs[0].id, jobs[1].id, jobs[2].id]


async def test_positions_follow_get_order(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue()
    a = [make_job("web:a") for _ in range(3)]
    b = [make_job("web:b") for _ in range(2)]
    c = make_job("web:c")
    for job in [*a, *b, c]:
        await queue.put(job)
    expected = [a[0].id, b[0].id, c.id, a[1].id, b[1].id, a[2].id]
    positions = await queue.positions()
    assert positions == {job_id: i for i, job_id in enumerate(expected, start=1)}
    for job_id, place in positions.items():
        assert await queue.position(job_id) == place
    assert await queue.position("no-such-job") is None
    first = await queue.get()
    assert first.id == expected[0]
    assert await queue.position(first.id) is None
    assert await queue.positions() == {job_id: i for i, job_id in enumerate(expected[1:], start=1)}
    await queue.task_done(first.id)
    assert await _drain(queue, 5) == expected[1:]


async def test_user_concurrency_holds_back_and_releases(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue(user_concurrency=1)
    a1, a2, b1 = make_job("web:a"), make_job("web:a"), make_job("web:b")
    for job in (a1, a2, b1):
        await queue.put(job)
    assert (await queue.get()).id == a1.id
    # a is at its limit: b jumps ahead of a's second job
    assert await queue.positions() == {b1.id: 1, a2.id: 2}
    assert (await queue.get()).id == b1.id
    getter = await _expect_blocked(queue)
    assert await queue.position(a2.id) == 1
    await queue.task_done(a1.id)
    assert (await asyncio.wait_for(getter, 5)).id == a2.id


async def test_user_concurrency_above_one(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue(user_concurrency=2)
    jobs = [make_job("web:a") for _ in range(3)]
    for job in jobs:
        await queue.put(job)
    assert (await queue.get()).id == jobs[0].id
    assert (await queue.get()).id == jobs[1].id
    getter = await _expect_blocked(queue)
    await queue.task_done(jobs[1].id)
    assert (await asyncio.wait_for(getter, 5)).id == jobs[2].id


async def test_queue_full(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue(max_size=3)
    for i in range(3):
        await queue.put(make_job(f"web:u{i}"))
    with pytest.raises(QueueFull, match="queue is full"):
        await queue.put(make_job("web:late"))
    await queue.get()  # running jobs do not count towards max_size
    assert await queue.put(make_job("web:late")) == 3


async def test_too_many_jobs_counts_waiting_and_running(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue(user_max_pending=2)
    first, second = make_job("web:a"), make_job("web:a")
    await queue.put(first)
    await queue.put(second)
    with pytest.raises(TooManyJobs, match="already have 2"):
        await queue.put(make_job("web:a"))
    assert await queue.put(make_job("web:b")) == 2  # other users are unaffected
    running = await queue.get()
    with pytest.raises(TooManyJobs):
        await queue.put(make_job("web:a"))
    await queue.task_done(running.id)
    await queue.put(make_job("web:a"))
    assert await queue.remove(second.id)
    await queue.put(make_job("web:a"))


async def test_remove_waiting_jobs(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue()
    a1, a2, b1, b2 = make_job("web:a"), make_job("web:a"), make_job("web:b"), make_job("web:b")
    for job in (a1, a2, b1, b2):
        await queue.put(job)
    assert await queue.remove(a1.id) is True
    assert await queue.remove(a1.id) is False
    assert await queue.positions() == {a2.id: 1, b1.id: 2, b2.id: 3}
    assert await queue.remove(b1.id) and await queue.remove(b2.id)
    assert await queue.positions() == {a2.id: 1}
    assert await queue.size() == 1
    running = await queue.get()
    assert running.id == a2.id
    assert await queue.remove(a2.id) is False  # running jobs are cancelled through the engine, not here
    assert await queue.remove("unknown") is False
    late = make_job("web:b")
    assert await queue.put(late) == 1
    assert await _drain(queue, 1) == [late.id]


async def test_put_twice_does_not_duplicate(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue()
    other, job = make_job("web:b"), make_job("web:a")
    await queue.put(other)
    assert await queue.put(job) == 2
    assert await queue.put(job) == 2
    assert await queue.size() == 2
    assert await _drain(queue, 2) == [other.id, job.id]
    await queue.task_done(job.id)  # finishing twice is harmless


async def test_holding_names_waiting_and_handed_out_jobs(
    make_queue: MakeQueue, make_job, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the recovery sweep asks instead of putting every job again: the jobs `put` would not add."""
    monkeypatch.setattr(redis_queue, "HOLDING_BATCH", 2)  # Redis: several HMGETs for one question
    queue = await make_queue()
    waiting, running, done, removed, released = (make_job(f"web:u{i}") for i in range(5))
    assert await queue.holding([]) == set()
    for job in (running, done, released, waiting, removed):
        await queue.put(job)
    handed = {(await queue.get()).id for _ in range(3)}
    assert handed == {running.id, done.id, released.id}
    await queue.task_done(done.id)
    await queue.release(released)
    await queue.remove(removed.id)
    everyone = [job.id for job in (waiting, running, done, removed, released)] + ["unknown"]
    assert await queue.holding(everyone) == {waiting.id, running.id, released.id}
    for job in (waiting, running, released):  # what `holding` names, `put` does not add again
        await queue.put(job)
    assert await queue.size() == 2


async def test_job_content_survives_the_queue(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue()
    job = make_job("tg:42", prompt="月光下的竹林", n=3, meta={"message": "9"}, notes=("x",))
    await queue.put(job)
    assert await queue.get() == job


async def test_close_wakes_getters(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue()
    getters = [asyncio.create_task(queue.get()) for _ in range(2)]
    await asyncio.sleep(0.1)
    await queue.close()
    for getter in getters:
        with pytest.raises(QueueClosed):
            await asyncio.wait_for(getter, 5)
    with pytest.raises(QueueClosed):
        await queue.put(make_job())
    with pytest.raises(QueueClosed):
        await queue.get()


async def test_cancelled_getter_loses_no_job(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0.1)
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    job = make_job()
    await queue.put(job)
    assert await _drain(queue, 1) == [job.id]


async def test_bad_limits_are_refused(make_queue: MakeQueue) -> None:
    for limits in ({"max_size": 0}, {"user_max_pending": -1}, {"user_concurrency": 1.5}):
        with pytest.raises(InvalidOption):
            await make_queue(**limits)


@pytest.mark.timeout(120)
async def test_thousand_users_one_job_each(make_queue: MakeQueue, make_job) -> None:
    queue = await make_queue(max_size=1000)
    jobs = [make_job(f"web:user{i}") for i in range(1000)]
    places = await asyncio.gather(*(queue.put(job) for job in jobs))
    assert sorted(places) == list(range(1, 1001))
    with pytest.raises(QueueFull):
        await queue.put(make_job("web:one-too-many"))
    by_place = {place: job.id for place, job in zip(places, jobs, strict=True)}
    assert await queue.positions() == {job_id: place for place, job_id in by_place.items()}
    got = [await queue.get() for _ in range(1000)]
    assert [job.id for job in got] == [by_place[i] for i in range(1, 1001)]
    await asyncio.gather(*(queue.task_done(job.id) for job in got))
    assert await queue.size() == 0


def test_fair_order_rounds() -> None:
    lanes = [(False, ["a1", "a2", "a3"]), (True, ["b1", "b2"]), (False, ["c1"])]
    assert fair_order(lanes) == ["a1", "c1", "b1", "a2", "b2", "a3"]
    assert fair_order([]) == []


# Redis only ------------------------------------------------------------------------------------


async def _redis_queue(url: str, name: str, consumer: str, **extra: float) -> RedisStreamsQueue:
    queue = RedisStreamsQueue(
        url,
        max_size=10,
        user_max_pending=5,
        user_concurrency=1,
        name=name,
        consumer=consumer,
        max_poll_s=0.05,
        **extra,
    )
    await queue.connect()
    return queue


async def test_redis_queues_share_work_between_processes(redis_url: str, make_job) -> None:
    name = f"s{uuid.uuid4().hex[:8]}"
    producer = await _redis_queue(redis_url, name, "web")
    worker = await _redis_queue(redis_url, name, "worker")
    try:
        getter = asyncio.create_task(worker.get())
        await asyncio.sleep(0.1)
        job = make_job("web:a")
        await producer.put(job)
        assert (await asyncio.wait_for(getter, 5)).id == job.id
        with pytest.raises(TooManyJobs):  # limits are shared too
            for _ in range(5):
                await producer.put(make_job("web:a"))
        await worker.task_done(job.id)
        assert await producer.size() == 4
    finally:
        await producer.close()
        await worker.close()


async def test_redis_waiting_jobs_survive_a_restart(redis_url: str, make_job) -> None:
    name = f"r{uuid.uuid4().hex[:8]}"
    before = await _redis_queue(redis_url, name, "w1")
    jobs = [make_job("web:a"), make_job("web:b"), make_job("web:a")]
    for job in jobs:
        await before.put(job)
    await before.close()
    after = await _redis_queue(redis_url, name, "w1")
    try:
        assert await after.size() == 3
        assert await after.positions() == {jobs[0].id: 1, jobs[1].id: 2, jobs[2].id: 3}
        assert await _drain(after, 3) == [job.id for job in jobs]
    finally:
        await after.close()


async def test_redis_crashed_worker_job_is_reclaimed(redis_url: str, make_job) -> None:
    name = f"c{uuid.uuid4().hex[:8]}"
    alive = await _redis_queue(redis_url, name, "w1", claim_idle_s=0.3)
    other = await _redis_queue(redis_url, name, "w2", claim_idle_s=0.3)
    try:
        job = make_job("web:a")
        await alive.put(job)
        assert (await alive.get()).id == job.id
        # w1 keeps refreshing its job, so w2 must not take it over
        getter = await _expect_blocked(other)
        await asyncio.sleep(0.5)
        assert not getter.done()
        await alive.close()  # the worker "crashes": no task_done, no more refreshes
        reclaimed = await asyncio.wait_for(getter, 5)
        assert reclaimed == job
        await other.task_done(job.id)
        assert await other.put(make_job("web:a")) == 1  # the user's slot is free again
    finally:
        await alive.close()
        await other.close()


async def test_redis_corrupt_entry_is_dropped_and_frees_the_slot(redis_url: str, make_job) -> None:
    name = f"x{uuid.uuid4().hex[:8]}"
    queue = await _redis_queue(redis_url, name, "w1")
    raw = redis.asyncio.from_url(redis_url, decode_responses=True)
    try:
        entry = await raw.xadd(f"{name}:u:web:x", {"id": "bad", "job": "{truncated"})
        await raw.hset(f"{name}:entry", "bad", entry)
        await raw.hset(f"{name}:owner", "bad", "web:x")
        await raw.incr(f"{name}:waiting")
        await raw.hincrby(f"{name}:pending", "web:x", 1)
        await raw.rpush(f"{name}:rotation", "web:x")
        good = make_job("web:y")
        await queue.put(good)
        assert (await asyncio.wait_for(queue.get(), 5)).id == good.id
        assert await queue.size() == 0
        assert await raw.xpending(f"{name}:dispatch", "workers") == {
            "pending": 1,
            "min": (await raw.hget(f"{name}:inflight", good.id)),
            "max": (await raw.hget(f"{name}:inflight", good.id)),
            "consumers": [{"name": "w1", "pending": 1}],
        }
        for _ in range(5):
            await queue.put(make_job("web:x"))  # the corrupt job no longer counts against web:x
    finally:
        await raw.aclose()
        await queue.close()


async def test_redis_unreachable_is_a_friendly_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = RedisStreamsQueue(
        f"redis://:secret-password@127.0.0.1:{port}/0", max_size=1, user_max_pending=1, user_concurrency=1
    )
    with pytest.raises(ServiceUnavailable, match="cannot be reached") as caught:
        await queue.connect()
    assert "secret-password" not in str(caught.value)
