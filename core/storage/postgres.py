"""The shared store: `Store` on PostgreSQL through an asyncpg connection pool.

Chosen by `HUAHUA_DATABASE_URL=postgresql://...`, so several processes on several machines share one
set of jobs, settings, stories and counters. Each operation is one statement or one short
transaction; read-modify-write operations lock the row (`SELECT ... FOR UPDATE`) or, for rows that
may not exist yet, a transaction-level advisory lock on the key. The semantics, including the error
types, are those of `SqliteStore`: one contract test suite runs against both.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from core.codec import job_from_json, job_to_json
from core.errors import InvalidOption, NotFound, ServiceUnavailable, StorageError
from core.storage.migrations import Migration
from core.storage.pg_migrations import migrate
from core.storage.store import Admission, Store, check_changes, claimable, merge_settings, quota_or_pending
from core.types import Delivery, DeliveryState, Job, JobStatus

logger = logging.getLogger(__name__)

_DAY = 86_400.0
SCHEMES = ("postgresql", "postgres")
# First keys of the two-key advisory locks that serialise writes of one settings scope ...
_SETTINGS_LOCK = 0x68_75_61_68
# ... and admissions of one user (quota and pending limit).
_ADMISSION_LOCK = 0x68_75_61_69
# ... and `lock(name)`.
_NAMED_LOCK = 0x68_75_61_6C
# A server that went away or was shut down. asyncpg raises InternalClientError when the server ends
# an idle connection (pg_terminate_backend, a restart), the same as a lost connection.
_LOST_CONNECTION = (
    TimeoutError,
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.OperatorInterventionError,
)


@dataclass(frozen=True)
class DatabaseUrl:
    """A parsed `postgresql://` URL; `where` names the server and database without the password."""

    url: str
    where: str
    user: str | None
    password: str | None

    def redact(self, text: str) -> str:
        return text.replace(self.password, "***") if self.password else text


def parse_database_url(url: str) -> DatabaseUrl:
    """Check the URL's shape; StorageError (without the password) when it is not a PostgreSQL URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as err:
        raise StorageError(
            "HUAHUA_DATABASE_URL is not a valid URL (expected postgresql://user:password@host:5432/db)."
        ) from err
    if parts.scheme not in SCHEMES:
        raise StorageError(
            "HUAHUA_DATABASE_URL must start with postgresql:// (or postgres://); "
            "leave it unset for the embedded SQLite database."
        )
    database = parts.path.lstrip("/")
    where = f"{host or 'localhost'}:{port or 5432}/{database or parts.username or ''}"
    return DatabaseUrl(url, where, parts.username, parts.password)


