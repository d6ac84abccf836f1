"""`huahua db migrate-to URL`: copy the current store's rows into a PostgreSQL database.

Jobs, settings, stories, counters and the delivery outbox are read in batches from the source (any
store with `export_rows`: SQLite or PostgreSQL) and upserted into the target (its schema migrated
first) in one transaction, so a copy is all or nothing and running it again changes nothing and adds
nothing. Leases and delivery claims are not copied: after the move, running jobs are recovered and
pending deliveries claimed afresh. Pictures stay in the image store.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from core.errors import StorageError
from core.settings import Settings
from core.storage.postgres import PostgresImport, PostgresStore, parse_database_url
from core.storage.store import Store

logger = logging.getLogger(__name__)

# Plain SQL that both SQLite and PostgreSQL read the same way ("user" is quoted for PostgreSQL).
JOBS_SQL = 'SELECT id, "user", chat, status, created_at, n, attempt, data FROM jobs ORDER BY created_at, id'
SETTINGS_SQL = "SELECT scope, data FROM settings ORDER BY scope"
# Ended stories first, so a chat's active story never meets the one it replaced still active.
STORIES_SQL = "SELECT id, chat, active, updated_at, version, data FROM stories ORDER BY active, id"
COUNTERS_SQL = "SELECT name, value FROM counters ORDER BY name"
DELIVERIES_SQL = (
    "SELECT job_id, platform, state, attempts, next_at, message_id, error, created_at, sent_at "
    "FROM deliveries ORDER BY id"
)


@runtime_checkable
class Exportable(Protocol):
    def export_rows(self, sql: str, batch_size: int = 500) -> AsyncIterator[list[tuple[Any, ...]]]: ...


@dataclass(frozen=True)
class Copied:
    """Rows of one table: how many were copied and how many of them the target did not have."""

    table: str
    copied: int
    new: int


async def copy_store(source: Exportable, target: PostgresStore, batch_size: int = 500) -> list[Copied]:
    """Upsert every row of `source` into `target` in one transaction; the counts per table."""
    steps = (
        ("jobs", JOBS_SQL, PostgresImport.jobs),
        ("settings", SETTINGS_SQL, PostgresImport.settings),
        ("stories", STORIES_SQL, PostgresImport.stories),
        ("counters", COUNTERS_SQL, PostgresImport.counters),
        ("deliveries", DELIVERIES_SQL, PostgresImport.deliveries),
    )
    report = []
    async with target.importer() as importer:
        for table, sql, upsert in steps:
            copied = new = 0
            async for rows in source.export_rows(sql, batch_size):
                added = await upsert(importer, rows)
                copied, new = copied + len(rows), new + added
            report.append(Copied(table, copied, new))
            logger.info("copied %d %s (%d new)", copied, table, new)
    return report


async def migrate_to(source: Store, url: str, settings: Settings) -> list[str]:
    """Copy `source` (the store `settings` name) into the PostgreSQL database at `url`; lines to print."""
    target_url = parse_database_url(url)
    if settings.database_url is not None:
        current = parse_database_url(settings.database_url.get_secret_value())
        if current.where == target_url.where:
            raise StorageError(f"PostgreSQL at {current.where} is already the database Huahua uses.")
        origin = f"PostgreSQL at {current.where}"
    else:
        origin = f"SQLite {settings.database_path}"
    if not isinstance(source, Exportable):
        raise StorageError(f"The current store ({type(source).__name__}) cannot be copied.")
    target = await PostgresStore.open(url, pool_size=2)
    try:
        report = await copy_store(source, target)
    finally:
        await target.close()
    lines = [f"Copied {origin} into PostgreSQL at {target_url.where}:"]
    lines += [f"  {item.table}: {item.copied} copied, {item.new} new" for item in report]
    lines.append(
        "Pictures were not copied: they stay in the image store (HUAHUA_IMAGE_STORE), which every "
        "process must share. Set HUAHUA_DATABASE_URL to the new database to use it."
    )
    return lines
