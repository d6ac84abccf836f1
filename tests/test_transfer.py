"""`huahua db migrate-to URL`: a real SQLite store copied into a real PostgreSQL database, twice."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("asyncpg", reason="needs asyncpg (pip install 'huahua[postgres]')")

from bots.cli import main
from core.storage.postgres import PostgresStore
from core.storage.sqlite import SqliteStore
from core.types import DeliveryState, JobStatus
from tests.pg_server import PASSWORD

T0 = 1_700_000_000.0


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No .env or HUAHUA_* variables from the developer's shell; the root logger as it was."""
    monkeypatch.chdir(tmp_path)
    for name in ("HUAHUA_DATABASE_URL", "HUAHUA_DATA_DIR", "HUAHUA_IMAGE_STORE", "HUAHUA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


async def _fill(db: Path, make_job) -> dict[str, object]:
    store = await SqliteStore.open(db)
    try:
        done = make_job(chat="tg:-100", created_at=T0)
        await store.add_job(done)
        claimed = await store.claim_job(done.id, "host-a", 30.0, T0)
        assert claimed is not None
        finished = replace(claimed, status=JobStatus.DONE, images=("a" * 64,), finished_at=T0 + 5)
        assert await store.finish_attempt(finished, ["tg"])
        running = make_job(created_at=T0 + 1)
        await store.add_job(running)
        assert await store.claim_job(running.id, "host-a", 30.0, T0 + 1) is not None
        for i in range(3):
            await store.add_job(make_job(chat="web:room2", created_at=T0 + 10 + i))
        await store.update_settings("chat:tg:-100", {"style": "水墨", "steps": 30})
        await store.save_story("s1", "tg:-100", False, {"id": "s1", "title": "旧"})
        await store.save_story("s2", "tg:-100", True, {"id": "s2", "title": "月亮"})
        await store.incr_counter("jobs_done", 7)
        return {
            "jobs": [await store.get_job(done.id), await store.get_job(running.id)],
            "recent": await store.recent_jobs("web:room2"),
        }
    finally:
        await store.close()


def _migrate(data_dir: Path, url: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["--data-dir", str(data_dir), "db", "migrate-to", url]) == 0
    return capsys.readouterr().out


def test_migrate_to_copies_everything_once(pg_url: str, tmp_path: Path, make_job, capsys) -> None:
    data_dir = tmp_path / "data"
    source = asyncio.run(_fill(data_dir / "huahua.sqlite3", make_job))

    out = _migrate(data_dir, pg_url, capsys)
    assert "jobs: 5 copied, 5 new" in out
    assert "settings: 1 copied, 1 new" in out
    assert "stories: 2 copied, 2 new" in out
    assert "counters: 1 copied, 1 new" in out
    assert "deliveries: 1 copied, 1 new" in out
    assert "Pictures were not copied" in out and "image store" in out
    assert PASSWORD not in out

    again = _migrate(data_dir, pg_url, capsys)
    assert "jobs: 5 copied, 0 new" in again and "stories: 2 copied, 0 new" in again
    assert "counters: 1 copied, 0 new" in again and "deliveries: 1 copied, 0 new" in again

    async def check() -> None:
        store = await PostgresStore.open(pg_url)
        try:
            done, running = source["jobs"]  # type: ignore[misc]
            assert await store.get_job(done.id) == done
            assert await store.get_job(running.id) == running
            assert await store.recent_jobs("web:room2") == source["recent"]
            assert await store.get_settings("chat:tg:-100") == {"style": "水墨", "steps": 30}
            assert await store.active_story("tg:-100") == {"id": "s2", "title": "月亮"}
            assert await store.get_story("s1") == {"id": "s1", "title": "旧"}
            assert await store.counters() == {"jobs_done": 7}  # not 14 after two copies
            [delivery] = await store.deliveries(done.id)
            assert (delivery.platform, delivery.state) == ("tg", DeliveryState.PENDING)
            assert delivery.claimed_by is None
            # the running job's lease stayed behind: it is recoverable at once, with the queued ones
            queued = [job.id for job in reversed(source["recent"])]  # type: ignore[call-overload]
            assert await store.recoverable_ids(T0 + 2) == [running.id, *queued]
            # the target works as a store: its ids continue after the copied rows
            [claimed] = await store.claim_deliveries("tg", "bot", 10.0, T0 + 100)
            assert claimed.id == delivery.id
        finally:
            await store.close()

    asyncio.run(check())


def test_a_second_copy_follows_a_changed_source(pg_url: str, tmp_path: Path, make_job, capsys) -> None:
    """The source ended its active story and began another: the copy swaps them without a conflict."""
    data_dir = tmp_path / "data"
    db = data_dir / "huahua.sqlite3"
    asyncio.run(_fill(db, make_job))
    _migrate(data_dir, pg_url, capsys)

    async def change() -> None:
        store = await SqliteStore.open(db)
        await store.save_story("s2", "tg:-100", False, {"id": "s2", "ended": True})
        await store.save_story("s3", "tg:-100", True, {"id": "s3"})
        await store.update_settings("chat:tg:-100", {"steps": None})
        await store.close()

    asyncio.run(change())
    out = _migrate(data_dir, pg_url, capsys)
    assert "stories: 3 copied, 1 new" in out

    async def check() -> None:
        store = await PostgresStore.open(pg_url)
        try:
            assert await store.active_story("tg:-100") == {"id": "s3"}
            assert await store.get_settings("chat:tg:-100") == {"style": "水墨"}
        finally:
            await store.close()

    asyncio.run(check())


def test_migrate_to_reads_the_url_from_stdin_and_refuses_its_own_database(
    pg_url: str, tmp_path: Path, make_job, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    asyncio.run(_fill(data_dir / "huahua.sqlite3", make_job))
    monkeypatch.setattr("sys.stdin", io.StringIO(pg_url + "\n"))
    assert "jobs: 5 copied, 5 new" in _migrate(data_dir, "-", capsys)

    monkeypatch.setenv("HUAHUA_DATABASE_URL", pg_url)
    assert main(["db", "migrate-to", pg_url.replace("postgresql://", "postgres://")]) == 1
    err = capsys.readouterr().err
    assert "is already the database Huahua uses" in err and PASSWORD not in err

    assert main(["db", "migrate-to", "sqlite:///elsewhere.db"]) == 1
    assert "must start with postgresql://" in capsys.readouterr().err
