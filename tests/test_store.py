"""The Store contract, run against every implementation (the `store_backend` fixture: SQLite and a real
PostgreSQL server); SQLite-only behaviour (WAL, a corrupt file) at the end."""

from __future__ import annotations

import asyncio
import calendar
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from core.errors import InvalidOption, NotFound, StorageError
from core.storage.images import PNG_SIGNATURE
from core.storage.migrations import Migration, latest_version
from core.storage.sqlite import SqliteStore
from core.storage.store import Store
from core.types import GenerationRequest, JobStatus
from tests.store_backends import Backend

PNG = PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR fake but signed"


@pytest.fixture
async def store(store_backend: Backend):
    opened = await store_backend.open()
    yield opened
    await opened.close()


async def _version(backend: Backend) -> int:
    return int(await backend.scalar("SELECT MAX(version) FROM schema_version"))


async def test_open_creates_the_latest_schema(store_backend: Backend) -> None:
    await (await store_backend.open()).close()
    assert await _version(store_backend) == latest_version(store_backend.migrations) >= 1
    tables = await store_backend.tables()
    assert {"jobs", "settings", "counters", "stories", "schema_version"} <= tables


async def test_reopen_keeps_data_and_does_not_reapply(store_backend: Backend, make_job) -> None:
    store = await store_backend.open()
    job = make_job()
    await store.add_job(job)
    await store.incr_counter("jobs_done", 3)
    await store.close()
    store = await store_backend.open()
    assert await store.get_job(job.id) == job
    assert await store.counters() == {"jobs_done": 3}
    await store.close()
    assert await store_backend.scalar("SELECT COUNT(*) FROM schema_version") == len(store_backend.migrations)


async def test_newer_schema_is_refused(store_backend: Backend) -> None:
    await (await store_backend.open()).close()
    newer = latest_version(store_backend.migrations) + 1
    await store_backend.execute(f"INSERT INTO schema_version VALUES ({newer}, 0)")
    with pytest.raises(StorageError, match="upgrade Huahua"):
        await store_backend.open()


async def test_new_migration_is_applied_to_an_existing_db(store_backend: Backend, make_job) -> None:
    store = await store_backend.open()
    await store.add_job(make_job())
    await store.close()
    extra = Migration(
        latest_version(store_backend.migrations) + 1,
        "CREATE TABLE bookmarks (id TEXT PRIMARY KEY, title TEXT NOT NULL);",
    )
    await (await store_backend.open(migrations=(*store_backend.migrations, extra))).close()
    assert await _version(store_backend) == extra.version
    await store_backend.execute("INSERT INTO bookmarks VALUES ('s1', 't')")
    assert await store_backend.scalar("SELECT COUNT(*) FROM jobs") == 1


async def test_failing_migration_rolls_back(store_backend: Backend) -> None:
    await (await store_backend.open()).close()
    broken = (
        *store_backend.migrations,
        Migration(
            latest_version(store_backend.migrations) + 1,
            "CREATE TABLE half (x INTEGER); INSERT INTO nowhere VALUES (1);",
        ),
    )
    with pytest.raises(StorageError, match="schema from version"):
        await store_backend.open(migrations=broken)
    assert await _version(store_backend) == latest_version(store_backend.migrations)
    assert "half" not in await store_backend.tables()


async def test_job_round_trip_update_and_recent(store: Store, make_job) -> None:
    request = GenerationRequest(prompt="猫", n=2, init_image=PNG, strength=0.5)
    job = make_job(request=request, init_image="d" * 64, meta={"k": "v"})
    await store.add_job(job)
    stored = await store.get_job(job.id)
    assert stored == replace(job, request=replace(request, init_image=None))
    done = replace(job, status=JobStatus.DONE, images=("e" * 64,), progress=1.0, finished_at=5.0)
    await store.update_job(done)
    assert (await store.get_job(job.id)).images == ("e" * 64,)
    assert await store.get_job("nope") is None
    with pytest.raises(StorageError, match="already exists"):
        await store.add_job(job)
    with pytest.raises(NotFound):
        await store.update_job(make_job())

    for i in range(5):
        await store.add_job(make_job(chat="web:other", created_at=100.0 + i))
    recent = await store.recent_jobs("web:other", limit=3)
    assert [j.created_at for j in recent] == [104.0, 103.0, 102.0]
    assert await store.recent_jobs("web:nobody") == []
    with pytest.raises(InvalidOption):
        await store.recent_jobs("web:other", limit=-1)


async def test_unfinished_jobs_survive_restart(store_backend: Backend, make_job) -> None:
    store = await store_backend.open()
    queued = make_job(created_at=30.0)
    running = make_job(created_at=10.0, status=JobStatus.RUNNING, started_at=11.0)
    for status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED):
        await store.add_job(make_job(created_at=5.0, status=status))
    await store.add_job(queued)
    await store.add_job(running)
    await store.close()
    store = await store_backend.open()
    assert await store.unfinished_jobs() == [running, queued]
    await store.close()


