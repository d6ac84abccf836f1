"""The chaos scenario of issue 13: a real fleet loses processes and Redis while it works, and nothing is lost
or posted twice.

Real parts only: a redis-server this module starts (no persistence, so its restart loses every key), a
throwaway PostgreSQL cluster (`tests/pg_server.py`), moto's S3 server (`tests/s3_server.py`), and the fake
Telegram Bot API (`tests/fake_telegram.py`) in this process on loopback. The fleet is four OS processes
running the real CLI: `huahua web` and `huahua serve` (the web chat, and Telegram polling the fake) with
`HUAHUA_WORKERS=0`, and two `huahua jobs` with the tiny engine and a short job lease.

Web users post `/imagine` through `POST /api/messages` (one aiohttp session with its own cookie jar per
user, alternating between the two front processes); Telegram users write to the fake. Meanwhile a random
`huahua jobs` process that holds a running job is SIGKILLed every `kill_every_s` and started again, one is
stopped with SIGTERM instead (its job must go back to the queue), and Redis is restarted once, empty.

`run_chaos` returns a `ChaosReport`: the numbers (jobs, kills, reclaim latencies, end-to-end time) and
`problems`, one sentence per broken promise, read from PostgreSQL, the S3 bucket and the fake's calls:
every accepted job done, none left queued or running, each Telegram picture posted exactly once, no user
above the daily quota and every user refused exactly at it, every picture in the bucket, at most one
`done` event per job on the event channel. `tests/test_chaos.py` runs it at 200 jobs; `bench/chaos.py`
at 1,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
QUEUE_CHANNEL = "huahua:0:events"
"""The event relay's channel for the default queue name and database 0 (core/redis_events.py)."""
OWNER = re.compile(r"-(\d+)-[0-9a-f]{6}$")
"""The pid inside a process's lease owner name (`process_owner()`: host-pid-random)."""
RESULT_FILE = re.compile(r"huahua-(.+)\.png$")
"""The file name the Telegram adapter gives a result picture: huahua-<job id>.png."""
PROMPTS = ("一只猫", "a red fox in the snow", "山水画 日落", "a lighthouse at night", "竹林里的熊猫")
QUOTA_STEPS = (-2, 0, 2, 0)
"""Each web user asks for the quota plus one of these: some stay below it, some reach it exactly, some
ask two more and must be refused exactly twice."""
READY = {
    "web": ("web chat on http", "started with engine"),
    "serve": ("web chat on http", "started with engine", "telegram long polling"),
    "jobs": ("started with engine",),
}

logger = logging.getLogger(__name__)


def missing_parts() -> str | None:
    """One sentence naming what this machine lacks for the scenario, or None."""
    from tests.pg_server import MISSING, find_bindir

    if not Path(REDIS_SERVER).exists():
        return "the chaos scenario needs redis-server (Debian package redis-server)"
    if find_bindir() is None:
        return f"the chaos scenario {MISSING}"
    for module, package in (
        ("moto.server", "moto[server]"),
        ("asyncpg", "asyncpg"),
        ("mindspore", "mindspore"),
    ):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            return f"the chaos scenario needs {package} (pip install -e '.[dev]')"
    return None


