"""The store port: jobs, attempts and leases, deliveries, settings, stories, quotas and counters.

Implementations: `SqliteStore` (`core/storage/sqlite.py`, the embedded default). Pictures live in an
`ImageStore` (`core/storage/images.py`), not here.

The store is the source of truth about a job; the queue only hands job ids to workers. Every rule that
must hold across processes is one atomic operation here:
- `admit_job` checks the user's daily quota and pending limit and inserts the job in one step;
- `claim_job` starts a new attempt (a queued job, or a running one whose lease expired) and leases it
  to one worker, which `renew_lease`s it while it runs;
- `finish_attempt` and `release_attempt` write only while the caller's attempt is the current one,
  so a worker that was presumed dead and comes back can neither overwrite a result nor post one;
- `finish_attempt` creates the job's deliveries (the outbox) in the same transaction as its result.
"""

from __future__ import annotations

import abc
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import InvalidOption
from core.types import Delivery, DeliveryState, Job, JobStatus


@dataclass(frozen=True)
class Admission:
    """What `admit_job` decided: `admitted` False means nothing was stored; the counts are as read."""

    admitted: bool
    images_today: int
    pending: int
    refused_by: str | None = None
    """"quota" or "pending" when refused."""


class Store(abc.ABC):
    """Persistent state of the service."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def add_job(self, job: Job) -> None:
        """Insert a new job; StorageError if its id exists."""

    @abc.abstractmethod
    async def admit_job(self, job: Job, *, daily_quota: int, max_pending: int, day_start: float) -> Admission:
        """Insert a new job unless its user would pass `daily_quota` images since `day_start` (failed and
        cancelled jobs do not count) or `max_pending` queued and running jobs; one atomic step however
        many processes share the store. StorageError if its id exists."""

    @abc.abstractmethod
    async def discard_job(self, job_id: str) -> bool:
        """Delete a job that was admitted but could not be queued (it never ran: queued, attempt 0), so a
        refused request leaves no record and counts against no quota. False if it is not such a job."""

    @abc.abstractmethod
    async def claim_job(self, job_id: str, owner: str, lease_s: float, now: float) -> Job | None:
        """Start a new attempt of a queued job, or of a running one whose lease expired before `now`: it
        becomes running, `attempt` + 1, leased to `owner` until `now + lease_s`. None when the job is
        unknown, finished, or running under a live lease."""

    @abc.abstractmethod
    async def renew_lease(self, job_id: str, attempt: int, lease_s: float, now: float) -> bool:
        """Extend a running attempt's lease to `now + lease_s`; False once `attempt` is not current."""

    @abc.abstractmethod
    async def finish_attempt(self, job: Job, platforms: Sequence[str] = ()) -> bool:
        """Store `job` (final status) if `job.attempt` is still the current attempt and the job is not
        finished; in the same transaction add a pending delivery for each platform. False (nothing
        written) when fenced."""

    @abc.abstractmethod
    async def release_attempt(self, job: Job) -> bool:
        """Put a running attempt's job back in the queued state without a lease (shutdown, retries),
        keeping `job.attempt`; False (nothing written) when `job.attempt` is no longer current."""

    @abc.abstractmethod
    async def recoverable_ids(self, now: float) -> list[str]:
        """Ids of the queued jobs and of the running jobs whose lease expired before `now`, oldest first
        (the recovery sweep reads only the jobs its queue lacks)."""

    @abc.abstractmethod
    async def claim_deliveries(
        self, platform: str, owner: str, lease_s: float, now: float, limit: int = 10
    ) -> list[Delivery]:
        """Pending deliveries of a platform that are due (`next_at` <= now) and not claimed by a live
        claim, oldest first, now claimed by `owner` until `now + lease_s`."""

    @abc.abstractmethod
    async def mark_delivered(self, delivery_id: int, owner: str, message_id: str | None, now: float) -> bool:
        """A claimed delivery was posted: it becomes sent (never posted again). False when `owner` no
        longer holds the claim or it was already sent."""

    @abc.abstractmethod
    async def retry_delivery(
        self, delivery_id: int, owner: str, error: str, next_at: float, max_attempts: int
    ) -> DeliveryState | None:
        """A claimed delivery failed: count the attempt, release the claim, try again at `next_at`, or
        give up (dead) after `max_attempts`. The new state, or None when `owner` lost the claim."""

    @abc.abstractmethod
    async def deliveries(self, job_id: str) -> list[Delivery]:
        """Every delivery of a job, oldest first."""

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
    def lock(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """An exclusive lock named `name`, held across every process using this store (the edits of one
        chat's story take "story:<chat>", so any number of processes keep its document consistent)."""

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


def claimable(status: JobStatus, lease_until: float | None, now: float) -> bool:
    """A job can start a new attempt when queued, or when running under a lease that has expired."""
    return status == JobStatus.QUEUED or (status == JobStatus.RUNNING and (lease_until or 0.0) < now)


def quota_or_pending(job: Job, used: int, pending: int, daily_quota: int, max_pending: int) -> str | None:
    """Why `admit_job` refuses a job ("quota", "pending"), or None to admit it."""
    if used + job.request.n > daily_quota:
        return "quota"
    if pending >= max_pending:
        return "pending"
    return None


def check_changes(changes: object) -> None:
    """`update_settings`' argument must map names to values."""
    if not isinstance(changes, dict) or not all(isinstance(key, str) for key in changes):
        raise InvalidOption("Settings changes must map names to values.")


def merge_settings(current: dict[str, Any], changes: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """`current` with `changes` applied (a None value deletes its key), and that as JSON text."""
    merged = dict(current)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    try:
        return merged, json.dumps(merged, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidOption("Settings values must be text, numbers, booleans, lists or maps.") from err