async def test_settings_merge_and_delete(store: Store) -> None:
    assert await store.get_settings("chat:web:room1") == {}
    assert await store.update_settings("chat:web:room1", {"style": "水墨", "steps": 30}) == {
        "style": "水墨",
        "steps": 30,
    }
    assert await store.update_settings("chat:web:room1", {"steps": None, "quota": 5}) == {
        "style": "水墨",
        "quota": 5,
    }
    assert await store.get_settings("chat:web:room1") == {"style": "水墨", "quota": 5}
    assert await store.get_settings("user:tg:42") == {}
    assert await store.update_settings("chat:web:room1", {"style": None, "quota": None}) == {}
    assert await store.get_settings("chat:web:room1") == {}
    with pytest.raises(InvalidOption):
        await store.update_settings("chat:x", {"blob": b"bytes"})
    with pytest.raises(InvalidOption):
        await store.update_settings("chat:x", {"nan": float("nan")})
    assert await store.get_settings("chat:x") == {}


async def test_quota_counts_today_only_and_skips_failed(store: Store, make_job) -> None:
    midnight = float(calendar.timegm((2026, 3, 10, 0, 0, 0)))
    now = midnight + 15 * 3600
    cases = [
        (midnight - 1, JobStatus.DONE, 8),  # yesterday 23:59:59
        (midnight, JobStatus.DONE, 2),
        (midnight + 3600, JobStatus.QUEUED, 3),
        (midnight + 7200, JobStatus.RUNNING, 1),
        (midnight + 7300, JobStatus.FAILED, 4),
        (midnight + 7400, JobStatus.CANCELLED, 4),
    ]
    for created, status, n in cases:
        await store.add_job(make_job(created_at=created, status=status, n=n))
    await store.add_job(make_job(user="web:bob", created_at=midnight + 10, n=4))
    assert await store.images_today("web:alice", now=now) == 6
    assert await store.images_today("web:alice", now=midnight - 10) == 8
    assert await store.images_today("web:alice", now=midnight + 86_400 + 5) == 0
    assert await store.images_today("web:bob", now=now) == 4
    assert await store.images_today("web:nobody", now=now) == 0


async def test_counters(store: Store) -> None:
    assert await store.counters() == {}
    await store.incr_counter("blocked")
    await store.incr_counter("blocked")
    await store.incr_counter("jobs_done", 5)
    await asyncio.gather(*(store.incr_counter("quota_refused") for _ in range(50)))
    assert await store.counters() == {"blocked": 2, "jobs_done": 5, "quota_refused": 50}
    with pytest.raises(InvalidOption):
        await store.incr_counter("blocked", 1.5)  # type: ignore[arg-type]


async def test_thousand_concurrent_add_job(store: Store, make_job) -> None:
    jobs = [make_job(user=f"web:u{i % 37}", created_at=float(i)) for i in range(1000)]
    await asyncio.gather(*(store.add_job(job) for job in jobs))
    unfinished = await store.unfinished_jobs()
    assert [job.id for job in unfinished] == [job.id for job in jobs]


async def test_merged_meta_survives_a_stale_full_update(store_backend: Backend, make_job) -> None:
    store = await store_backend.open()
    try:
        job = make_job()
        await store.add_job(job)
        await store.merge_meta(job.id, {"tg_status": "42"})
        await store.update_job(replace(job, status=JobStatus.DONE))
        stored = await store.get_job(job.id)
        assert stored is not None and stored.status == JobStatus.DONE
        assert stored.meta["tg_status"] == "42"
        with pytest.raises(NotFound):
            await store.merge_meta("nope", {"a": "b"})
    finally:
        await store.close()


async def test_stories_one_active_per_chat(store_backend: Backend) -> None:
    store = await store_backend.open()
    await store.save_story("s1", "tg:1", True, {"id": "s1", "title": "月亮"})
    with pytest.raises(InvalidOption, match="already has an active story"):
        await store.save_story("s2", "tg:1", True, {"id": "s2"})
    await store.save_story("s1", "tg:1", False, {"id": "s1", "title": "月亮", "ended": True})
    await store.save_story("s2", "tg:1", True, {"id": "s2"})
    await store.close()
    store = await store_backend.open()
    try:
        assert (await store.active_story("tg:1")) == {"id": "s2"}
        assert (await store.get_story("s1")) == {"id": "s1", "title": "月亮", "ended": True}
        assert await store.get_story("missing") is None
        assert await store.active_story("tg:2") is None
    finally:
        await store.close()


async def test_a_named_lock_excludes_other_processes(store_backend: Backend) -> None:
    """Two stores on one database stand for two processes: one holder of a name at a time, any other
    name free meanwhile, and the lock is free again after an error inside it."""
    stores = [await store_backend.open(), await store_backend.open()]
    inside: list[int] = []
    most = 0

    async def edit(store: Store, i: int) -> None:
        nonlocal most
        async with store.lock("story:tg:1"):
            inside.append(i)
            most = max(most, len(inside))
            await asyncio.sleep(0.005)
            inside.remove(i)

    try:
        await asyncio.gather(*(edit(stores[i % 2], i) for i in range(12)))
        assert most == 1
        async with stores[0].lock("story:tg:1"):
            async with asyncio.timeout(5):
                async with stores[1].lock("story:tg:2"):
                    pass
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    async with stores[1].lock("story:tg:1"):
                        pass
        with pytest.raises(RuntimeError):
            async with stores[1].lock("story:tg:1"):
                raise RuntimeError("the edit failed")
        async with asyncio.timeout(5):
            async with stores[0].lock("story:tg:1"):
                pass
    finally:
        for store in stores:
            await store.close()


# SQLite only ----------------------------------------------------------------------------------------


async def test_sqlite_creates_dirs_and_uses_wal(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b" / "h.sqlite3"
    await (await SqliteStore.open(db)).close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_corrupt_database_file_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="corrupt"):
        await SqliteStore.open(db)
