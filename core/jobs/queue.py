"""The job queue port, its fairness rules, and the in-process implementation.

Fairness, shared by every implementation:
- each user's jobs leave in the order they were put (FIFO per user);
- users take turns: the users with waiting jobs form a rotation (a user joins at the end when their
  first job arrives); `get()` serves the first user in the rotation who has fewer than
  `user_concurrency` jobs running, then moves that user to the end of the rotation;
- `put()` refuses a job when `max_size` jobs are already waiting (QueueFull) or when the user already
  has `user_max_pending` jobs waiting or running (TooManyJobs).

Positions ("you are number 3") follow the order `get()` would hand jobs out if nobody finished: round
k holds every user's k-th waiting job, users free to run first, then users at their concurrency
limit, each group in rotation order. Position 1 is always what the next `get()` returns.

`close()` wakes every blocked `get()` with `QueueClosed`; later `put()`/`get()` calls raise it too.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence

from core.errors import HuahuaError, InvalidOption, QueueFull, TooManyJobs
from core.types import Job

logger = logging.getLogger(__name__)


class QueueClosed(HuahuaError):
    """The queue was closed while waiting, or is used after `close()`."""

    code = "queue_closed"

    def __init__(self, message: str = "The queue is shutting down; please try again in a moment.") -> None:
        super().__init__(message)


class JobQueue(abc.ABC):
    """A fair queue of jobs between users; see the module docstring for the rules."""

    @abc.abstractmethod
    async def put(self, job: Job) -> int:
        """Queue a job; returns its 1-based position. Raises QueueFull, TooManyJobs or QueueClosed.

        Putting a job whose id is already waiting returns its position without adding it twice;
        a job already handed out (running, or awaiting reclaim after a crash) returns 1.
        """

    @abc.abstractmethod
    async def holding(self, job_ids: Sequence[str]) -> set[str]:
        """Those of `job_ids` that are waiting or handed out: the ones `put` would not add again."""

    @abc.abstractmethod
    async def get(self) -> Job:
        """Wait for the next job by the fairness rules; raises QueueClosed when the queue closes."""

    @abc.abstractmethod
    async def task_done(self, job_id: str) -> None:
        """A job from `get()` finished (any outcome): free its user's slot. Unknown ids are ignored."""

    @abc.abstractmethod
    async def release(self, job: Job) -> None:
        """Give back a job from `get()` that did not finish (its worker is stopping): its user's running
        slot is freed and the job waits again, first in its user's lane. Unknown ids are ignored."""

    @abc.abstractmethod
    async def remove(self, job_id: str) -> bool:
        """Cancel a waiting job; True if it was waiting."""

    @abc.abstractmethod
    async def position(self, job_id: str) -> int | None:
        """1-based position of a waiting job; None if it is not waiting."""

    @abc.abstractmethod
    async def positions(self) -> dict[str, int]:
        """Positions of all waiting jobs."""

    @abc.abstractmethod
    async def size(self) -> int:
        """Number of waiting jobs."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop: wake blocked getters with QueueClosed."""


