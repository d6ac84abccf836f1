from __future__ import annotations

import asyncio
import calendar
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from core.errors import InvalidOption, NotFound, StorageError
from core.storage import migrations
from core.storage.images import PNG_SIGNATURE
from core.storage.migrations import MIGRATIONS, Migration, latest_version
from core.storage.sqlite import SqliteStore
from core.types import GenerationRequest, JobStatus

PNG = PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR fake but signed"


@pytest.fixture
async def store(tmp_path: Path):
    opened = await SqliteStore.open(tmp_path / "db" / "huahua.sqlite3")
    yield opened
    await opened.close()


def _version(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])


async def test_open_creates_dirs_wal_and_latest_schema(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b" / "h.sqlite3"
    store = await SqliteStore.open(db)
    await store.close()
    assert _version(db) == latest_version() >= 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "settings", "counters", "schema_version"} <= tables


async def test_reopen_keeps_data_and_does_not_reapply(tmp_path: Path, make_job) -> None:
    db = tmp_path / "h.sqlite3"
    store = await SqliteStore.open(db)
    job = make_job()
    await store.add_job(job)
    await store.incr_counter("jobs_done", 3)
    await store.close()
    store = await SqliteStore.open(db)
    assert await store.get_job(job.id) == job
    assert await store.counters() == {"jobs_done": 3}
    await store.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == len(MIGRATIONS)


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    await (await SqliteStore.open(db)).close()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (latest_version() + 1,))
    with pytest.raises(StorageError, match="upgrade Huahua"):
        await SqliteStore.open(db)


async def test_new_migration_is_applied_to_an_existing_db(tmp_path: Path, monkeypatch, make_job) -> None:
    db = tmp_path / "h.sqlite3"
    store = await SqliteStore.open(db)
    await store.add_job(make_job())
    await store.close()
    extra = Migration(
        latest_version() + 1, "CREATE TABLE bookmarks (id TEXT PRIMARY KEY, title TEXT NOT NULL);"
    )
    monkeypatch.setattr(migrations, "MIGRATIONS", (*MIGRATIONS, extra))
    await (await SqliteStore.open(db)).close()
    assert _version(db) == extra.version
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO bookmarks VALUES ('s1', 't')")
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1


async def test_failing_migration_rolls_back(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    await (await SqliteStore.open(db)).close()
    broken = (
        *MIGRATIONS,
        Migration(latest_version() + 1, "CREATE TABLE half (x INTEGER); INSERT INTO nowhere VALUES (1);"),
    )
    with pytest.raises(StorageError, match="schema from version"):
        await SqliteStore.open(db, migrations=broken)
    assert _version(db) == latest_version()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name='half'").fetchone() is None


async def test_corrupt_database_file_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="corrupt"):
        await SqliteStore.open(db)


async def test_job_round_trip_update_and_recent(store: SqliteStore, make_job) -> None:
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


async def test_unfinished_jobs_survive_restart(tmp_path: Path, make_job) -> None:
    db = tmp_path / "h.sqlite3"
    store = await SqliteStore.open(db)
    queued = make_job(created_at=30.0)
    running = make_job(created_at=10.0, status=JobStatus.RUNNING, started_at=11.0)
    for status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED):
        await store.add_job(make_job(created_at=5.0, status=status))
    await store.add_job(queued)
    await store.add_job(running)
    await store.close()
    store = await SqliteStore.open(db)
    assert await store.unfinished_jobs() == [running, queued]
    await store.close()


async def test_settings_merge_and_delete(store: SqliteStore) -> None:
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


async def test_quota_counts_today_only_and_skips_failed(store: SqliteStore, make_job) -> None:
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


async def test_counters(store: SqliteStore) -> None:
    assert await store.counters() == {}
    await store.incr_counter("blocked")
    await store.incr_counter("blocked")
    await store.incr_counter("jobs_done", 5)
    await asyncio.gather(*(store.incr_counter("quota_refused") for _ in range(50)))
    assert await store.counters() == {"blocked": 2, "jobs_done": 5, "quota_refused": 50}
    with pytest.raises(InvalidOption):
        await store.incr_counter("blocked", 1.5)  # type: ignore[arg-type]


async def test_thousand_concurrent_add_job(store: SqliteStore, make_job) -> None:
    jobs = [make_job(user=f"web:u{i % 37}", created_at=float(i)) for i in range(1000)]
    await asyncio.gather(*(store.add_job(job) for job in jobs))
    unfinished = await store.unfinished_jobs()
    assert [job.id for job in unfinished] == [job.id for job in jobs]


async def test_merged_meta_survives_a_stale_full_update(tmp_path: Path, make_job) -> None:
    store = await SqliteStore.open(tmp_path / "h.sqlite3")
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


async def test_stories_one_active_per_chat(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    store = await SqliteStore.open(db)
    await store.save_story("s1", "tg:1", True, {"id": "s1", "title": "月亮"})
    with pytest.raises(InvalidOption, match="already has an active story"):
        await store.save_story("s2", "tg:1", True, {"id": "s2"})
    await store.save_story("s1", "tg:1", False, {"id": "s1", "title": "月亮", "ended": True})
    await store.save_story("s2", "tg:1", True, {"id": "s2"})
    await store.close()
    store = await SqliteStore.open(db)
    try:
        assert (await store.active_story("tg:1")) == {"id": "s2"}
        assert (await store.get_story("s1")) == {"id": "s1", "title": "月亮", "ended": True}
        assert await store.get_story("missing") is None
        assert await store.active_story("tg:2") is None
    finally:
        await store.close()
