"""The job queue on Redis Streams, shared by several processes, with the same contract as MemoryQueue.

Layout (every key starts with `<name>:`, so several queues can share one Redis):
- `u:<user>`    a stream per user holding that user's waiting jobs (fields `id`, `job` = job JSON);
- `rotation`    a list of users with waiting jobs, in turn order (the fairness rotation);
- `dispatch`    a stream with consumer group `workers`: a job handed out by `get()` is moved here
                and read into the group in the same step, so it sits in the consumer's pending
                entries list until `task_done()` acknowledges and deletes it;
- `entry`, `owner`, `inflight` hashes: job id -> waiting entry id / user / dispatch entry id;
- `running`, `pending` hashes: user -> jobs running / waiting+running; `waiting` a counter.

Every change runs as one Lua script, so limits, rotation and counters stay consistent between
processes. Worker crash: a handed-out job stays pending in the group; live queues refresh their own
entries' idle time every `claim_idle_s / 3` seconds, and `get()` first takes over (XAUTOCLAIM) any entry
idle longer than `claim_idle_s`, i.e. one whose worker died. The crashed job keeps its user's slot until
it is finished. `get()` polls (local puts wake it at once; other processes' puts within `max_poll_s`).
Needs Redis 6.2 or later, standalone (scripts touch keys derived from user ids).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from core.codec import job_from_json, job_to_json
from core.errors import ServiceUnavailable, StorageError
from core.jobs.queue import JobQueue, QueueClosed, check_limits, fair_order, queue_full, too_many_jobs
from core.types import Job

logger = logging.getLogger(__name__)

T = TypeVar("T")
GROUP = "workers"
HOLDING_BATCH = 1000
"""Job ids per HMGET in `holding` (one command never grows with the whole queue)."""

_POSITION = """
local function running(p, user)
  return tonumber(redis.call('HGET', p .. ':running', user) or '0')
end

local function position(p, id, conc)
  local eid = redis.call('HGET', p .. ':entry', id)
  if not eid then return 0 end
  local user = redis.call('HGET', p .. ':owner', id)
  local index = #redis.call('XRANGE', p .. ':u:' .. user, '-', '(' .. eid)
  local rotation = redis.call('LRANGE', p .. ':rotation', 0, -1)
  local lens, blocked, mine = {}, {}, 0
  for turn, other in ipairs(rotation) do
    lens[turn] = redis.call('XLEN', p .. ':u:' .. other)
    blocked[turn] = (running(p, other) >= conc) and 1 or 0
    if other == user then mine = turn end
  end
  local ahead = 0
  for turn = 1, #rotation do
    ahead = ahead + math.min(lens[turn], index)
    if lens[turn] > index and (blocked[turn] < blocked[mine]
        or (blocked[turn] == blocked[mine] and turn < mine)) then
      ahead = ahead + 1
    end
  end
  return ahead + 1
end
"""

_PUT = (
    _POSITION
    + """
local p, user, id, job = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max_size, max_pending, conc = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if redis.call('HEXISTS', p .. ':owner', id) == 1 then
  if redis.call('HEXISTS', p .. ':entry', id) == 0 then return {0, 1} end
  return {0, position(p, id, conc)}
end
if tonumber(redis.call('GET', p .. ':waiting') or '0') >= max_size then return {-1, 0} end
if tonumber(redis.call('HGET', p .. ':pending', user) or '0') >= max_pending then return {-2, 0} end
local stream = p .. ':u:' .. user
local eid = redis.call('XADD', stream, '*', 'id', id, 'job', job)
redis.call('HSET', p .. ':entry', id, eid)
redis.call('HSET', p .. ':owner', id, user)
redis.call('INCR', p .. ':waiting')
redis.call('HINCRBY', p .. ':pending', user, 1)
if redis.call('XLEN', stream) == 1 then redis.call('RPUSH', p .. ':rotation', user) end
return {1, position(p, id, conc)}
"""
)

_DISPATCH = """
local p, consumer, conc, group = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local rotation = redis.call('LRANGE', p .. ':rotation', 0, -1)
for _, user in ipairs(rotation) do
  if tonumber(redis.call('HGET', p .. ':running', user) or '0') < conc then
    local stream = p .. ':u:' .. user
    local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
    redis.call('LREM', p .. ':rotation', 1, user)
    if head then
      local fields = {}
      for i = 1, #head[2], 2 do fields[head[2][i]] = head[2][i + 1] end
      redis.call('XDEL', stream, head[1])
      if redis.call('XLEN', stream) > 0 then
        redis.call('RPUSH', p .. ':rotation', user)
      else
        redis.call('DEL', stream)
      end
      redis.call('HDEL', p .. ':entry', fields.id)
      redis.call('DECR', p .. ':waiting')
      redis.call('HINCRBY', p .. ':running', user, 1)
      local did = redis.call('XADD', p .. ':dispatch', '*', 'id', fields.id, 'job', fields.job)
      redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', p .. ':dispatch', '>')
      redis.call('HSET', p .. ':inflight', fields.id, did)
      return {fields.id, did, fields.job}
    end
  end
