"""The store port and its SQLite implementation: jobs, images on disk, settings, quotas and counters.

`SqliteStore` keeps one aiosqlite connection (WAL, foreign keys on) and serialises every write behind
an asyncio lock, so any number of concurrent callers never see "database is locked". Images are
content-addressed PNG files under `images_dir/<h[:2]>/<h>.png`, written atomically.
"""

from __future__ import annotations

import abc
import asyncio
import calendar
import hashlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosqlite

from core.codec import job_from_json, job_to_json
from core.errors import InvalidOption, NotFound, StorageError
from core.migrations import Migration, migrate
from core.types import Job, JobStatus

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HASH = re.compile(r"[0-9a-f]{64}")
_DAY = 86_400.0


class Store(abc.ABC):
    """Persistent state of the service."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def add_job(self, job: Job) -> None:
        """Insert a new job; StorageError if its id exists."""

    @abc.abstractmethod
    async def update_job(self, job: Job) -> None:
        """Replace the stored job with the same id; NotFound if there is none."""

    @abc.abstractmethod
    async def merge_meta(self, job_id: str, meta: dict[str, str]) -> Job:
        """Add platform ids to a job's meta atomically; NotFound if there is no such job."""

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def unfinished_jobs(self) -> list[Job]:
        """Queued or running jobs, oldest first (for recovery after a restart)."""

    @abc.abstractmethod
    async def recent_jobs(self, chat: str, limit: int = 20) -> list[Job]:
        """The chat's newest jobs, newest first."""

    @abc.abstractmethod
    async def save_story(self, story_id: str, chat: str, active: bool, data: dict[str, Any]) -> None:
        """Insert or replace a story document (see core.story.model)."""

    @abc.abstractmethod
    async def get_story(self, story_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def active_story(self, chat: str) -> dict[str, Any] | None:
        """The chat's active story, if any (at most one per chat)."""

    @abc.abstractmethod
    async def put_image(self, png: bytes) -> str:
        """Store PNG bytes; returns their sha256 hex digest. Storing the same bytes twice is a no-op."""

    @abc.abstractmethod
    def image_path(self, h: str) -> Path:
        """Where the image with digest `h` lives; NotFound unless `h` is 64 lowercase hex digits."""

    @abc.abstractmethod
    async def get_image(self, h: str) -> bytes:
        """The PNG bytes; NotFound if absent."""

    @abc.abstractmethod
    async def get_settings(self, scope: str) -> dict[str, Any]:
        """Settings for a scope such as "chat:web:room1"; {} if none."""

    @abc.abstractmethod
    async def update_settings(self, scope: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge `changes` (a None value deletes the key); returns the new settings."""

    @abc.abstractmethod
    async def images_today(self, user: str, now: float | None = None) -> int:
        """Images the user asked for since 00:00 UTC of `now`'s day, not counting failed or cancelled jobs."""

    @abc.abstractmethod
    async def incr_counter(self, name: str, amount: int = 1) -> None: ...

    @abc.abstractmethod
    async def counters(self) -> dict[str, int]: ...


class SqliteStore(Store):
    def __init__(self, conn: aiosqlite.Connection, images_dir: Path) -> None:
        """Use `SqliteStore.open`."""
        self._conn = conn
        self._images_dir = images_dir
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, db_path: Path, images_dir: Path, *, migrations: tuple[Migration, ...] | None = None
    ) -> SqliteStore:
        """Create the directories, open the database and migrate its schema (to `MIGRATIONS` by default)."""
        db_path = Path(db_path)
        images_dir = Path(images_dir)
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            images_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"Cannot create the data directories: {err.strerror}.") from err
        conn = await aiosqlite.connect(db_path, isolation_level=None)
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA synchronous=NORMAL")
            await conn.execute("PRAGMA busy_timeout=5000")
            await migrate(conn, migrations)
        except sqlite3.DatabaseError as err:
            await conn.close()
            raise StorageError(f"The database file {db_path.name} is unreadable or corrupt ({err}).") from err
        except BaseException:
            await conn.close()
            raise
        logger.info("store opened at %s", db_path)
        return cls(conn, images_dir)

    async def close(self) -> None:
        async with self._write_lock:
            await self._conn.close()

    # jobs -------------------------------------------------------------------------------------

    async def add_job(self, job: Job) -> None:
        data = job_to_json(job)
        async with self._write_lock:
            try:
                await self._conn.execute(
                    "INSERT INTO jobs (id, user, chat, status, created_at, n, data) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job.id, job.user, job.chat, job.status.value, job.created_at, job.request.n, data),
                )
            except sqlite3.IntegrityError as err:
                raise StorageError(f"A job with id {job.id!r} already exists.") from err

    async def update_job(self, job: Job) -> None:
        """Replace the job; meta keys stored meanwhile (by `merge_meta`) are kept, never dropped."""
        async with self._write_lock:
            stored = await self._get_job(job.id)
            if stored is None:
                raise NotFound(f"There is no job with id {job.id!r}.")
            if stored.meta:
                job = replace(job, meta={**job.meta, **stored.meta})
            await self._write_job(job)

    async def merge_meta(self, job_id: str, meta: dict[str, str]) -> Job:
        async with self._write_lock:
            stored = await self._get_job(job_id)
            if stored is None:
                raise NotFound(f"There is no job with id {job_id!r}.")
            job = replace(stored, meta={**stored.meta, **meta})
            await self._write_job(job)
        return job

    async def _write_job(self, job: Job) -> None:
        await self._conn.execute(
            "UPDATE jobs SET user = ?, chat = ?, status = ?, created_at = ?, n = ?, data = ? WHERE id = ?",
            (job.user, job.chat, job.status.value, job.created_at, job.request.n, job_to_json(job), job.id),
        )

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
                    "updated_at = excluded.updated_at, data = excluded.data",
                    (story_id, chat, int(active), time.time(), text),
                )
            except sqlite3.IntegrityError as err:
                raise InvalidOption("This chat already has an active story: /story end it first.") from err

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

    # images -----------------------------------------------------------------------------------

    async def put_image(self, png: bytes) -> str:
        if not isinstance(png, (bytes, bytearray)) or not png.startswith(PNG_SIGNATURE):
            raise InvalidOption("Only PNG images can be stored.")
        digest = hashlib.sha256(png).hexdigest()
        try:
            await asyncio.to_thread(_write_atomically, self.image_path(digest), bytes(png))
        except OSError as err:
            raise StorageError(f"The image could not be saved: {err.strerror or err}.") from err
        return digest

    def image_path(self, h: str) -> Path:
        if not isinstance(h, str) or not _HASH.fullmatch(h):
            raise NotFound("There is no image with that id.")
        return self._images_dir / h[:2] / f"{h}.png"

    async def get_image(self, h: str) -> bytes:
        path = self.image_path(h)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as err:
            raise NotFound("That image is no longer stored.") from err

    # settings and counters --------------------------------------------------------------------

    async def get_settings(self, scope: str) -> dict[str, Any]:
        async with self._conn.execute("SELECT data FROM settings WHERE scope = ?", (scope,)) as cursor:
            row = await cursor.fetchone()
        return _decode_settings(row[0]) if row else {}

    async def update_settings(self, scope: str, changes: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(changes, dict) or not all(isinstance(key, str) for key in changes):
            raise InvalidOption("Settings changes must map names to values.")
        async with self._write_lock:
            current = await self.get_settings(scope)
            for key, value in changes.items():
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
            try:
                data = json.dumps(current, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise InvalidOption(
                    "Settings values must be text, numbers, booleans, lists or maps."
                ) from err
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


def _decode_settings(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as err:
        raise StorageError("Stored settings are not valid JSON.") from err
    if not isinstance(data, dict):
        raise StorageError("Stored settings are not a JSON object.")
    return data


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it; skip if it already exists."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
