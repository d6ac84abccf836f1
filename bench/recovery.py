# ruff: noqa: E402  (sys.path is fixed before the project imports, see below)
"""Recovery sweep benchmark: what one sweep costs while thousands of jobs wait in a Redis queue.

Run by hand (not in CI): `python bench/recovery.py [--waiting 1000,5000] [--users 1000] [--rounds 3]`.
It starts a throwaway redis-server, fills a SQLite store and the Redis Streams queue with --waiting jobs
from --users users (none running, as while the workers are busy), and times one sweep two ways in the
same process: the baseline puts every recoverable job again, as the sweep did until 2026-12 (`put`
answers a job it already holds with its position, a Lua script that walks the rotation), and
`JobRunner.recover()` as it is now (the store's ids, one `holding` question, nothing read or put).
Every process with workers sweeps every few seconds, and Redis runs one script at a time, so the
script time is time every other process waits. Prints the best of --rounds and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

# Run as `python bench/recovery.py`, this file's folder comes first on sys.path, where bench/core.py
# would hide the `core` package: look for packages (core, tests) from the repository root instead.
_HERE = str(Path(__file__).resolve().parent)
while _HERE in sys.path:
    sys.path.remove(_HERE)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.app import build_service
from core.service import Huahua
from core.settings import Settings
from core.types import GenerationRequest, Job, JobKind
from tests.chaos_scenario import RedisServer


async def _old_sweep(service: Huahua) -> int:
    """The sweep before `holding`: every recoverable job read and put again (it read them in one query
    then; one read per job here, which costs little beside the put's script)."""
    put = 0
    for job_id in await service.store.recoverable_ids(time.time()):
        job = await service.store.get_job(job_id)
        if job is not None:
            await service.queue.put(job)
            put += 1
    return put


async def _best(sweep: Callable[[], Awaitable[int]], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        await sweep()
        best = min(best, time.perf_counter() - started)
    return best


async def _fill(service: Huahua, waiting: int, users: int) -> None:
    created = time.time() - 60
    for i in range(waiting):
        job = Job(
            id=f"bench-{waiting}-{i}",
            user=f"web:u{i % users}",
            chat="web:room1",
            kind=JobKind.IMAGINE,
            source_text="a cat",
            request=GenerationRequest(prompt="一只猫", n=1, seed=i),
            created_at=created + i * 1e-3,
        )
        await service.store.add_job(job)
        await service.queue.put(job)


async def measure(redis_url: str, waiting: int, users: int, rounds: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(
            data_dir=Path(folder) / "data",
            model_dir=Path(folder) / "models",
            engine="tiny",
            queue="redis",
            redis_url=redis_url,
            workers=0,
            queue_max_size=waiting + 1,
            user_max_pending=waiting // users + 1,
            _env_file=None,  # type: ignore[call-arg]
        )
        service = await build_service(settings)
        await service.start(recover=False)
        try:
            await _fill(service, waiting, users)
            old = await _best(lambda: _old_sweep(service), rounds)
            new = await _best(service.runner.recover, rounds)
            assert await service.queue.size() == waiting
        finally:
            await service.stop()
    return old, new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", default="1000,5000", help="comma-separated numbers of waiting jobs")
    parser.add_argument("--users", type=int, default=1000, help="users the waiting jobs belong to")
    parser.add_argument("--rounds", type=int, default=3, help="timed sweeps of each kind (best is shown)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            print(f"{'waiting':>8} {'users':>6} {'put every job':>14} {'recover()':>10} {'ratio':>7}")
            for waiting in (int(n) for n in args.waiting.split(",")):
                users = min(args.users, waiting)
                server.restart()  # an empty Redis for each size
                old, new = asyncio.run(measure(server.url, waiting, users, args.rounds))
                print(f"{waiting:>8} {users:>6} {old:>12.3f} s {new:>8.3f} s {old / new:>6.1f}x")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