end
return false
"""

_DONE = """
local p, id, group = ARGV[1], ARGV[2], ARGV[3]
local did = redis.call('HGET', p .. ':inflight', id)
if not did then return 0 end
local user = redis.call('HGET', p .. ':owner', id)
redis.call('XACK', p .. ':dispatch', group, did)
redis.call('XDEL', p .. ':dispatch', did)
redis.call('HDEL', p .. ':inflight', id)
redis.call('HDEL', p .. ':owner', id)
if user then
  if redis.call('HINCRBY', p .. ':running', user, -1) <= 0 then redis.call('HDEL', p .. ':running', user) end
  if redis.call('HINCRBY', p .. ':pending', user, -1) <= 0 then redis.call('HDEL', p .. ':pending', user) end
end
return 1
"""

_RELEASE = """
local p, id, job, group = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local did = redis.call('HGET', p .. ':inflight', id)
if not did then return 0 end
local user = redis.call('HGET', p .. ':owner', id)
redis.call('XACK', p .. ':dispatch', group, did)
redis.call('XDEL', p .. ':dispatch', did)
redis.call('HDEL', p .. ':inflight', id)
if not user then return 0 end
if redis.call('HINCRBY', p .. ':running', user, -1) <= 0 then redis.call('HDEL', p .. ':running', user) end
local stream = p .. ':u:' .. user
-- first in its user's line: a stream only appends, so write it anew, the released job first
local later = redis.call('XRANGE', stream, '-', '+')
redis.call('DEL', stream)
redis.call('HSET', p .. ':entry', id, redis.call('XADD', stream, '*', 'id', id, 'job', job))
for _, entry in ipairs(later) do
  local fields = {}
  for i = 1, #entry[2], 2 do fields[entry[2][i]] = entry[2][i + 1] end
  local eid = redis.call('XADD', stream, '*', 'id', fields.id, 'job', fields.job)
  redis.call('HSET', p .. ':entry', fields.id, eid)
end
redis.call('INCR', p .. ':waiting')
if #later == 0 then redis.call('LPUSH', p .. ':rotation', user) end
return 1
"""

_REMOVE = """
local p, id = ARGV[1], ARGV[2]
local eid = redis.call('HGET', p .. ':entry', id)
if not eid then return 0 end
local user = redis.call('HGET', p .. ':owner', id)
local stream = p .. ':u:' .. user
redis.call('XDEL', stream, eid)
if redis.call('XLEN', stream) == 0 then
  redis.call('DEL', stream)
  redis.call('LREM', p .. ':rotation', 1, user)
