"""PostgreSQL-only behaviour of PostgresStore on a real server (the shared contract is in test_store.py):
opening and its errors, the migration lock, choosing the store from the settings, lost connections."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("asyncpg", reason="needs asyncpg (pip install 'huahua[postgres]')")

import asyncpg

from core.app import open_store
from core.errors import ServiceUnavailable, StorageError
from core.logs import RedactSecrets, secret_values
from core.settings import Settings
from core.storage.migrations import MIGRATIONS
from core.storage.pg_migrations import PG_MIGRATIONS
from core.storage.postgres import PostgresStore
from core.storage.sqlite import SqliteStore
from tests.pg_server import PASSWORD, PgCluster


def test_both_migration_lists_have_the_same_versions() -> None:
    assert [m.version for m in PG_MIGRATIONS] == [m.version for m in MIGRATIONS]


async def _scalar(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_processes_starting_at_once_migrate_once(pg_url: str) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(pg_url, pool_size=1) for _ in range(6)))
    for store in stores:
        await store.close()
    assert await _scalar(pg_url, "SELECT COUNT(*) FROM schema_version") == len(PG_MIGRATIONS)


async def test_wrong_password_is_one_sentence_without_the_password(pg_cluster: PgCluster) -> None:
    url = pg_cluster.url("postgres", password="Not-The-Right-One-42")
    with pytest.raises(StorageError) as caught:
        await PostgresStore.open(url)
    message = str(caught.value)
    assert "refused the login of user 'huahua'" in message
    assert f"127.0.0.1:{pg_cluster.port}/postgres" in message
    assert "Not-The-Right-One-42" not in message and PASSWORD not in message
    assert caught.value.__cause__ is None  # the driver's error (with its details) is not chained


async def test_missing_database_and_unreachable_server(pg_cluster: PgCluster) -> None:
    with pytest.raises(StorageError, match="has no such database"):
        await PostgresStore.open(pg_cluster.url("nowhere"))
    closed_port = pg_cluster.port + 1 if pg_cluster.port < 65535 else pg_cluster.port - 1
    url = f"postgresql://huahua:{PASSWORD}@127.0.0.1:{closed_port}/postgres"
    with pytest.raises(
        StorageError, match=rf"Cannot reach PostgreSQL at 127.0.0.1:{closed_port}/postgres"
    ) as e:
        await PostgresStore.open(url, connect_timeout_s=3.0)
    assert PASSWORD not in str(e.value)


@pytest.mark.parametrize(
    "url",
    ["mysql://huahua:Secret-99@db/huahua", "huahua:Secret-99@db", "postgresql://huahua:Secret-99@db:port/x"],
)
async def test_a_url_that_is_not_postgresql_is_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="HUAHUA_DATABASE_URL") as caught:
        await open_store(Settings(database_url=url, data_dir=tmp_path))
    assert "Secret-99" not in str(caught.value)


async def test_settings_choose_the_store(pg_url: str, tmp_path: Path, make_job) -> None:
    embedded = await open_store(Settings(data_dir=tmp_path, database_url=""))
    assert isinstance(embedded, SqliteStore)
    await embedded.close()
    assert (tmp_path / "huahua.sqlite3").exists()
    shared_url = pg_url.replace("postgresql://", "postgres://")
    stores = [
        await open_store(Settings(data_dir=tmp_path / str(i), database_url=shared_url)) for i in range(2)
    ]
    try:
        assert all(isinstance(store, PostgresStore) for store in stores)
        job = make_job()
        await stores[0].add_job(job)
        assert await stores[1].get_job(job.id) == job  # one database, whatever the data dir
    finally:
        for store in stores:
            await store.close()


def test_the_database_password_never_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(database_url="postgresql://huahua:p%40ss-W0rd@db.example:5432/huahua")
    redact = RedactSecrets(secret_values(settings))
    logger = logging.getLogger("test.redaction")
    logger.addFilter(redact)
    try:
        with caplog.at_level(logging.INFO, logger="test.redaction"):
            logger.info("connecting with %s", settings.database_url.get_secret_value())  # type: ignore[union-attr]
            logger.info("driver said: password p@ss-W0rd rejected")
            logger.info("raw %s", "p%40ss-W0rd")
    finally:
        logger.removeFilter(redact)
    text = caplog.text
    assert "W0rd" not in text
    assert text.count("***") == 3
    assert "p@ss" not in repr(settings) and "W0rd" not in repr(settings)


async def test_concurrent_settings_and_meta_from_two_processes(pg_url: str, make_job) -> None:
    """Read-modify-write operations hold their lock across processes: no key is lost."""
    stores = [await PostgresStore.open(pg_url, pool_size=5), await PostgresStore.open(pg_url, pool_size=5)]
    try:
        await asyncio.gather(
            *(stores[i % 2].update_settings("chat:web:room1", {f"k{i}": i}) for i in range(40))
        )
        assert await stores[0].get_settings("chat:web:room1") == {f"k{i}": i for i in range(40)}
        job = make_job()
        await stores[0].add_job(job)
        await asyncio.gather(
            *(stores[i % 2].merge_meta(job.id, {f"m{i}": str(i)}) for i in range(30)),
            stores[1].update_job(replace(job, progress=0.5)),
        )
        stored = await stores[1].get_job(job.id)
        assert stored is not None and stored.meta == {f"m{i}": str(i) for i in range(30)}
    finally:
        for store in stores:
            await store.close()


async def test_a_lost_connection_is_service_unavailable_then_recovers(pg_url: str, make_job) -> None:
    """The server ends the pooled connection (as a restart would): the next call either meets a fresh
    connection or fails with ServiceUnavailable (asyncpg may not have noticed yet), never with a driver
    error, and the call after it works."""
    store = await PostgresStore.open(pg_url, pool_size=1)
    database = pg_url.rsplit("/", 1)[1]
    outcomes = []
    try:
        job = make_job()
        await store.add_job(job)
        for _ in range(5):
            killer = await asyncpg.connect(pg_url)
            try:
                killed = await killer.fetchval(
                    "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    database,
                )
            finally:
                await killer.close()
            assert killed == 1
            try:
                outcomes.append(await store.get_job(job.id) == job)
            except ServiceUnavailable as err:
                assert "cannot be reached" in str(err)
                outcomes.append("unavailable")
            assert await store.get_job(job.id) == job
    finally:
        await store.close()
    assert all(outcome in (True, "unavailable") for outcome in outcomes), outcomes


async def test_the_service_runs_a_job_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    """build_service with HUAHUA_DATABASE_URL: the job is admitted, run and finished in PostgreSQL."""
    from core.types import EventType, JobStatus
    from tests.support import PatternEngine, make_service

    service = await make_service(tmp_path, engine=PatternEngine(), database_url=pg_url)
    try:
        reply = await service.handle_message("web:room", "web:ann", "/imagine 一只猫 --seed 3")
        assert reply.job is not None
        events = [event async for event in service.subscribe(reply.job.id)]
        assert events[-1].type == EventType.DONE
    finally:
        await service.stop()
    store = await PostgresStore.open(pg_url)
    try:
        job = await store.get_job(reply.job.id)
        assert job is not None and job.status == JobStatus.DONE and job.attempt == 1 and len(job.images) == 1
        assert await store.images_today("web:ann", now=job.created_at) == 1
    finally:
        await store.close()
    assert not (tmp_path / "data" / "huahua.sqlite3").exists()