@dataclass(frozen=True)
class ChaosConfig:
    jobs: int = 200
    """Web /imagine requests in all (some are refused by the daily quota, on purpose)."""
    users: int = 20
    telegram_users: int = 4
    telegram_jobs: int = 20
    """Telegram /imagine requests in all, below the quota, all sent before Redis restarts."""
    kill_every_s: float = 5.0
    lease_s: float = 3.0
    steps: int = 2
    workers: int = 1
    """Workers per `huahua jobs` process."""
    sigterm_at_kill: int = 2
    """The chaos event with this index (0-based) is a SIGTERM instead of a SIGKILL."""
    redis_restart_after_s: float = 10.0
    """Seconds after the first request (and once every Telegram job is stored) Redis restarts, empty."""
    deadline_s: float = 150.0
    """From the first request until every job must have ended."""
    seed: int | None = None

    @property
    def quota(self) -> int:
        return max(3, self.jobs // self.users)

    def asks(self) -> list[int]:
        """How many /imagine each web user sends: the quota plus QUOTA_STEPS in turn, summing to `jobs`."""
        counts = [max(1, self.quota + QUOTA_STEPS[i % len(QUOTA_STEPS)]) for i in range(self.users)]
        index = 0
        while sum(counts) != self.jobs:
            step = 1 if sum(counts) < self.jobs else -1
            if counts[index % self.users] + step >= 1:
                counts[index % self.users] += step
            index += 1
        return counts


@dataclass
class Kill:
    """One chaos event on a `huahua jobs` process and the jobs it left behind."""

    at: float
    pid: int
    signal: str
    orphans: dict[str, int] = field(default_factory=dict)
    """Job id -> its attempt number that was running in the process when it died."""
    resumed: dict[str, float] = field(default_factory=dict)
    """Job id -> seconds from the signal until its next attempt started."""
    gave_back: bool | None = None
    """SIGTERM only: once the process ended, its job was back in the queue (not running under its lease)."""
    exit_code: int | None = None


@dataclass
class WebUser:
    """One browser's requests and what the web API answered."""

    user: str
    asked: int
    accepted: list[str] = field(default_factory=list)
    """Ids of the jobs the API accepted."""
    quota_refused: int = 0


@dataclass
class ChaosReport:
    config: ChaosConfig
    seed: int
    web_users: list[WebUser] = field(default_factory=list)
    web_accepted: int = 0
    web_quota_refused: int = 0
    web_retries: int = 0
    """Requests answered 503 (Redis or the database away) and sent again."""
    telegram_retries: int = 0
    telegram_jobs: int = 0
    done: int = 0
    kills: list[Kill] = field(default_factory=list)
    redis_restarts: int = 0
    first_request_at: float = 0.0
    all_done_at: float = 0.0
    photos: int = 0
    problems: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    """Processes that ended without a signal from the scenario (started again at once)."""
    log_dir: Path | None = None

    @property
    def reclaims(self) -> list[float]:
        return [s for k in self.kills if k.signal == "SIGKILL" for s in k.resumed.values()]

    @property
    def end_to_end_s(self) -> float:
        return max(0.0, self.all_done_at - self.first_request_at)

    @property
    def throughput(self) -> float:
        return self.done / self.end_to_end_s if self.end_to_end_s else 0.0

    def lines(self) -> list[str]:
        reclaims = self.reclaims
        sigkills = sum(1 for k in self.kills if k.signal == "SIGKILL")
        handbacks = [s for k in self.kills if k.signal == "SIGTERM" for s in k.resumed.values()]
        lines = [
            f"seed {self.seed}; jobs: {self.done} done "
            f"({self.web_accepted} web, {self.telegram_jobs} Telegram); "
            f"{self.web_quota_refused} refused by the daily quota of {self.config.quota}; "
            f"{self.web_retries} web and {self.telegram_retries} Telegram requests sent again after "
            "'try again' (Redis or the database away)",
            f"chaos: {sigkills} SIGKILLs, {len(self.kills) - sigkills} SIGTERM, "
            f"{self.redis_restarts} Redis restart",
            f"Telegram pictures posted: {self.photos}",
        ]
        if reclaims:
            lines.append(
                f"reclaim after SIGKILL ({len(reclaims)} jobs): median {statistics.median(reclaims):.2f} s, "
                f"longest {max(reclaims):.2f} s"
            )
        if handbacks:
            lines.append(f"next attempt after SIGTERM: {max(handbacks):.2f} s")
        slow = [
            f"{k.signal} at {time.strftime('%H:%M:%S', time.localtime(k.at))}: job {job_id} {seconds:.1f} s"
            for k in self.kills
            for job_id, seconds in k.resumed.items()
            if seconds > 3 * self.config.lease_s + 5
        ]
        if slow:
            lines.append("slow to come back: " + "; ".join(slow))
        waiting = [f"{k.signal} job {j}" for k in self.kills for j in k.orphans if j not in k.resumed]
        if waiting:
            lines.append("never came back: " + "; ".join(waiting))
        lines.append(f"end to end: {self.end_to_end_s:.1f} s, throughput {self.throughput:.2f} jobs/s")
        lines.extend(f"unexpected exit: {line}" for line in self.unexpected_exits)
        lines.extend(f"PROBLEM: {problem}" for problem in self.problems)
        return lines


# servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server without persistence on a fixed loopback port: `restart()` comes back empty."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited early with code {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start in time")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        """Kill the server and start an empty one on the same port."""
        self.stop(signal.SIGKILL)
        self.start()


# the fleet -------------------------------------------------------------------------------------


class Member:
    """One `huahua` process of the fleet, restartable; its output goes to one log file."""

    def __init__(self, name: str, command: str, env: dict[str, str], root: Path) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.cwd = root / name
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log = root / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self.starts = 0

    def start(self) -> None:
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            out.write(f"---- start {self.starts + 1} ----\n".encode())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bots.cli", self.command],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        if not self.alive():
            return False
        with self.log.open("rb") as log:
            log.seek(self._log_start)
            text = log.read().decode(errors="replace")
        return all(marker in text for marker in READY[self.command])

    async def wait_ready(self, timeout: float = 90.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start within {timeout:.0f} s: {self.tail()}")
            await asyncio.sleep(0.2)

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int | None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:  # noqa: ASYNC110 (a child process, no event)
            await asyncio.sleep(0.05)
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def tail(self, lines: int = 25) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def fleet_env(
    config: ChaosConfig, redis_url: str, database_url: str, s3: Any, bucket: str, web_secret: str
) -> dict[str, str]:
    """The settings every process shares (HUAHUA_* from the caller's environment are left out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUAHUA_", "AWS_"))}
    env.update(
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        AWS_EC2_METADATA_DISABLED="true",
        HUAHUA_ENGINE="tiny",
        HUAHUA_TINY_IMAGE_AREA=str(64 * 64),
        HUAHUA_GRAPH_MODE="false",
        HUAHUA_QUEUE="redis",
        HUAHUA_REDIS_URL=redis_url,
        HUAHUA_DATABASE_URL=database_url,
        HUAHUA_DATABASE_POOL_SIZE="4",
        HUAHUA_IMAGE_STORE=f"s3://{bucket}/chaos",
        HUAHUA_S3_ENDPOINT_URL=s3.endpoint_url,
        HUAHUA_S3_REGION="us-east-1",
        HUAHUA_S3_ACCESS_KEY_ID=s3.access_key_id,
        HUAHUA_S3_SECRET_ACCESS_KEY=s3.secret_access_key,
        HUAHUA_S3_ADDRESSING_STYLE="path",
        HUAHUA_JOB_LEASE_S=str(config.lease_s),
        HUAHUA_SHUTDOWN_GRACE_S="5",
        HUAHUA_DAILY_IMAGE_QUOTA=str(config.quota),
        HUAHUA_USER_MAX_PENDING=str(config.quota + 2),
        HUAHUA_QUEUE_MAX_SIZE=str(max(1000, 2 * (config.jobs + config.telegram_jobs))),
        HUAHUA_WEB_SECRET=web_secret,
        HUAHUA_LOG_LEVEL="INFO",
    )
    return env


# the scenario ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _servers(root: Path) -> Iterator[tuple[RedisServer, Any, Any]]:
    from tests.pg_server import start_cluster
    from tests.s3_server import running_moto

    redis = RedisServer(root / "redis")
    redis.directory.mkdir()
    redis.start()
    try:
        cluster = start_cluster()
        try:
            with running_moto() as s3:
                yield redis, cluster, s3
        finally:
            cluster.stop()
    finally:
        redis.stop()


async def run_chaos(config: ChaosConfig, *, keep_logs: Path | None = None) -> ChaosReport:
    """Run the whole scenario and return what was seen; the caller decides what to assert or print."""
    seed = config.seed if config.seed is not None else secrets.randbelow(1_000_000)
    report = ChaosReport(config, seed)
    root = Path(tempfile.mkdtemp(prefix="huahua-chaos-"))
    try:
        with _servers(root) as (redis, cluster, s3):
            await _run(config, report, random.Random(seed), root, redis, cluster, s3)
    finally:
        if keep_logs is not None:
            await asyncio.to_thread(_copy_logs, root, keep_logs)
            report.log_dir = keep_logs
        shutil.rmtree(root, ignore_errors=True)
    return report


async def _run(
    config: ChaosConfig,
    report: ChaosReport,
    rng: random.Random,
    root: Path,
    redis: RedisServer,
    cluster: Any,
    s3: Any,
) -> None:
    import asyncpg

    from tests.fake_telegram import FakeTelegram

    bucket = s3.create_bucket()
    database_url = cluster.url()
    fake = FakeTelegram()
    await fake.start()
    env = fleet_env(config, redis.url, database_url, s3, bucket, secrets.token_hex(32))
    ports = [free_port(), free_port()]
    front = [
        Member("web", "web", {**env, "HUAHUA_WORKERS": "0", "HUAHUA_WEB_PORT": str(ports[0])}, root),
        Member(
            "serve",
            "serve",
            {
                **env,
                "HUAHUA_WORKERS": "0",
                "HUAHUA_WEB_PORT": str(ports[1]),
                "HUAHUA_TELEGRAM_TOKEN": fake.token,
                "HUAHUA_TELEGRAM_BASE_URL": fake.root,
            },
            root,
        ),
    ]
    jobs = [Member(f"jobs-{i}", "jobs", {**env, "HUAHUA_WORKERS": str(config.workers)}, root) for i in (1, 2)]
    fleet = front + jobs
    pool: asyncpg.Pool | None = None
    observer = EventObserver(redis.url)
    try:
        # the first process migrates the schema; the others find it done
        front[0].start()
        await front[0].wait_ready()
        for member in fleet[1:]:
            member.start()
        for member in fleet[1:]:
            await member.wait_ready()
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
        await observer.start()
        chaos = Chaos(config, report, rng, jobs, fleet, redis, pool)
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        report.first_request_at = time.time()
        web = asyncio.create_task(_web_users(config, report, rng, bases))
        telegram = asyncio.create_task(_telegram_users(config, report, rng, fake, pool))
        chaos_task = asyncio.create_task(chaos.run(web, telegram))
        try:
            await _until_settled(config, report, pool, web, telegram)
        finally:
            chaos.stop = True
            await chaos_task
        await asyncio.gather(web, telegram)
        await _wait_for_photos(report, pool, fake)
        await _check(config, report, pool, fake, s3, bucket, observer, redis.url)
    finally:
        await observer.close()
        if pool is not None:
            await pool.close()
        for member in fleet:
            member.stop()
        await fake.stop()
        if report.problems:
            for member in fleet:
                logger.warning("%s log tail:\n%s", member.name, member.tail())


class EventObserver:
    """Counts `done` events per job on the fleet's event channel (pub/sub: a Redis restart loses some,
    so this can only show too many, never prove too few)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.done: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        import redis.asyncio as aioredis

        while True:
            client = aioredis.Redis.from_url(self.url, decode_responses=True)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(QUEUE_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        payload = json.loads(message["data"])
                        if payload.get("event", {}).get("type") == "done":
                            self.done[payload["job"]["id"]] += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.2)
            finally:
                await client.aclose()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def _web_users(config: ChaosConfig, report: ChaosReport, rng: random.Random, bases: list[str]) -> None:
    asks = config.asks()
    results = await asyncio.gather(
        *(_web_user(index, count, report, rng.random(), bases, config) for index, count in enumerate(asks))
    )
    report.web_users = list(results)


async def _web_user(
    index: int, count: int, report: ChaosReport, phase: float, bases: list[str], config: ChaosConfig
) -> WebUser:
    """One browser: its own cookie jar, requests spread over the first seconds, to both front processes."""
    import aiohttp

    rng = random.Random(f"{report.seed}-{index}")
    jar = aiohttp.CookieJar(unsafe=True)  # unsafe: keep cookies of an IP address (127.0.0.1)
    timeout = aiohttp.ClientTimeout(total=config.deadline_s)  # an answer that never came is a failure
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as session:
        me = WebUser("web:" + await _identity(session, bases[index % 2]), count)
        spread = max(5.0, config.jobs / 20)
        await asyncio.sleep(phase * spread / count)
        for number in range(count):
            text = f"/imagine {rng.choice(PROMPTS)} --seed {index * 1000 + number} --steps {config.steps}"
            while True:
                base = bases[rng.randrange(2)]
                async with session.post(f"{base}/api/messages", json={"text": text}) as response:
                    body = await response.json()
                if response.status == 200 and body.get("job"):
                    me.accepted.append(body["job"]["id"])
                    break
                code = (body.get("error") or {}).get("code")
                if response.status == 429 and code == "quota":
                    me.quota_refused += 1
                    break
                if response.status == 503:  # Redis away: the user tries again a moment later
                    report.web_retries += 1
                    await asyncio.sleep(0.5)
                    continue
                raise AssertionError(f"POST /api/messages answered {response.status}: {body}")
            await asyncio.sleep(rng.uniform(0, 2 * spread / count))
    return me


async def _identity(session: Any, base: str) -> str:
    """The browser's user id (GET /api/me sets its identity cookie); a busy server is asked again."""
    for _ in range(20):
        async with session.get(f"{base}/api/me") as response:
            if response.status < 500:
                response.raise_for_status()
                return str((await response.json())["user"])
        await asyncio.sleep(1.0)
    raise AssertionError(f"GET {base}/api/me kept answering {response.status}")


TELEGRAM_USER_BASE = 700_000


async def _telegram_users(
    config: ChaosConfig, report: ChaosReport, rng: random.Random, fake: Any, pool: Any
) -> None:
    """Telegram users write /imagine in their private chats (chat id = user id), spread over two seconds;
    one told to try again (the database or Redis away) writes it again, until every request is a job."""
    users = [
        TELEGRAM_USER_BASE + number % max(1, config.telegram_users) for number in range(config.telegram_jobs)
    ]

    def ask(user: int) -> None:
        fake.send_text(
            user, user, f"/imagine {rng.choice(PROMPTS)} --seed {rng.randrange(10**6)} --steps {config.steps}"
        )

    for user in users:
        ask(user)
        await asyncio.sleep(2.0 / max(1, config.telegram_jobs))
    retried: Counter[int] = Counter()
    deadline = time.monotonic() + config.deadline_s / 2
    while time.monotonic() < deadline:
        stored = await pool.fetchval("SELECT count(*) FROM jobs WHERE chat LIKE 'tg:%'")
        if int(stored) >= config.telegram_jobs:
            return
        for user in set(users):
            while retried[user] < _told_to_try_again(fake, user):
                retried[user] += 1
                report.telegram_retries += 1
                ask(user)
        await asyncio.sleep(0.5)


def _told_to_try_again(fake: Any, chat_id: int) -> int:
    """How many of the bot's messages in a chat (sent or edited) refused a request for now."""
    return sum(
        1
        for call in fake.calls
        if call.method in ("sendMessage", "editMessageText")
        and str(call.params.get("chat_id")) == str(chat_id)
        and "right now" in str(call.params.get("text") or "")
    )


class Chaos:
    """Kills `huahua jobs` processes while they work and restarts Redis once."""

    def __init__(
        self,
        config: ChaosConfig,
        report: ChaosReport,
        rng: random.Random,
        members: list[Member],
        fleet: list[Member],
        redis: RedisServer,
        pool: Any,
    ) -> None:
        self.fleet = fleet
        self.config = config
        self.report = report
        self.rng = rng
        self.members = members
        self.redis = redis
        self.pool = pool
        self.stop = False
        self._restarts: set[asyncio.Task[None]] = set()

    async def run(self, web: asyncio.Task[None], telegram: asyncio.Task[None]) -> None:
        redis_at = time.monotonic() + self.config.redis_restart_after_s
        next_kill = time.monotonic() + self.config.kill_every_s
        watcher = asyncio.create_task(self._watch_reclaims())
        try:
            while not self.stop:
                await asyncio.sleep(0.1)
                now = time.monotonic()
                if not self.report.redis_restarts and now >= redis_at and await self._telegram_stored():
                    await asyncio.to_thread(self.redis.restart)
                    self.report.redis_restarts += 1
                    logger.info("redis restarted empty")
                self._supervise()
                if now >= next_kill and await self._strike():
                    next_kill = now + self.config.kill_every_s
            await asyncio.gather(*self._restarts, return_exceptions=True)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    def _supervise(self) -> None:
        """Start again, as a process manager would, any process that ended without being told to."""
        for member in self.fleet:
            if member.process is not None and member.process.poll() is not None:
                code = member.process.returncode
                self.report.unexpected_exits.append(f"{member.name} exited with code {code}")
                logger.warning("%s exited by itself with code %s: %s", member.name, code, member.tail(5))
                member.start()

    async def _telegram_stored(self) -> bool:
        """True once every Telegram request has become a job (so none meets Redis away)."""
        count = await self.pool.fetchval("SELECT count(*) FROM jobs WHERE chat LIKE 'tg:%'")
        return int(count) >= self.config.telegram_jobs

    async def _running_by_pid(self) -> dict[int, dict[str, int]]:
        rows = await self.pool.fetch("SELECT id, attempt, lease_owner FROM jobs WHERE status = 'running'")
        found: dict[int, dict[str, int]] = {}
        for row in rows:
            match = OWNER.search(row["lease_owner"] or "")
            if match:
                found.setdefault(int(match.group(1)), {})[row["id"]] = int(row["attempt"])
        return found

    async def _strike(self) -> bool:
        """SIGKILL (or, once, SIGTERM) a ready process that runs a job; False when none does yet."""
        running = await self._running_by_pid()
        if not all(m.ready() for m in self.members):
            return False  # a restarted process is still starting: the fleet must be whole again first
        targets = [m for m in self.members if running.get(m.pid)]
        if not targets:
            return False
        member = self.rng.choice(targets)
        term = len(self.report.kills) == self.config.sigterm_at_kill
        kill = Kill(time.time(), member.pid, "SIGTERM" if term else "SIGKILL")
        self.report.kills.append(kill)
        if term:
            member.signal(signal.SIGTERM)
            kill.exit_code = await member.wait_exit(30.0)
            if kill.exit_code is None:  # the hand-back is checked in the store; the process must go
                self.report.unexpected_exits.append(f"{member.name} still ran 30 s after SIGTERM")
                member.signal(signal.SIGKILL)
                await member.wait_exit(5.0)
        else:
            member.signal(signal.SIGKILL)
            await member.wait_exit(5.0)
        # the process is gone: what it still holds in the store is frozen, so read it now
        left = (await self._running_by_pid()).get(kill.pid, {})
        if term:
            kill.gave_back = not left
            kill.orphans = running.get(kill.pid, {})
        else:
            kill.orphans = left
        logger.info("%s %s (pid %d) holding %s", kill.signal, member.name, kill.pid, sorted(kill.orphans))
        member.start()
        task = asyncio.create_task(member.wait_ready())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)
        return True

    async def _watch_reclaims(self) -> None:
        """For each job a stopped process held: seconds until its next attempt started (its started_at)."""
        while True:
            await asyncio.sleep(0.2)
            waiting = {
                (index, job_id): attempt
                for index, kill in enumerate(self.report.kills)
                for job_id, attempt in kill.orphans.items()
                if job_id not in kill.resumed
            }
            if not waiting:
                continue
            rows = await self.pool.fetch(
                "SELECT id, attempt, data FROM jobs WHERE id = ANY($1::text[])", [j for _, j in waiting]
            )
            by_id = {row["id"]: row for row in rows}
            for (index, job_id), attempt in waiting.items():
                row = by_id.get(job_id)
                if row is not None and int(row["attempt"]) > attempt:
                    kill = self.report.kills[index]
                    started = json.loads(row["data"]).get("started_at") or time.time()
                    kill.resumed[job_id] = max(0.0, started - kill.at)