class PostgresStore(Store):
    def __init__(self, pool: asyncpg.Pool, where: str) -> None:
        """Use `PostgresStore.open`."""
        self._pool = pool
        self._where = where
        self._named_locks: dict[str, asyncio.Lock] = {}

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = 10,
        connect_timeout_s: float = 10.0,
        migrations: tuple[Migration, ...] | None = None,
    ) -> PostgresStore:
        """Connect a pool to the server, then migrate the schema (to `PG_MIGRATIONS` by default).

        Any failure is one StorageError sentence naming the server and database, never the password.
        """
        parsed = parse_database_url(url)
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=max(1, pool_size),
                timeout=connect_timeout_s,
                command_timeout=60.0,
                server_settings={"application_name": "huahua"},
            )
        except Exception as err:
            raise StorageError(_connect_failure(parsed, err)) from None
        try:
            async with pool.acquire(timeout=connect_timeout_s) as conn:
                await migrate(conn, migrations)
        except BaseException:
            await pool.close()
            raise
        logger.info("store opened on PostgreSQL at %s", parsed.where)
        return cls(pool, parsed.where)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; a lost server becomes ServiceUnavailable, and a broken connection is
        closed rather than handed back to the pool."""
        try:
            async with self._pool.acquire() as conn:
                try:
                    yield conn
                except _LOST_CONNECTION:
                    conn.terminate()
                    raise
        except _LOST_CONNECTION as err:
            logger.warning("PostgreSQL at %s failed: %s", self._where, type(err).__name__)
            raise ServiceUnavailable("The database cannot be reached right now; please try again.") from err

    # jobs -------------------------------------------------------------------------------------

    async def add_job(self, job: Job) -> None:
        async with self._connection() as conn:
            await _insert_job(conn, job)

    async def admit_job(self, job: Job, *, daily_quota: int, max_pending: int, day_start: float) -> Admission:
        async with self._connection() as conn, conn.transaction():
            # Serialise admissions of one user across processes; other users are not held up.
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _ADMISSION_LOCK, job.user)
            row = await conn.fetchrow(
                "SELECT COALESCE(SUM(n) FILTER (WHERE created_at >= $1 AND created_at < $2 "
                "AND status NOT IN ($3, $4)), 0), COUNT(*) FILTER (WHERE status IN ($5, $6)) "
                'FROM jobs WHERE "user" = $7',
                day_start,
                day_start + _DAY,
                JobStatus.FAILED.value,
                JobStatus.CANCELLED.value,
                JobStatus.QUEUED.value,
                JobStatus.RUNNING.value,
                job.user,
            )
            used, pending = int(row[0]), int(row[1])
            refused = quota_or_pending(job, used, pending, daily_quota, max_pending)
            if refused is None:
                await _insert_job(conn, job)
        return Admission(refused is None, used, pending, refused)

    async def discard_job(self, job_id: str) -> bool:
        async with self._connection() as conn:
            status = await conn.execute(
                "DELETE FROM jobs WHERE id = $1 AND status = $2 AND attempt = 0",
                job_id,
                JobStatus.QUEUED.value,
            )
        return _rowcount(status) == 1

    async def claim_job(self, job_id: str, owner: str, lease_s: float, now: float) -> Job | None:
        # FOR UPDATE, not SKIP LOCKED: the caller names this one job, and a row held for a moment by
        # merge_meta must be waited for, not taken for a job that is running elsewhere.
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT data, status, attempt, lease_until FROM jobs WHERE id = $1 FOR UPDATE", job_id
            )
            if row is None or not claimable(JobStatus(row["status"]), row["lease_until"], now):
                return None
            job = replace(
                job_from_json(row["data"]),
                status=JobStatus.RUNNING,
                attempt=int(row["attempt"]) + 1,
                started_at=now,
                progress=0.0,
                error=None,
            )
            await _write_job(conn, job, lease=(owner, now + lease_s))
        return job

    async def renew_lease(self, job_id: str, attempt: int, lease_s: float, now: float) -> bool:
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE jobs SET lease_until = $1 WHERE id = $2 AND attempt = $3 AND status = $4",
                now + lease_s,
                job_id,
                attempt,
                JobStatus.RUNNING.value,
            )
        return _rowcount(status) == 1

    async def finish_attempt(self, job: Job, platforms: Sequence[str] = ()) -> bool:
        async with self._connection() as conn, conn.transaction():
            stored = await _current_attempt(conn, job)
            if stored is None:
                return False
            await _write_job(conn, replace(job, meta={**job.meta, **stored.meta}), lease=None)
            now = job.finished_at or time.time()
            await conn.executemany(
                "INSERT INTO deliveries (job_id, platform, state, next_at, created_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (job_id, platform) DO NOTHING",
                [(job.id, platform, DeliveryState.PENDING.value, now, now) for platform in platforms],
            )
        return True

    async def release_attempt(self, job: Job) -> bool:
        async with self._connection() as conn, conn.transaction():
            stored = await _current_attempt(conn, job)
            if stored is None:
                return False
            queued = replace(job, status=JobStatus.QUEUED, meta={**job.meta, **stored.meta})
            await _write_job(conn, queued, lease=None)
        return True

    async def recoverable_ids(self, now: float) -> list[str]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id FROM jobs WHERE status = $1 OR (status = $2 AND COALESCE(lease_until, 0) < $3) "
                "ORDER BY created_at, seq",
                JobStatus.QUEUED.value,
                JobStatus.RUNNING.value,
                now,
            )
        return [row[0] for row in rows]

    async def update_job(self, job: Job) -> None:
        """Replace the job; meta keys stored meanwhile (by `merge_meta`) are kept, never dropped."""
        async with self._connection() as conn, conn.transaction():
            stored = await self._locked_job(conn, job.id)
            if stored.meta:
                job = replace(job, meta={**job.meta, **stored.meta})
            await _write_job(conn, job)

    async def merge_meta(self, job_id: str, meta: dict[str, str]) -> Job:
        async with self._connection() as conn, conn.transaction():
            stored = await self._locked_job(conn, job_id)
            job = replace(stored, meta={**stored.meta, **meta})
            await _write_job(conn, job)
        return job

    @staticmethod
    async def _locked_job(conn: asyncpg.Connection, job_id: str) -> Job:
        data = await conn.fetchval("SELECT data FROM jobs WHERE id = $1 FOR UPDATE", job_id)
        if data is None:
            raise NotFound(f"There is no job with id {job_id!r}.")
        return job_from_json(data)

    async def get_job(self, job_id: str) -> Job | None:
        jobs = await self._jobs("SELECT data FROM jobs WHERE id = $1", job_id)
        return jobs[0] if jobs else None

    async def unfinished_jobs(self) -> list[Job]:
        return await self._jobs(
            "SELECT data FROM jobs WHERE status IN ($1, $2) ORDER BY created_at, seq",
            JobStatus.QUEUED.value,
            JobStatus.RUNNING.value,
        )

    async def recent_jobs(self, chat: str, limit: int = 20) -> list[Job]:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidOption("The number of recent jobs must be a whole number of 0 or more.")
        return await self._jobs(
            "SELECT data FROM jobs WHERE chat = $1 ORDER BY created_at DESC, seq DESC LIMIT $2", chat, limit
        )

    async def _jobs(self, sql: str, *params: Any) -> list[Job]:
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *params)
        return [job_from_json(row[0]) for row in rows]

    async def images_today(self, user: str, now: float | None = None) -> int:
        moment = time.time() if now is None else now
        day = time.gmtime(moment)
        start = float(calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0)))
        async with self._connection() as conn:
            total = await conn.fetchval(
                'SELECT COALESCE(SUM(n), 0) FROM jobs WHERE "user" = $1 AND created_at >= $2 '
                "AND created_at < $3 AND status NOT IN ($4, $5)",
                user,
                start,
                start + _DAY,
                JobStatus.FAILED.value,
                JobStatus.CANCELLED.value,
            )
        return int(total)

    # deliveries (the outbox) ------------------------------------------------------------------

    async def claim_deliveries(
        self, platform: str, owner: str, lease_s: float, now: float, limit: int = 10
    ) -> list[Delivery]:
        # SKIP LOCKED: processes claiming at once each take different due rows instead of queueing.
        async with self._connection() as conn:
            rows = await conn.fetch(
                "UPDATE deliveries SET claimed_by = $1, claim_until = $2 WHERE id IN ("
                "SELECT id FROM deliveries WHERE platform = $3 AND state = $4 AND next_at <= $5 "
                "AND COALESCE(claim_until, 0) < $5 ORDER BY next_at, id LIMIT $6 FOR UPDATE SKIP LOCKED) "
                f"RETURNING {_DELIVERY_COLUMNS}",
                owner,
                now + lease_s,
                platform,
                DeliveryState.PENDING.value,
                now,
                limit,
            )
        return sorted((_delivery(row) for row in rows), key=lambda d: (d.next_at, d.id))

    async def mark_delivered(self, delivery_id: int, owner: str, message_id: str | None, now: float) -> bool:
        async with self._connection() as conn:
            status = await conn.execute(
                "UPDATE deliveries SET state = $1, message_id = $2, sent_at = $3, claim_until = NULL, "
                "attempts = attempts + 1 WHERE id = $4 AND claimed_by = $5 AND state = $6",
                DeliveryState.SENT.value,
                message_id,
                now,
                delivery_id,
                owner,
                DeliveryState.PENDING.value,
            )
        return _rowcount(status) == 1

    async def retry_delivery(
        self, delivery_id: int, owner: str, error: str, next_at: float, max_attempts: int
    ) -> DeliveryState | None:
        async with self._connection() as conn:
            state = await conn.fetchval(
                "UPDATE deliveries SET attempts = attempts + 1, error = $1, next_at = $2, claimed_by = NULL, "
                "claim_until = NULL, state = CASE WHEN attempts + 1 >= $3 THEN $4 ELSE state END "
                "WHERE id = $5 AND claimed_by = $6 AND state = $7 RETURNING state",
                error[:500],
                next_at,
                max_attempts,
                DeliveryState.DEAD.value,
                delivery_id,
                owner,
                DeliveryState.PENDING.value,
            )
        return None if state is None else DeliveryState(state)

    async def deliveries(self, job_id: str) -> list[Delivery]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE job_id = $1 ORDER BY id", job_id
            )
        return [_delivery(row) for row in rows]

    # stories ----------------------------------------------------------------------------------

    async def save_story(self, story_id: str, chat: str, active: bool, data: dict[str, Any]) -> None:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        async with self._connection() as conn:
            try:
                await conn.execute(
                    "INSERT INTO stories (id, chat, active, updated_at, data) VALUES ($1, $2, $3, $4, $5) "
                    "ON CONFLICT (id) DO UPDATE SET chat = excluded.chat, active = excluded.active, "
                    "updated_at = excluded.updated_at, data = excluded.data, version = stories.version + 1",
                    story_id,
                    chat,
                    bool(active),
                    time.time(),
                    text,
                )
            except asyncpg.UniqueViolationError as err:
                raise InvalidOption("This chat already has an active story: /story end it first.") from err

    @asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        """A session-level advisory lock on its own pooled connection: the server queues the waiters,
        and releases the lock by itself if this process or its connection dies."""
        local = self._named_locks.setdefault(name, asyncio.Lock())
        async with local, self._connection() as conn:
            await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", _NAMED_LOCK, name)
            try:
                yield
            finally:
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", _NAMED_LOCK, name)
                except BaseException:
                    conn.terminate()  # never hand back a connection that may still hold the lock
                    raise

    async def get_story(self, story_id: str) -> dict[str, Any] | None:
        return await self._story("SELECT data FROM stories WHERE id = $1", story_id)

    async def active_story(self, chat: str) -> dict[str, Any] | None:
        return await self._story("SELECT data FROM stories WHERE chat = $1 AND active", chat)

    async def _story(self, sql: str, *params: Any) -> dict[str, Any] | None:
        async with self._connection() as conn:
            text = await conn.fetchval(sql, *params)
        return None if text is None else _decode_object(text, "story")

    # settings and counters --------------------------------------------------------------------

    async def get_settings(self, scope: str) -> dict[str, Any]:
        async with self._connection() as conn:
            text = await conn.fetchval("SELECT data FROM settings WHERE scope = $1", scope)
        return {} if text is None else _decode_object(text, "settings")

    async def update_settings(self, scope: str, changes: dict[str, Any]) -> dict[str, Any]:
        check_changes(changes)
        async with self._connection() as conn, conn.transaction():
            # The row may not exist yet, so lock the scope itself: concurrent merges never lose a key.
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _SETTINGS_LOCK, scope)
            text = await conn.fetchval("SELECT data FROM settings WHERE scope = $1", scope)
            current, data = merge_settings({} if text is None else _decode_object(text, "settings"), changes)
            if current:
                await conn.execute(
                    "INSERT INTO settings (scope, data) VALUES ($1, $2) "
                    "ON CONFLICT (scope) DO UPDATE SET data = excluded.data",
                    scope,
                    data,
                )
            else:
                await conn.execute("DELETE FROM settings WHERE scope = $1", scope)
        result: dict[str, Any] = json.loads(data)
        return result

    async def incr_counter(self, name: str, amount: int = 1) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise InvalidOption("A counter can only grow by a whole number.")
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO counters (name, value) VALUES ($1, $2) "
                "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
                name,
                amount,
            )

    async def counters(self) -> dict[str, int]:
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT name, value FROM counters ORDER BY name")
        return {str(row["name"]): int(row["value"]) for row in rows}

    # copying between stores (core/storage/transfer.py) ------------------------------------------

    async def export_rows(self, sql: str, batch_size: int = 500) -> AsyncIterator[list[tuple[Any, ...]]]:
        """Raw rows of a read-only query, in batches, read with a server-side cursor."""
        async with self._connection() as conn, conn.transaction(readonly=True):
            batch: list[tuple[Any, ...]] = []
            async for record in conn.cursor(sql, prefetch=batch_size):
                batch.append(tuple(record))
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

    @asynccontextmanager
    async def importer(self) -> AsyncIterator[PostgresImport]:
        """Upserts of copied rows, all in one transaction (committed when the block ends without error)."""
        async with self._connection() as conn, conn.transaction():
            yield PostgresImport(conn)


class PostgresImport:
    """Idempotent upserts of rows copied from another store; each returns how many rows were new."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def _upsert(self, sql: str, rows: list[tuple[Any, ...]]) -> int:
        if not rows:
            return 0
        columns = [list(column) for column in zip(*rows, strict=True)]
        inserted = await self._conn.fetch(sql + " RETURNING (xmax = 0)", *columns)
        return sum(1 for row in inserted if row[0])

    async def jobs(self, rows: list[tuple[Any, ...]]) -> int:
        """Rows of (id, user, chat, status, created_at, n, attempt, data); leases are cleared."""
        return await self._upsert(
            'INSERT INTO jobs (id, "user", chat, status, created_at, n, attempt, data) '
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], "
            "$6::int[], $7::int[], $8::text[]) "
            'ON CONFLICT (id) DO UPDATE SET "user" = excluded."user", chat = excluded.chat, '
            "status = excluded.status, created_at = excluded.created_at, n = excluded.n, "
            "attempt = excluded.attempt, data = excluded.data, lease_owner = NULL, lease_until = NULL",
            rows,
        )

    async def settings(self, rows: list[tuple[Any, ...]]) -> int:
        """Rows of (scope, data)."""
        return await self._upsert(
            "INSERT INTO settings (scope, data) SELECT * FROM unnest($1::text[], $2::text[]) "
            "ON CONFLICT (scope) DO UPDATE SET data = excluded.data",
            rows,
        )

    async def stories(self, rows: list[tuple[Any, ...]]) -> int:
        """Rows of (id, chat, active, updated_at, version, data), ended stories first."""
        typed = [(r[0], r[1], bool(r[2]), r[3], r[4], r[5]) for r in rows]
        try:
            return await self._upsert(
                "INSERT INTO stories (id, chat, active, updated_at, version, data) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::bool[], $4::float8[], $5::int[], "
                "$6::text[]) ON CONFLICT (id) DO UPDATE SET chat = excluded.chat, "
                "active = excluded.active, updated_at = excluded.updated_at, version = excluded.version, "
                "data = excluded.data",
                typed,
            )
        except asyncpg.UniqueViolationError as err:
            raise StorageError(
                "The target database has another active story in a chat that has one here; "
                "end it there first."
            ) from err

    async def counters(self, rows: list[tuple[Any, ...]]) -> int:
        """Rows of (name, value); the target takes the source's values (so a second copy adds nothing)."""
        return await self._upsert(
            "INSERT INTO counters (name, value) SELECT * FROM unnest($1::text[], $2::bigint[]) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            rows,
        )

    async def deliveries(self, rows: list[tuple[Any, ...]]) -> int:
        """Rows of (job_id, platform, state, attempts, next_at, message_id, error, created_at, sent_at)."""
        return await self._upsert(
            "INSERT INTO deliveries (job_id, platform, state, attempts, next_at, message_id, error, "
            "created_at, sent_at) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], "
            "$5::float8[], $6::text[], $7::text[], $8::float8[], $9::float8[]) "
            "ON CONFLICT (job_id, platform) DO UPDATE SET state = excluded.state, "
            "attempts = excluded.attempts, next_at = excluded.next_at, message_id = excluded.message_id, "
            "error = excluded.error, created_at = excluded.created_at, sent_at = excluded.sent_at, "
            "claimed_by = NULL, claim_until = NULL",
            rows,
        )