end
redis.call('HDEL', p .. ':entry', id)
redis.call('HDEL', p .. ':owner', id)
redis.call('DECR', p .. ':waiting')
if redis.call('HINCRBY', p .. ':pending', user, -1) <= 0 then redis.call('HDEL', p .. ':pending', user) end
return 1
"""

_POSITION_OF = _POSITION + "\nreturn position(ARGV[1], ARGV[2], tonumber(ARGV[3]))\n"

_REFRESH = """
local p, consumer, group = ARGV[1], ARGV[2], ARGV[3]
local kept = {}
for i = 4, #ARGV do
  local entry = redis.call('XPENDING', p .. ':dispatch', group, ARGV[i], ARGV[i], 1)[1]
  if entry and entry[2] == consumer then
    redis.call('XCLAIM', p .. ':dispatch', group, consumer, 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""

_SNAPSHOT = """
local p, conc = ARGV[1], tonumber(ARGV[2])
local lanes = {}
for _, user in ipairs(redis.call('LRANGE', p .. ':rotation', 0, -1)) do
  local ids = {}
  for _, entry in ipairs(redis.call('XRANGE', p .. ':u:' .. user, '-', '+')) do
    for i = 1, #entry[2], 2 do
      if entry[2][i] == 'id' then ids[#ids + 1] = entry[2][i + 1] end
    end
  end
  local blocked = tonumber(redis.call('HGET', p .. ':running', user) or '0') >= conc and 1 or 0
  lanes[#lanes + 1] = {blocked, ids}
end
return lanes
"""


class RedisStreamsQueue(JobQueue):
    """Fair job queue in Redis; call `await connect()` before use and `await close()` after."""

    def __init__(
        self,
        url: str,
        *,
        max_size: int,
        user_max_pending: int,
        user_concurrency: int,
        name: str = "huahua",
        consumer: str | None = None,
        claim_idle_s: float = 30.0,
        max_poll_s: float = 1.0,
    ) -> None:
        check_limits(max_size, user_max_pending, user_concurrency)
        self.max_size = max_size
        self.user_max_pending = user_max_pending
        self.user_concurrency = user_concurrency
        self.name = name
        self.consumer = consumer or f"huahua-{uuid.uuid4().hex[:12]}"
        self.claim_idle_s = claim_idle_s
        self.max_poll_s = max_poll_s
        self._url = url
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._inflight: dict[str, str] = {}
        self._handoff: list[Job] = []
        self._wakeup = asyncio.Event()
        self._closed = False
        self._heartbeat: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Open the connection pool, check Redis answers and create the consumer group."""
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url, max_connections=16, timeout=20, socket_connect_timeout=5, decode_responses=True
        )
        self._client = aioredis.Redis.from_pool(pool)
        for key, source in (
            ("put", _PUT),
            ("dispatch", _DISPATCH),
            ("done", _DONE),
            ("remove", _REMOVE),
            ("release", _RELEASE),
            ("position", _POSITION_OF),
            ("snapshot", _SNAPSHOT),
            ("refresh", _REFRESH),
        ):
            self._scripts[key] = self._client.register_script(source)
        try:
            await self._call(self._client.ping())
            await self._ensure_group()
        except BaseException:
            await self._client.aclose()
            raise
        self._heartbeat = asyncio.create_task(self._keep_alive(), name=f"{self.name}-queue-heartbeat")
        logger.info("redis queue %r connected as consumer %s", self.name, self.consumer)

    async def put(self, job: Job) -> int:
        self._check_open()
        status, position = await self._run(
            "put",
            job.user,
            job.id,
            job_to_json(job),
            self.max_size,
            self.user_max_pending,
            self.user_concurrency,
        )
        if status == -1:
            raise queue_full(self.max_size)
        if status == -2:
            raise too_many_jobs(self.user_max_pending)
        self._wakeup.set()
        return int(position)

    async def holding(self, job_ids: Sequence[str]) -> set[str]:
        # `owner` names every job from its put until its task_done, waiting or handed out
        held: set[str] = set()
        client = self._require_client()
        for start in range(0, len(job_ids), HOLDING_BATCH):
            batch = list(job_ids[start : start + HOLDING_BATCH])
            owners = await self._call(client.hmget(self._key("owner"), batch))
            held.update(job_id for job_id, owner in zip(batch, owners, strict=True) if owner is not None)
        return held

    async def get(self) -> Job:
        delay = 0.02
        while True:
            self._check_open()
            self._wakeup.clear()
            if self._handoff:
                return self._handoff.pop(0)
            fetch = asyncio.ensure_future(self._next_job())
            try:
                job = await asyncio.shield(fetch)
            except asyncio.CancelledError:
                # the script may already have handed us a job: keep it for the next get()
                fetch.add_done_callback(self._keep_for_later)
                raise
            except ServiceUnavailable:
                if self._closed:
                    raise QueueClosed() from None
                raise
            if job is not None:
                return job
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=delay)
            except TimeoutError:
                delay = min(delay * 2, self.max_poll_s)

    def _keep_for_later(self, fetch: asyncio.Future[Job | None]) -> None:
        if not fetch.cancelled() and fetch.exception() is None and (job := fetch.result()) is not None:
            self._handoff.append(job)

    async def _next_job(self) -> Job | None:
        """A reclaimed job, else the next fair one; None if nothing can run now."""
        while True:
            found = await self._reclaim()
            if found is None:
                found = await self._run("dispatch", self.consumer, self.user_concurrency, GROUP)
            if not found:
                return None
            job_id, dispatch_id, payload = found
            self._inflight[job_id] = dispatch_id
            try:
                return job_from_json(payload)
            except StorageError:
                logger.error("dropped queue entry %s: its job record is corrupt", dispatch_id)
                await self.task_done(job_id)
                await self._call(self._require_client().xack(self._key("dispatch"), GROUP, dispatch_id))

    async def _reclaim(self) -> tuple[str, str, str] | None:
        """Take over one handed-out job whose worker stopped refreshing it (crashed)."""
        client = self._require_client()
        reply = await self._call(
            client.xautoclaim(
                self._key("dispatch"), GROUP, self.consumer, int(self.claim_idle_s * 1000), "0-0", count=1
            )
        )
        for dispatch_id, fields in reply[1]:
            if fields:
                logger.warning("reclaimed job %s from a worker that stopped", fields.get("id"))
                return fields.get("id", ""), dispatch_id, fields.get("job", "")
        return None

    async def task_done(self, job_id: str) -> None:
        self._inflight.pop(job_id, None)
        if await self._run("done", job_id, GROUP):
            self._wakeup.set()
        else:
            logger.debug("task_done for job %s, which was not handed out", job_id)

    async def release(self, job: Job) -> None:
        """Back into its user's stream, first in line (the stream is written anew: streams only append)."""
        self._inflight.pop(job.id, None)
        if await self._run("release", job.id, job_to_json(job), GROUP):
            self._wakeup.set()

    async def remove(self, job_id: str) -> bool:
        return bool(await self._run("remove", job_id))

    async def position(self, job_id: str) -> int | None:
        position = int(await self._run("position", job_id, self.user_concurrency))
        return position or None

    async def positions(self) -> dict[str, int]:
        lanes = await self._run("snapshot", self.user_concurrency)
        order = fair_order((bool(blocked), list(ids)) for blocked, ids in lanes)
        return {job_id: place for place, job_id in enumerate(order, start=1)}

    async def size(self) -> int:
        value = await self._call(self._require_client().get(self._key("waiting")))
        return int(value or 0)

    async def close(self) -> None:
        """Wake local getters with QueueClosed and drop the connections; handed-out jobs stay pending."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await asyncio.sleep(0)
        if self._client is not None:
            await self._client.aclose()

    async def _keep_alive(self) -> None:
        """Reset the idle time of this consumer's handed-out jobs so no other worker claims them."""
        interval = max(self.claim_idle_s / 3, 0.01)
        while True:
            await asyncio.sleep(interval)
            ids = list(self._inflight.values())
            if not ids:
                continue
            try:
                kept = set(await self._run("refresh", self.consumer, GROUP, *ids))
            except ServiceUnavailable:
                continue
            for job_id, dispatch_id in list(self._inflight.items()):
                if dispatch_id in ids and dispatch_id not in kept:
                    logger.warning("running job %s was taken over by another worker", job_id)
                    self._inflight.pop(job_id, None)

    def _check_open(self) -> None:
        if self._closed:
            raise QueueClosed()

    def _key(self, suffix: str) -> str:
        return f"{self.name}:{suffix}"

    def _require_client(self) -> aioredis.Redis:
        if self._client is None:
            raise ServiceUnavailable("The job queue is not connected yet.")
        return self._client

    async def _run(self, script: str, *args: Any) -> Any:
        self._require_client()
        return await self._call(self._scripts[script](keys=[], args=[self.name, *args]))

    async def _ensure_group(self) -> None:
        """Create the dispatch stream's consumer group (again, after a Redis that lost its data)."""
        try:
            await self._require_client().xgroup_create(self._key("dispatch"), GROUP, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise ServiceUnavailable("Redis refused to set up the job queue.") from err

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (RedisError, OSError) as err:
            logger.warning("redis queue call failed: %s", type(err).__name__)
            if isinstance(err, ResponseError) and "NOGROUP" in str(err):
                logger.warning(
                    "redis queue %r lost its consumer group (an empty Redis?); recreating", self.name
                )
                await self._ensure_group()
            raise ServiceUnavailable(
                "The job queue (Redis) cannot be reached right now; please try again later."
            ) from err
