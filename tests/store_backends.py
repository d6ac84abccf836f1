"""The stores that the contract tests run against: each opens any number of stores on one database.

`SqliteBackend` uses a file in the test's tmp dir; `PostgresBackend` a fresh database in the session's
real PostgreSQL cluster (see `pg_server.py`). Both also give raw SQL access to check what was stored.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from core.storage.migrations import MIGRATIONS, Migration
from core.storage.store import Store


class SqliteBackend:
    name = "sqlite"
    migrations = MIGRATIONS

    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self, migrations: tuple[Migration, ...] | None = None) -> Store:
        from core.storage.sqlite import SqliteStore

        return await SqliteStore.open(self.path, migrations=migrations)

    async def scalar(self, sql: str) -> Any:
        with sqlite3.connect(self.path) as conn:
            row = conn.execute(sql).fetchone()
        return row[0] if row else None

    async def execute(self, sql: str) -> None:
        with sqlite3.connect(self.path) as conn:
            conn.executescript(sql)

    async def tables(self) -> set[str]:
        with sqlite3.connect(self.path) as conn:
            return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


class PostgresBackend:
    name = "postgres"

    def __init__(self, url: str) -> None:
        from core.storage.pg_migrations import PG_MIGRATIONS

        self.url = url
        self.migrations = PG_MIGRATIONS

    async def open(self, migrations: tuple[Migration, ...] | None = None) -> Store:
        from core.storage.postgres import PostgresStore

        return await PostgresStore.open(self.url, migrations=migrations, pool_size=4)

    async def scalar(self, sql: str) -> Any:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    async def execute(self, sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def tables(self) -> set[str]:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        finally:
            await conn.close()
        return {row[0] for row in rows}


Backend = SqliteBackend | PostgresBackend