async def _insert_job(conn: asyncpg.Connection, job: Job) -> None:
    try:
        await conn.execute(
            'INSERT INTO jobs (id, "user", chat, status, created_at, n, attempt, data) '
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            job.id,
            job.user,
            job.chat,
            job.status.value,
            job.created_at,
            job.request.n,
            job.attempt,
            job_to_json(job),
        )
    except asyncpg.UniqueViolationError as err:
        raise StorageError(f"A job with id {job.id!r} already exists.") from err


_KEEP_LEASE = ("", 0.0)


async def _write_job(
    conn: asyncpg.Connection, job: Job, lease: tuple[str, float] | None = _KEEP_LEASE
) -> None:
    """Replace the job's row; `lease` (owner, until) sets the lease, None clears it, the default keeps it."""
    values: list[Any] = [
        job.user,
        job.chat,
        job.status.value,
        job.created_at,
        job.request.n,
        job.attempt,
        job_to_json(job),
        job.id,
    ]
    lease_sql = ""
    if lease is not _KEEP_LEASE:
        lease_sql = ", lease_owner = $9, lease_until = $10"
        values.extend(lease if lease is not None else (None, None))
    await conn.execute(
        'UPDATE jobs SET "user" = $1, chat = $2, status = $3, created_at = $4, n = $5, attempt = $6, '
        f"data = $7{lease_sql} WHERE id = $8",
        *values,
    )


