"""The store port: jobs, settings, stories, quotas and counters, behind one contract.

Implementations: `SqliteStore` (`core/storage/sqlite.py`, the embedded default). Pictures live in an
`ImageStore` (`core/storage/images.py`), not here.
"""

from __future__ import annotations

import abc
from typing import Any

from core.types import Job


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
