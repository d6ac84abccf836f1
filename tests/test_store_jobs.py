"""The store's cross-process rules: admission (quota, pending limit), attempts and leases, the outbox.

Run against every store (the `store_backend` fixture: SQLite and a real PostgreSQL server); two stores
opened on one database stand for two processes."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from core.errors import StorageError
from core.types import DeliveryState, JobStatus
from tests.store_backends import Backend

T0 = 1_700_000_000.0
DAY_START = T0 - 3_600.0


@pytest.fixture
async def store(store_backend: Backend):
    opened = await store_backend.open()
    yield opened
    await opened.close()


async def _admit(store, job, quota: int = 5, pending: int = 3):  # type: ignore[no-untyped-def]
    return await store.admit_job(job, daily_quota=quota, max_pending=pending, day_start=DAY_START)


async def test_admission_counts_quota_and_pending(store, make_job) -> None:
    first = await _admit(store, make_job(n=2, created_at=T0))
    assert (first.admitted, first.images_today, first.pending, first.refused_by) == (True, 0, 0, None)
    second = await _admit(store, make_job(n=2, created_at=T0))
    assert (second.admitted, second.images_today, second.pending) == (True, 2, 1)
    over = await _admit(store, make_job(n=2, created_at=T0))
    assert (over.admitted, over.images_today, over.refused_by) == (False, 4, "quota")
    assert await store.images_today("web:alice", now=T0) == 4
    # a failed job gives its images back; yesterday's jobs count as pending but not against the quota
    await store.add_job(make_job(n=2, created_at=T0, status=JobStatus.FAILED))
    await store.add_job(make_job(n=3, created_at=DAY_START - 10))
    one = await _admit(store, make_job(n=1, created_at=T0), pending=4)
    assert (one.admitted, one.images_today, one.pending) == (True, 4, 3)
    pending = await _admit(store, make_job(n=0, created_at=T0), pending=4)
    assert (pending.admitted, pending.refused_by, pending.pending) == (False, "pending", 4)
    assert (await _admit(store, make_job(id="dup", created_at=T0), quota=100, pending=100)).admitted
    with pytest.raises(StorageError):
        await _admit(store, make_job(id="dup", created_at=T0), quota=100, pending=100)


async def test_quota_exact_between_two_processes(store_backend: Backend, make_job) -> None:
    """Two stores on one database stand for two processes: 40 racing requests of 1 image, quota 7."""
    stores = [await store_backend.open(), await store_backend.open()]
    try:
        jobs = [make_job(user="tg:bob", created_at=T0) for _ in range(40)]
        results = await asyncio.gather(
            *(_admit(stores[i % 2], job, quota=7, pending=100) for i, job in enumerate(jobs))
        )
        assert sum(result.admitted for result in results) == 7
        assert await stores[0].images_today("tg:bob", now=T0) == 7
    finally:
        for store in stores:
            await store.close()


async def test_attempts_are_fenced(store, make_job) -> None:
    job = make_job(created_at=T0)
    await store.add_job(job)
    first = await store.claim_job(job.id, "host-a", 30.0, T0)
    assert first is not None and (first.status, first.attempt, first.started_at) == (JobStatus.RUNNING, 1, T0)
    assert await store.claim_job(job.id, "host-b", 30.0, T0 + 29) is None  # the lease is live
    assert await store.renew_lease(job.id, 1, 30.0, T0 + 20)
    assert await store.claim_job(job.id, "host-b", 30.0, T0 + 49) is None  # renewed to T0 + 50
    assert await store.recoverable_ids(T0 + 49) == []
    assert await store.recoverable_ids(T0 + 51) == [job.id]
    second = await store.claim_job(job.id, "host-b", 30.0, T0 + 51)
    assert second is not None and second.attempt == 2
    # host-a comes back: it can neither renew, finish nor give the job back
    assert not await store.renew_lease(job.id, 1, 30.0, T0 + 52)
    stale = replace(first, status=JobStatus.DONE, images=("a" * 64,), finished_at=T0 + 52)
    assert not await store.finish_attempt(stale, ["tg"])
    assert not await store.release_attempt(first)
    assert await store.deliveries(job.id) == []
    done = replace(second, status=JobStatus.DONE, images=("b" * 64,), progress=1.0, finished_at=T0 + 60)
    assert await store.finish_attempt(done, ["tg", "dc"])
    stored = await store.get_job(job.id)
    assert stored is not None and stored.images == ("b" * 64,) and stored.attempt == 2
    assert not await store.finish_attempt(done, ["tg"])  # once only
    assert await store.claim_job(job.id, "host-c", 30.0, T0 + 1_000) is None
    assert [(d.platform, d.state) for d in await store.deliveries(job.id)] == [
        ("tg", DeliveryState.PENDING),
        ("dc", DeliveryState.PENDING),
    ]


async def test_release_requeues_with_the_same_attempt(store, make_job) -> None:
    job = make_job(created_at=T0, meta={"tg_chat": "1"})
    await store.add_job(job)
    claimed = await store.claim_job(job.id, "host-a", 30.0, T0)
    assert claimed is not None
    await store.merge_meta(job.id, {"tg_status": "55"})
    assert await store.release_attempt(replace(claimed, progress=0.0))
    queued = await store.get_job(job.id)
    assert queued is not None and queued.status == JobStatus.QUEUED and queued.attempt == 1
    assert queued.meta == {"tg_chat": "1", "tg_status": "55"}
    assert await store.recoverable_ids(T0) == [job.id]
    again = await store.claim_job(job.id, "host-b", 30.0, T0 + 1)
    assert again is not None and again.attempt == 2
    # a queued job cancelled with its current attempt is fenced against a worker that just claimed it
    other = make_job(created_at=T0)
    await store.add_job(other)
    assert await store.claim_job(other.id, "host-a", 30.0, T0) is not None
    assert not await store.finish_attempt(replace(other, status=JobStatus.CANCELLED))


async def test_claims_race_between_processes(store_backend: Backend, make_job) -> None:
    stores = [await store_backend.open(), await store_backend.open()]
    try:
        jobs = [make_job(created_at=T0) for _ in range(10)]
        for job in jobs:
            await stores[0].add_job(job)
        claims = await asyncio.gather(
            *(stores[i % 2].claim_job(job.id, f"host-{i % 2}", 30.0, T0) for i in range(2) for job in jobs)
        )
        assert sorted(c.id for c in claims if c is not None) == sorted(job.id for job in jobs)
    finally:
        for store in stores:
            await store.close()


async def test_outbox_claims_sends_once_and_retries(store, make_job) -> None:
    job = make_job(chat="tg:-100", created_at=T0)
    await store.add_job(job)
    claimed = await store.claim_job(job.id, "host-a", 30.0, T0)
    assert claimed is not None
    assert await store.finish_attempt(replace(claimed, status=JobStatus.DONE, finished_at=T0 + 1), ["tg"])
    assert await store.claim_deliveries("dc", "bot-1", 10.0, T0 + 2) == []
    [delivery] = await store.claim_deliveries("tg", "bot-1", 10.0, T0 + 2)
    assert delivery.job_id == job.id and delivery.claimed_by == "bot-1"
    assert await store.claim_deliveries("tg", "bot-2", 10.0, T0 + 3) == []  # claimed
    # the send failed: back off, then another process takes it
    assert await store.retry_delivery(delivery.id, "bot-1", "network", T0 + 20, 3) == DeliveryState.PENDING
    assert await store.claim_deliveries("tg", "bot-2", 10.0, T0 + 10) == []  # not due yet
    [again] = await store.claim_deliveries("tg", "bot-2", 10.0, T0 + 20)
    assert again.attempts == 1 and again.error == "network"
    # bot-2's claim expires while it posts; bot-3 claims; bot-2's late mark is refused
    [third] = await store.claim_deliveries("tg", "bot-3", 10.0, T0 + 31)
    assert not await store.mark_delivered(again.id, "bot-2", "m-1", T0 + 32)
    assert await store.mark_delivered(third.id, "bot-3", "m-2", T0 + 33)
    assert not await store.mark_delivered(third.id, "bot-3", "m-3", T0 + 34)
    assert await store.claim_deliveries("tg", "bot-4", 10.0, T0 + 1_000) == []
    [sent] = await store.deliveries(job.id)
    assert (sent.state, sent.message_id, sent.sent_at) == (DeliveryState.SENT, "m-2", T0 + 33)


async def test_outbox_gives_up_after_max_attempts(store, make_job) -> None:
    job = make_job(chat="dc:5", created_at=T0)
    await store.add_job(job)
    claimed = await store.claim_job(job.id, "w", 30.0, T0)
    assert claimed is not None
    failed = replace(claimed, status=JobStatus.FAILED, error="x", finished_at=T0 + 1)
    assert await store.finish_attempt(failed, ["dc"])
    states = []
    for attempt in range(3):
        [delivery] = await store.claim_deliveries("dc", "bot", 5.0, T0 + 100 * (attempt + 1))
        states.append(await store.retry_delivery(delivery.id, "bot", "403", T0 + 100 * (attempt + 2) - 1, 3))
    assert states == [DeliveryState.PENDING, DeliveryState.PENDING, DeliveryState.DEAD]
    assert await store.claim_deliveries("dc", "bot", 5.0, T0 + 10_000) == []
    assert await store.retry_delivery(1, "someone-else", "x", T0, 3) is None


async def test_named_lock_is_exclusive_between_processes(store_backend: Backend) -> None:
    stores = [await store_backend.open(), await store_backend.open()]
    order: list[str] = []

    async def edit(store, who: str) -> None:  # type: ignore[no-untyped-def]
        async with store.lock("story:tg:-100"):
            order.append(f"{who} in")
            await asyncio.sleep(0.1)
            order.append(f"{who} out")

    try:
        await asyncio.gather(edit(stores[0], "a"), edit(stores[1], "b"), edit(stores[0], "c"))
        assert [entry.split()[1] for entry in order] == ["in", "out"] * 3
        async with stores[0].lock("story:one"), stores[1].lock("story:other"):
            pass  # different names do not wait for each other
    finally:
        for store in stores:
            await store.close()


async def test_discard_only_removes_a_job_that_never_ran(store, make_job) -> None:
    fresh, started = make_job(created_at=T0), make_job(created_at=T0)
    for job in (fresh, started):
        assert (await _admit(store, job, quota=10, pending=10)).admitted
    assert await store.claim_job(started.id, "w", 30.0, T0) is not None
    assert await store.discard_job(fresh.id)
    assert await store.get_job(fresh.id) is None
    assert await store.images_today("web:alice", now=T0) == 1
    assert not await store.discard_job(started.id)
    assert not await store.discard_job(fresh.id)
    assert await store.get_job(started.id) is not None


async def test_settings_updates_from_two_processes_keep_every_key(store_backend: Backend) -> None:
    stores = [await store_backend.open(), await store_backend.open()]
    try:
        await asyncio.gather(
            *(stores[i % 2].update_settings("chat:web:room1", {f"key{i}": i}) for i in range(40))
        )
        assert await stores[0].get_settings("chat:web:room1") == {f"key{i}": i for i in range(40)}
    finally:
        for store in stores:
            await store.close()


async def test_processes_opening_a_new_sqlite_file_at_once_migrate_it_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from core.storage.sqlite import SqliteStore

    db = tmp_path / "new.sqlite3"
    stores = await asyncio.gather(*(SqliteStore.open(db) for _ in range(6)))
    for store in stores:
        await store.close()
    reopened = await SqliteStore.open(db)
    await reopened.close()