async def _current_attempt(conn: asyncpg.Connection, job: Job) -> Job | None:
    """The stored job, locked, if `job.attempt` is its current attempt and it has not finished."""
    data = await conn.fetchval(
        "SELECT data FROM jobs WHERE id = $1 AND attempt = $2 AND status IN ($3, $4) FOR UPDATE",
        job.id,
        job.attempt,
        JobStatus.QUEUED.value,
        JobStatus.RUNNING.value,
    )
    return None if data is None else job_from_json(data)


def _rowcount(status: str) -> int:
    """Rows touched, from a command tag such as "UPDATE 1"."""
    return int(status.rsplit(" ", 1)[-1])


_DELIVERY_COLUMNS = (
    "id, job_id, platform, state, attempts, next_at, claimed_by, claim_until, message_id, error, "
    "created_at, sent_at"
)


def _delivery(row: asyncpg.Record) -> Delivery:
    return Delivery(
        id=int(row["id"]),
        job_id=str(row["job_id"]),
        platform=str(row["platform"]),
        state=DeliveryState(row["state"]),
        attempts=int(row["attempts"]),
        next_at=float(row["next_at"]),
        claimed_by=row["claimed_by"],
        claim_until=row["claim_until"],
        message_id=row["message_id"],
        error=row["error"],
        created_at=float(row["created_at"]),
        sent_at=row["sent_at"],
    )


def _decode_object(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as err:
        raise StorageError(f"Stored {what} is not valid JSON.") from err
    if not isinstance(data, dict):
        raise StorageError(f"Stored {what} is not a JSON object.")
    return data


def _connect_failure(parsed: DatabaseUrl, err: BaseException) -> str:
    """One sentence for a failed connection, naming the server but never the password."""
    where = parsed.where
    if isinstance(err, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
        return f"PostgreSQL at {where} refused the login of user {parsed.user!r}: check HUAHUA_DATABASE_URL."
    if isinstance(err, asyncpg.InvalidCatalogNameError):
        return f"PostgreSQL at {where} has no such database: create it or fix HUAHUA_DATABASE_URL."
    if isinstance(err, TimeoutError):
        return f"Cannot reach PostgreSQL at {where}: no answer in time."
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
        return f"Cannot reach PostgreSQL at {where} ({parsed.redact(reason)})."
    if isinstance(err, ValueError):
        return "HUAHUA_DATABASE_URL is not a valid PostgreSQL URL (postgresql://user:password@host:5432/db)."
    return f"Cannot open PostgreSQL at {where} ({type(err).__name__}: {parsed.redact(str(err))})."
