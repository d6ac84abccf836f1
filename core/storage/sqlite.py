"""The embedded store: `Store` on one SQLite file.

`SqliteStore` keeps one aiosqlite connection (WAL, foreign keys on) and serialises every write behind
an asyncio lock, so any number of concurrent callers never see "database is locked".
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosqlite

from core.codec import job_from_json, job_to_json
from core.errors import InvalidOption, NotFound, StorageError
from core.storage.migrations import Migration, migrate
from core.storage.store import Admission, Store, check_changes, claimable, merge_settings, quota_or_pending
from core.types import Delivery, DeliveryState, Job, JobStatus

logger = logging.getLogger(__name__)

LOCK_POLL_S = 0.02
WAL_SWITCH_WAIT_S = 10.0
"""How long opening a database waits to switch it to WAL while other processes open it too."""

_DAY = 86_400.0


async def _switch_to_wal(conn: aiosqlite.Connection) -> None:
    """WAL journal mode, waiting while other processes open the same new file: the switch needs the
    file to itself and SQLite may answer "database is locked" at once there, without its busy wait."""
    deadline = time.monotonic() + WAL_SWITCH_WAIT_S
    pause = 0.01
    while True:
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() + pause > deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.5)


class SqliteStore(Store):
    def __init__(self, conn: aiosqlite.Connection, db_path: Path) -> None:
        """Use `SqliteStore.open`."""
        self._conn = conn
        self._lock_dir = db_path.parent / f"{db_path.name}.locks"
        self._named_locks: dict[str, asyncio.Lock] = {}
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, db_path: Path, *, migrations: tuple[Migration, ...] | None = None) -> SqliteStore:
        """Create the directory, open the database and migrate its schema (to `MIGRATIONS` by default)."""
        db_path = Path(db_path)
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"Cannot create the data directories: {err.strerror}.") from err
        conn = await aiosqlite.connect(db_path, isolation_level=None)
        try:
            await conn.execute("PRAGMA busy_timeout=5000")  # first: another process may hold the file
            await _switch_to_wal(conn)
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA synchronous=NORMAL")
            await migrate(conn, migrations)
        except sqlite3.DatabaseError as err:
            await conn.close()
            raise StorageError(f"The database file {db_path.name} is unreadable or corrupt ({err}).") from err
        except BaseException:
            await conn.close()
            raise
        logger.info("store opened at %s", db_path)
        return cls(conn, db_path)

    async def close(self) -> None:
        async with self._write_lock:
            await self._conn.close()

    # jobs -------------------------------------------------------------------------------------

    async def add_job(self, job: Job) -> None:
        async with self._write_lock:
            await self._insert_job(job)

    async def _insert_job(self, job: Job) -> None:
        try:
            await self._conn.execute(
                "INSERT INTO jobs (id, user, chat, status, created_at, n, attempt, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.user,
                    job.chat,
                    job.status.value,
                    job.created_at,
                    job.request.n,
                    job.attempt,
                    job_to_json(job),
                ),
            )
        except sqlite3.IntegrityError as err:
            raise StorageError(f"A job with id {job.id!r} already exists.") from err

    async def admit_job(self, job: Job, *, daily_quota: int, max_pending: int, day_start: float) -> Admission:
        async with self._transaction():
            async with self._conn.execute(
                "SELECT COALESCE(SUM(CASE WHEN created_at >= ? AND created_at < ? AND status NOT IN (?, ?) "
                "THEN n ELSE 0 END), 0), COALESCE(SUM(CASE WHEN status IN (?, ?) THEN 1 ELSE 0 END), 0) "
                "FROM jobs WHERE user = ?",
                (
                    day_start,
                    day_start + _DAY,
                    JobStatus.FAILED.value,
                    JobStatus.CANCELLED.value,
                    JobStatus.QUEUED.value,
                    JobStatus.RUNNING.value,
                    job.user,
                ),
            ) as cursor:
                row = await cursor.fetchone()
            used, pending = (int(row[0]), int(row[1])) if row else (0, 0)
            refused = quota_or_pending(job, used, pending, daily_quota, max_pending)
            if refused is None:
                await self._insert_job(job)
        return Admission(refused is None, used, pending, refused)

    async def discard_job(self, job_id: str) -> bool:
        async with self._write_lock:
            cursor = await self._conn.execute(
                "DELETE FROM jobs WHERE id = ? AND status = ? AND attempt = 0",
                (job_id, JobStatus.QUEUED.value),
            )
            return cursor.rowcount == 1

    async def claim_job(self, job_id: str, owner: str, lease_s: float, now: float) -> Job | None:
        async with self._transaction():
            async with self._conn.execute(
                "SELECT data, status, attempt, lease_until FROM jobs WHERE id = ?", (job_id,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is None or not claimable(JobStatus(row[1]), row[3], now):
                return None
            job = replace(
                job_from_json(row[0]),
                status=JobStatus.RUNNING,
                attempt=int(row[2]) + 1,
                started_at=now,
                progress=0.0,
                error=None,
            )
            await self._write_job(job)
            await self._conn.execute(
                "UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE id = ?",
                (owner, now + lease_s, job_id),
            )
        return job

    async def renew_lease(self, job_id: str, attempt: int, lease_s: float, now: float) -> bool:
        async with self._write_lock:
            cursor = await self._conn.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND attempt = ? AND status = ?",
                (now + lease_s, job_id, attempt, JobStatus.RUNNING.value),
            )
            return cursor.rowcount == 1

    async def finish_attempt(self, job: Job, platforms: Sequence[str] = ()) -> bool:
        async with self._transaction():
            stored = await self._current(job)
            if stored is None:
                return False
            await self._write_job(replace(job, meta={**job.meta, **stored.meta}))
            await self._conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = ?", (job.id,)
            )
            now = job.finished_at or time.time()
            await self._conn.executemany(
                "INSERT OR IGNORE INTO deliveries (job_id, platform, state, next_at, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(job.id, platform, DeliveryState.PENDING.value, now, now) for platform in platforms],
            )
        return True

    async def release_attempt(self, job: Job) -> bool:
        async with self._transaction():
            stored = await self._current(job)
            if stored is None:
                return False
            queued = replace(job, status=JobStatus.QUEUED, meta={**job.meta, **stored.meta})
            await self._write_job(queued)
            await self._conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE id = ?", (job.id,)
            )
        return True

    async def _current(self, job: Job) -> Job | None:
        """The stored job if `job.attempt` is its current attempt and it has not finished; else None."""
        async with self._conn.execute(
            "SELECT data FROM jobs WHERE id = ? AND attempt = ? AND status IN (?, ?)",
            (job.id, job.attempt, JobStatus.QUEUED.value, JobStatus.RUNNING.value),
        ) as cursor:
            row = await cursor.fetchone()
        return job_from_json(row[0]) if row else None

    async def recoverable_ids(self, now: float) -> list[str]:
        async with self._conn.execute(
            "SELECT id FROM jobs WHERE status = ? OR (status = ? AND COALESCE(lease_until, 0) < ?) "
            "ORDER BY created_at, rowid",
            (JobStatus.QUEUED.value, JobStatus.RUNNING.value, now),
        ) as cursor:
            return [row[0] for row in await cursor.fetchall()]

    async def update_job(self, job: Job) -> None:
        """Replace the job; meta keys stored meanwhile (by `merge_meta`) are kept, never dropped."""
        async with self._transaction():
            stored = await self._get_job(job.id)
            if stored is None:
                raise NotFound(f"There is no job with id {job.id!r}.")
            if stored.meta:
                job = replace(job, meta={**job.meta, **stored.meta})
            await self._write_job(job)

    async def merge_meta(self, job_id: str, meta: dict[str, str]) -> Job:
        async with self._transaction():
            stored = await self._get_job(job_id)
            if stored is None:
                raise NotFound(f"There is no job with id {job_id!r}.")
            job = replace(stored, meta={**stored.meta, **meta})
            await self._write_job(job)
        return job

    async def _write_job(self, job: Job) -> None:
        await self._conn.execute(
            "UPDATE jobs SET user = ?, chat = ?, status = ?, created_at = ?, n = ?, attempt = ?, data = ? "
            "WHERE id = ?",
            (
                job.user,
                job.chat,
                job.status.value,
                job.created_at,
                job.request.n,
                job.attempt,
                job_to_json(job),
                job.id,
            ),
        )

    # deliveries (the outbox) ------------------------------------------------------------------

    async def claim_deliveries(
        self, platform: str, owner: str, lease_s: float, now: float, limit: int = 10
    ) -> list[Delivery]:
        async with self._write_lock:
            async with self._conn.execute(
                f"UPDATE deliveries SET claimed_by = ?, claim_until = ? WHERE id IN ("
                "SELECT id FROM deliveries WHERE platform = ? AND state = ? AND next_at <= ? "
                "AND COALESCE(claim_until, 0) < ? ORDER BY next_at, id LIMIT ?) "
                f"RETURNING {_DELIVERY_COLUMNS}",
                (owner, now + lease_s, platform, DeliveryState.PENDING.value, now, now, limit),
            ) as cursor:
                rows = await cursor.fetchall()
        return sorted((_delivery(row) for row in rows), key=lambda d: (d.next_at, d.id))

    async def mark_delivered(self, delivery_id: int, owner: str, message_id: str | None, now: float) -> bool:
        async with self._write_lock:
            cursor = await self._conn.execute(
                "UPDATE deliveries SET state = ?, message_id = ?, sent_at = ?, claim_until = NULL, "
                "attempts = attempts + 1 WHERE id = ? AND claimed_by = ? AND state = ?",
                (DeliveryState.SENT.value, message_id, now, delivery_id, owner, DeliveryState.PENDING.value),
            )
            return cursor.rowcount == 1

    async def retry_delivery(
        self, delivery_id: int, owner: str, error: str, next_at: float, max_attempts: int
    ) -> DeliveryState | None:
        async with self._write_lock:
            async with self._conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, error = ?, next_at = ?, claimed_by = NULL, "
                "claim_until = NULL, state = CASE WHEN attempts + 1 >= ? THEN ? ELSE state END "
                "WHERE id = ? AND claimed_by = ? AND state = ? RETURNING state",
                (
                    error[:500],
                    next_at,
                    max_attempts,
                    DeliveryState.DEAD.value,
                    delivery_id,
                    owner,
                    DeliveryState.PENDING.value,
                ),
            ) as cursor:
                row = await cursor.fetchone()
        return DeliveryState(row[0]) if row else None

    async def deliveries(self, job_id: str) -> list[Delivery]:
        async with self._conn.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE job_id = ? ORDER BY id", (job_id,)
        ) as cursor:
            rows = await cursor.fetchall()
        return [_delivery(row) for row in rows]

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """One write transaction, taken at once (BEGIN IMMEDIATE), so other processes on the file wait."""
        async with self._write_lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def _get_job(self, job_id: str) -> Job | None:
        rows = await self._jobs("SELECT data FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    async def get_job(self, job_id: str) -> Job | None:
        return await self._get_job(job_id)

    async def unfinished_jobs(self) -> list[Job]:
        return await self._jobs(
            "SELECT data FROM jobs WHERE status IN (?, ?) ORDER BY created_at, rowid",
            (JobStatus.QUEUED.value, JobStatus.RUNNING.value),
        )

    async def recent_jobs(self, chat: str, limit: int = 20) -> list[Job]:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidOption("The number of recent jobs must be a whole number of 0 or more.")
        return await self._jobs(
            "SELECT data FROM jobs WHERE chat = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (chat, limit),
        )

    # stories ----------------------------------------------------------------------------------

    async def save_story(self, story_id: str, chat: str, active: bool, data: dict[str, Any]) -> None:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        async with self._write_lock:
            try:
                await self._conn.execute(
                    "INSERT INTO stories (id, chat, active, updated_at, data) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET chat = excluded.chat, active = excluded.active, "
                    "updated_at = excluded.updated_at, data = excluded.data, version = version + 1",
                    (story_id, chat, int(active), time.time(), text),
                )
            except sqlite3.IntegrityError as err:
                raise InvalidOption("This chat already has an active story: /story end it first.") from err

    @contextlib.asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        """An advisory file lock beside the database (every process on it sees the same file)."""
        local = self._named_locks.setdefault(name, asyncio.Lock())
        async with local:
            path = self._lock_dir / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.lock"
            fd = await asyncio.to_thread(_open_lock_file, path)
            try:
                while True:  # another process holds it: poll (flock has no async wait)
                    if _try_flock(fd):
                        break
                    await asyncio.sleep(LOCK_POLL_S)
                yield
            finally:
                os.close(fd)  # closing releases the lock

    async def get_story(self, story_id: str) -> dict[str, Any] | None:
        return await self._story("SELECT data FROM stories WHERE id = ?", (story_id,))

    async def active_story(self, chat: str) -> dict[str, Any] | None:
        return await self._story("SELECT data FROM stories WHERE chat = ? AND active = 1", (chat,))

    async def _story(self, sql: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        async with self._conn.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        try:
            data = json.loads(row[0])
        except ValueError as err:
            raise StorageError("A stored story is not valid JSON.") from err
        if not isinstance(data, dict):
            raise StorageError("A stored story is not a JSON object.")
        return data

    async def _jobs(self, sql: str, params: tuple[Any, ...]) -> list[Job]:
        async with self._conn.execute(sql, params) as cursor:
            rows = await cursor.fetchall()
        return [job_from_json(row[0]) for row in rows]

    async def images_today(self, user: str, now: float | None = None) -> int:
        moment = time.time() if now is None else now
        day = time.gmtime(moment)
        start = float(calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0)))
        async with self._conn.execute(
            "SELECT COALESCE(SUM(n), 0) FROM jobs WHERE user = ? AND created_at >= ? AND created_at < ? "
            "AND status NOT IN (?, ?)",
            (user, start, start + _DAY, JobStatus.FAILED.value, JobStatus.CANCELLED.value),
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    # settings and counters --------------------------------------------------------------------

    async def get_settings(self, scope: str) -> dict[str, Any]:
        async with self._conn.execute("SELECT data FROM settings WHERE scope = ?", (scope,)) as cursor:
            row = await cursor.fetchone()
        return _decode_settings(row[0]) if row else {}

    async def update_settings(self, scope: str, changes: dict[str, Any]) -> dict[str, Any]:
        check_changes(changes)
        async with self._transaction():
            current, data = merge_settings(await self.get_settings(scope), changes)
            if current:
                await self._conn.execute(
                    "INSERT INTO settings (scope, data) VALUES (?, ?) "
                    "ON CONFLICT (scope) DO UPDATE SET data = excluded.data",
                    (scope, data),
                )
            else:
                await self._conn.execute("DELETE FROM settings WHERE scope = ?", (scope,))
        return json.loads(data)

    async def incr_counter(self, name: str, amount: int = 1) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise InvalidOption("A counter can only grow by a whole number.")
        async with self._write_lock:
            await self._conn.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, amount),
            )

    async def counters(self) -> dict[str, int]:
        async with self._conn.execute("SELECT name, value FROM counters ORDER BY name") as cursor:
            rows = await cursor.fetchall()
        return {str(name): int(value) for name, value in rows}

    async def export_rows(self, sql: str, batch_size: int = 500) -> AsyncIterator[list[tuple[Any, ...]]]:
        """Raw rows of a read-only query, in batches (`core/storage/transfer.py` copies a store with it)."""
        async with self._conn.execute(sql) as cursor:
            while rows := await cursor.fetchmany(batch_size):
                yield [tuple(row) for row in rows]


_DELIVERY_COLUMNS = (
    "id, job_id, platform, state, attempts, next_at, claimed_by, claim_until, message_id, error, "
    "created_at, sent_at"
)


def _delivery(row: Any) -> Delivery:
    return Delivery(
        id=int(row[0]),
        job_id=str(row[1]),
        platform=str(row[2]),
        state=DeliveryState(row[3]),
        attempts=int(row[4]),
        next_at=float(row[5]),
        claimed_by=row[6],
        claim_until=row[7],
        message_id=row[8],
        error=row[9],
        created_at=float(row[10]),
        sent_at=row[11],
    )


def _open_lock_file(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _decode_settings(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as err:
        raise StorageError("Stored settings are not valid JSON.") from err
    if not isinstance(data, dict):
        raise StorageError("Stored settings are not a JSON object.")
    return data