async def _until_settled(
    config: ChaosConfig,
    report: ChaosReport,
    pool: Any,
    web: asyncio.Task[None],
    telegram: asyncio.Task[None],
) -> None:
    """Wait until every request was answered and no job is queued or running (or the deadline passed)."""
    deadline = report.first_request_at + config.deadline_s
    while time.time() < deadline:
        await asyncio.sleep(0.25)
        if web.done() and web.exception() is not None:
            return
        if not (web.done() and telegram.done()):
            continue
        telegram_jobs = await pool.fetchval("SELECT count(*) FROM jobs WHERE chat LIKE 'tg:%'")
        unfinished = await pool.fetchval("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
        if int(telegram_jobs) >= config.telegram_jobs and int(unfinished) == 0:
            report.all_done_at = time.time()
            return
    report.all_done_at = time.time()


async def _wait_for_photos(report: ChaosReport, pool: Any, fake: Any, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Until every finished Telegram job has its picture (or `timeout`), then a moment for late duplicates."""
    done = {
        row["id"]
        for row in await pool.fetch("SELECT id FROM jobs WHERE chat LIKE 'tg:%' AND status = 'done'")
    }
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done <= set(_posted(fake)):  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    await asyncio.sleep(3.0)


def _posted(fake: Any) -> Counter[str]:
    """Result pictures the fake received, per job id (sendPhoto and sendDocument alike)."""
    posted: Counter[str] = Counter()
    for call in fake.calls:
        if call.method in ("sendPhoto", "sendDocument"):
            for name in call.filenames.values():
                match = RESULT_FILE.search(name)
                if match:
                    posted[match.group(1)] += 1
    return posted


async def _check(
    config: ChaosConfig,
    report: ChaosReport,
    pool: Any,
    fake: Any,
    s3: Any,
    bucket: str,
    observer: EventObserver,
    redis_url: str,
) -> None:
    """Every promise of the scenario, each broken one as a sentence in `report.problems`."""
    problems = report.problems
    web = report.web_users
    if len(web) != config.users:
        problems.append("the web users did not finish sending their requests")
    rows = {row["id"]: row for row in await pool.fetch("SELECT * FROM jobs")}
    status = {job_id: row["status"] for job_id, row in rows.items()}
    report.web_accepted = sum(len(user.accepted) for user in web)
    report.web_quota_refused = sum(user.quota_refused for user in web)
    report.done = sum(1 for s in status.values() if s == "done")

    unfinished = sorted(j for j, s in status.items() if s in ("queued", "running"))
    if unfinished:
        listed = "; ".join([await _describe_stuck(rows[j], redis_url) for j in unfinished[:10]])
        problems.append(
            f"{len(unfinished)} jobs were left queued or running {config.deadline_s:.0f} s after the first "
            f"request: {listed}"
        )
    accepted = [job_id for user in web for job_id in user.accepted]
    not_done = [j for j in accepted if status.get(j) != "done"]
    if not_done:
        problems.append(
            f"{len(not_done)} accepted web jobs did not end done: "
            + ", ".join(f"{j} ({status.get(j, 'missing')})" for j in not_done[:10])
        )
    failed_web = [j for j, row in rows.items() if row["chat"].startswith("web:") and status[j] != "done"]
    if len(failed_web) - len(not_done) > report.web_retries:
        problems.append(f"{len(failed_web)} web jobs in the store did not end done, more than the refusals")

    for user in web:
        expected = min(user.asked, config.quota)
        if len(user.accepted) != expected or user.quota_refused != user.asked - expected:
            problems.append(
                f"{user.user} asked for {user.asked} pictures with a daily quota of {config.quota}: "
                f"{len(user.accepted)} accepted and {user.quota_refused} refused by the quota"
            )
    images: Counter[str] = Counter()
    for row in rows.values():
        if row["status"] not in ("failed", "cancelled"):
            images[row["user"]] += int(row["n"])
    over = {user: count for user, count in images.items() if count > config.quota}
    if over:
        problems.append(f"users above the daily quota of {config.quota}: {over}")

    telegram = {j for j, row in rows.items() if row["chat"].startswith("tg:")}
    report.telegram_jobs = len(telegram)
    if len(telegram) != config.telegram_jobs:
        problems.append(f"{len(telegram)} Telegram jobs were stored for {config.telegram_jobs} requests")
    posted = _posted(fake)
    report.photos = sum(posted.values())
    for job_id in sorted(telegram):
        if status[job_id] != "done":
            problems.append(f"Telegram job {job_id} ended {status[job_id]}")
        elif posted[job_id] != 1:
            problems.append(f"Telegram job {job_id}'s picture was posted {posted[job_id]} times")
    strangers = set(posted) - telegram
    if strangers:
        problems.append(f"pictures posted for jobs that are not Telegram jobs: {sorted(strangers)[:5]}")

    twice = {job_id: count for job_id, count in observer.done.items() if count > 1}
    if twice:
        problems.append(f"jobs announced done more than once on the event channel: {twice}")

    keys = await asyncio.to_thread(_bucket_keys, s3, bucket)
    pictures = {j: json.loads(row["data"])["images"] for j, row in rows.items() if row["status"] == "done"}
    missing = [j for j, digests in pictures.items() if not digests or not set(digests) <= keys]
    if missing:
        problems.append(f"{len(missing)} done jobs lack their pictures in the bucket: {missing[:5]}")

    for kill in report.kills:
        if kill.signal == "SIGTERM" and not kill.gave_back:
            problems.append(
                f"the SIGTERMed process {kill.pid} exited with {kill.exit_code} and did not give back "
                f"{sorted(kill.orphans)}"
            )
    if not any(k.signal == "SIGKILL" and k.orphans for k in report.kills):
        problems.append("no SIGKILL hit a running job: the chaos did not happen")
    if not report.redis_restarts:
        problems.append("Redis was never restarted")


async def _describe_stuck(row: Any, redis_url: str) -> str:
    """A stuck job as the store and the Redis queue see it, for the failure message."""
    import redis.asyncio as aioredis

    lease = row["lease_until"]
    left = f"{lease - time.time():+.1f} s" if lease is not None else "none"
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        queue = {
            name: await client.hget(f"huahua:{name}", row["id"]) for name in ("entry", "owner", "inflight")
        }
        user = {name: await client.hget(f"huahua:{name}", row["user"]) for name in ("running", "pending")}
        user["in rotation"] = row["user"] in await client.lrange("huahua:rotation", 0, -1)
        user["stream"] = [fields.get("id") for _, fields in await client.xrange(f"huahua:u:{row['user']}")]
    except Exception as err:
        queue, user = {"error": type(err).__name__}, {}
    finally:
        await client.aclose()
    return (
        f"{row['id']} ({row['status']}, attempt {row['attempt']}, user {row['user']}, lease "
        f"{row['lease_owner']} {left}; redis {queue} {user})"
    )


def _copy_logs(root: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for log in root.glob("*.log"):
        shutil.copy(log, target / log.name)


def _bucket_keys(s3: Any, bucket: str) -> set[str]:
    """Digests of the pictures in the bucket (keys <prefix>/<h[:2]>/<h>.png)."""
    client = s3.client()
    found: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            found.add(item["Key"].rsplit("/", 1)[-1].removesuffix(".png"))
    return found
