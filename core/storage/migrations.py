"""Versioned SQLite schema: an ordered list of migrations, applied in one transaction at open.

To change the schema, append a `Migration(next_version, sql)` to `MIGRATIONS`; never edit one that
has shipped. Opening a database written by a newer Huahua (a version above the last one here) fails
with a StorageError instead of guessing.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass

import aiosqlite

from core.errors import StorageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            user TEXT NOT NULL,
            chat TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            n INTEGER NOT NULL,
            data TEXT NOT NULL
        );
        CREATE INDEX jobs_status_created ON jobs (status, created_at);
        CREATE INDEX jobs_chat_created ON jobs (chat, created_at);
        CREATE INDEX jobs_user_created ON jobs (user, created_at);
        CREATE TABLE settings (
            scope TEXT PRIMARY KEY,
            data TEXT NOT NULL
        );
        CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        );
        """,
    ),
    Migration(
        2,
        """
        CREATE TABLE stories (
            id TEXT PRIMARY KEY,
            chat TEXT NOT NULL,
            active INTEGER NOT NULL,
            updated_at REAL NOT NULL,
            data TEXT NOT NULL
        );
        CREATE UNIQUE INDEX stories_one_active_per_chat ON stories (chat) WHERE active = 1;
        """,
    ),
    Migration(
        3,
        """
        ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
        ALTER TABLE jobs ADD COLUMN lease_until REAL;
        CREATE INDEX jobs_user_status ON jobs (user, status);
        CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            platform TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL,
            claimed_by TEXT,
            claim_until REAL,
            message_id TEXT,
            error TEXT,
            created_at REAL NOT NULL,
            sent_at REAL,
            UNIQUE (job_id, platform)
        );
        CREATE INDEX deliveries_due ON deliveries (platform, state, next_at);
        ALTER TABLE stories ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
        """,
    ),
)


def latest_version(migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    return migrations[-1].version if migrations else 0


async def current_version(conn: aiosqlite.Connection) -> int:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    async with conn.execute("SELECT MAX(version) FROM schema_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def migrate(conn: aiosqlite.Connection, migrations: tuple[Migration, ...] | None = None) -> int:
    """Bring the schema up to the last migration; returns the version now in force.

    The connection must be in autocommit mode (`isolation_level=None`): this function opens and
    commits (or rolls back) its own transaction, taken before the version is read, so processes
    opening a new database at once apply each migration exactly once. `migrations` defaults to
    `MIGRATIONS`; their statements are split at semicolons (keep semicolons out of SQL literals).
    """
    migrations = MIGRATIONS if migrations is None else migrations
    check_order(migrations)
    target = latest_version(migrations)
    version = 0
    try:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            version = await current_version(conn)
            if version > target:
                raise StorageError(
                    f"The database uses schema version {version} but this Huahua only knows up to "
                    f"{target}; please upgrade Huahua."
                )
            now = time.time()
            for migration in migrations:
                if migration.version <= version:
                    continue
                for statement in migration.sql.split(";"):
                    if statement.strip():
                        await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (migration.version, now)
                )
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")
    except sqlite3.Error as err:
        raise StorageError(f"Updating the database schema from version {version} failed ({err}).") from err
    if version < target:
        logger.info("database schema migrated from version %d to %d", version, target)
    return max(version, target)


def check_order(migrations: tuple[Migration, ...]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 1, 2, 3, ... in order, got {versions}")