def check_limits(max_size: int, user_max_pending: int, user_concurrency: int) -> None:
    for name, value in (
        ("max_size", max_size),
        ("user_max_pending", user_max_pending),
        ("user_concurrency", user_concurrency),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidOption(
                f"The queue setting {name} must be a whole number of at least 1, not {value!r}."
            )


def queue_full(max_size: int) -> QueueFull:
    return QueueFull(f"The queue is full ({max_size} pictures waiting); please try again in a few minutes.")


def too_many_jobs(user_max_pending: int) -> TooManyJobs:
    return TooManyJobs(
        f"You already have {user_max_pending} pictures waiting or drawing; please wait for one to finish."
    )


def fair_order(lanes: Iterable[tuple[bool, Sequence[str]]]) -> list[str]:
    """Job ids in hand-out order, from (user at concurrency limit, waiting ids FIFO) in rotation order."""
    keyed = [
        ((index, blocked, turn), job_id)
        for turn, (blocked, job_ids) in enumerate(lanes)
        for index, job_id in enumerate(job_ids)
    ]
    keyed.sort()
    return [job_id for _, job_id in keyed]


class MemoryQueue(JobQueue):
    """In-process queue: one ordered dict of per-user deques is the rotation. Every operation is O(users)."""

    def __init__(self, max_size: int, user_max_pending: int, user_concurrency: int) -> None:
        check_limits(max_size, user_max_pending, user_concurrency)
        self.max_size = max_size
        self.user_max_pending = user_max_pending
        self.user_concurrency = user_concurrency
        self._lanes: OrderedDict[str, deque[Job]] = OrderedDict()
        self._waiting: dict[str, str] = {}
        self._running: dict[str, str] = {}
        self._running_count: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._changed = asyncio.Condition()
        self._closed = False

    async def put(self, job: Job) -> int:
        if self._closed:
            raise QueueClosed()
        if job.id in self._running:
            return 1
        if job.id not in self._waiting:
            if len(self._waiting) >= self.max_size:
                raise queue_full(self.max_size)
            if self._pending[job.user] >= self.user_max_pending:
                raise too_many_jobs(self.user_max_pending)
            self._lanes.setdefault(job.user, deque()).append(job)
            self._waiting[job.id] = job.user
            self._pending[job.user] += 1
        position = await self.position(job.id)  # before waking getters, who may take the job
        await self._notify()
        return position or 1

    async def holding(self, job_ids: Sequence[str]) -> set[str]:
        return {job_id for job_id in job_ids if job_id in self._waiting or job_id in self._running}

    async def get(self) -> Job:
        async with self._changed:
            while True:
                if self._closed:
                    raise QueueClosed()
                job = self._take()
                if job is not None:
                    return job
                await self._changed.wait()

    def _take(self) -> Job | None:
        for user, lane in self._lanes.items():
            if self._running_count[user] >= self.user_concurrency:
                continue
            job = lane.popleft()
            if lane:
                self._lanes.move_to_end(user)
            else:
                del self._lanes[user]
            del self._waiting[job.id]
            self._running[job.id] = user
            self._running_count[user] += 1
            return job
        return None

    async def task_done(self, job_id: str) -> None:
        user = self._running.pop(job_id, None)
        if user is None:
            logger.debug("task_done for job %s, which was not running", job_id)
            return
        self._decrement(self._running_count, user)
        self._decrement(self._pending, user)
        await self._notify()

    async def release(self, job: Job) -> None:
        user = self._running.pop(job.id, None)
        if user is None:
            return
        self._decrement(self._running_count, user)
        lane = self._lanes.get(user)
        if lane is None:
            lane = self._lanes[user] = deque()
            self._lanes.move_to_end(user, last=False)
        lane.appendleft(job)
        self._waiting[job.id] = user
        await self._notify()

    async def remove(self, job_id: str) -> bool:
        user = self._waiting.pop(job_id, None)
        if user is None:
            return False
        lane = self._lanes[user]
        for job in lane:
            if job.id == job_id:
                lane.remove(job)
                break
        if not lane:
            del self._lanes[user]
        self._decrement(self._pending, user)
        return True

    async def position(self, job_id: str) -> int | None:
        user = self._waiting.get(job_id)
        if user is None:
            return None
        index = next(i for i, job in enumerate(self._lanes[user]) if job.id == job_id)
        lanes = list(self._lanes.items())
        turn = next(t for t, (other, _) in enumerate(lanes) if other == user)
        key = (self._blocked(user), turn)
        ahead = 0
        for t, (other, lane) in enumerate(lanes):
            ahead += min(len(lane), index)
            if len(lane) > index and (self._blocked(other), t) < key:
                ahead += 1
        return ahead + 1

    async def positions(self) -> dict[str, int]:
        lanes = [(self._blocked(user), [job.id for job in lane]) for user, lane in self._lanes.items()]
        return {job_id: place for place, job_id in enumerate(fair_order(lanes), start=1)}

    async def size(self) -> int:
        return len(self._waiting)

    async def close(self) -> None:
        self._closed = True
        await self._notify()

    def _blocked(self, user: str) -> bool:
        return self._running_count[user] >= self.user_concurrency

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @staticmethod
    def _decrement(counter: Counter[str], user: str) -> None:
        counter[user] -= 1
        if counter[user] <= 0:
            del counter[user]
