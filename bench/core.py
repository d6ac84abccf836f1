# ruff: noqa: E402  (sys.path is fixed before the project imports, see below)
"""Core overhead benchmark: /imagine through the real web app and service with an engine that costs nothing.

Run: `python bench/core.py [--users 1,100,1000] [--workers 4]`. Each simulated user posts one /imagine
and follows the job's server-sent events until `done`; the same users then hit a bare aiohttp echo
endpoint in the same process, as a baseline for what the HTTP stack alone costs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

# Run as `python bench/core.py`, this file's folder comes first on sys.path and its name would hide
# the `core` package: look for packages from the repository root instead.
_HERE = str(Path(__file__).resolve().parent)
while _HERE in sys.path:
    sys.path.remove(_HERE)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from aiohttp import web
from PIL import Image

from bots.web.app import create_app
from core.app import build_service
from core.engine import CancelToken, Engine, ProgressCallback
from core.errors import JobCancelled
from core.settings import Settings
from core.types import GeneratedImage, GenerationRequest

logger = logging.getLogger(__name__)

VOCAB = Path(__file__).resolve().parents[2] / "shared" / "wukong" / "vocab_zh.txt"


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 60, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


class InstantEngine(Engine):
    """Reports every step and returns a constant 8×8 PNG at once: all remaining time is our overhead."""

    name = "instant"
    label = "benchmark engine"

    def __init__(self) -> None:
        self.png = _tiny_png()

    async def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        for step in range(1, request.steps + 1):
            if cancel.cancelled:
                raise JobCancelled()
            on_progress(step, request.steps)
        return [
            GeneratedImage(png=self.png, width=8, height=8, seed=request.seed + i) for i in range(request.n)
        ]


@dataclass(frozen=True)
class Round:
    """One concurrency level: latencies in seconds of the users that finished, and the wall time."""

    users: int
    latencies: tuple[float, ...]
    wall_s: float
    lost: int

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    @property
    def per_second(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0


async def _imagine_user(session: aiohttp.ClientSession, base: str, index: int) -> float | None:
    """One user: post /imagine, follow the events to `done`; the seconds it took, or None when lost."""
    started = time.perf_counter()
    body = {"chat": "bench", "user": f"user{index}", "text": f"/imagine 一只在月球上看书的猫 --seed {index}"}
    async with session.post(f"{base}/api/messages", json=body) as response:
        data = await response.json()
    job = data.get("job")
    if response.status != 200 or job is None:
        logger.warning("user %d got no job: %s", index, data)
        return None
    async with session.get(f"{base}/api/jobs/{job['id']}/events") as response:
        async for raw in response.content:
            if raw.startswith(b"event: "):
                kind = raw[len(b"event: ") :].strip()
                if kind == b"done":
                    return time.perf_counter() - started
                if kind in (b"failed", b"cancelled"):
                    logger.warning("user %d job ended %s", index, kind.decode())
                    return None
    return None


async def _echo_user(session: aiohttp.ClientSession, base: str, index: int) -> float | None:
    started = time.perf_counter()
    async with session.post(f"{base}/echo", json={"user": f"user{index}", "text": "hello"}) as response:
        data = await response.json()
    return time.perf_counter() - started if data.get("user") == f"user{index}" else None


async def _round(
    users: int, base: str, user: Callable[[aiohttp.ClientSession, str, int], Awaitable[float | None]]
) -> Round:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(user(session, base, i) for i in range(users)), return_exceptions=True
        )
        wall = time.perf_counter() - started
    latencies = tuple(r for r in results if isinstance(r, float))
    for result in results:
        if isinstance(result, BaseException):
            logger.warning("user failed: %r", result)
    return Round(users, latencies, wall, lost=users - len(latencies))


async def _echo(request: web.Request) -> web.Response:
    return web.json_response(await request.json())


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def bench(levels: list[int], workers: int) -> list[tuple[Round, Round, int, float]]:
    """For each level: (core round, echo round, jobs not done in the store, peak RSS MiB)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="huahua-bench-") as tmp:
        settings = Settings(
            data_dir=Path(tmp) / "data",
            model_dir=Path(tmp) / "models",
            vocab_path=VOCAB if VOCAB.exists() else None,
            queue_max_size=2000,
            daily_image_quota=1_000_000,
            workers=workers,
            _env_file=None,  # type: ignore[call-arg]
        )
        service = await build_service(settings, engine=InstantEngine())
        await service.start()
        echo_app = web.Application()
        echo_app.router.add_post("/echo", _echo)
        runner, base = await _serve(create_app(service, settings))
        echo_runner, echo_base = await _serve(echo_app)
        try:
            await _round(1, base, _imagine_user)  # warm-up: jieba, prompt data, SQLite pages
            for users in levels:
                core = await _round(users, base, _imagine_user)
                unfinished = len(await service.store.unfinished_jobs())
                echo = await _round(users, echo_base, _echo_user)
                out.append((core, echo, unfinished, _peak_rss_mib()))
        finally:
            await runner.cleanup()
            await echo_runner.cleanup()
            await service.stop()
    return out


def _table(rows: list[tuple[Round, Round, int, float]]) -> str:
    head = (
        "users",
        "done",
        "lost",
        "jobs/s",
        "p50 ms",
        "p99 ms",
        "ms/job",
        "echo req/s",
        "echo p50",
        "echo p99",
        "p50 ratio",
        "RSS MiB",
    )
    lines = [" | ".join(head)]
    for core, echo, unfinished, rss in rows:
        lost = core.lost + unfinished
        cells = (
            f"{core.users}",
            f"{len(core.latencies)}",
            f"{lost}",
            f"{core.per_second:.0f}",
            f"{core.percentile(0.5) * 1000:.1f}",
            f"{core.percentile(0.99) * 1000:.1f}",
            f"{core.wall_s / core.users * 1000:.2f}",
            f"{echo.per_second:.0f}",
            f"{echo.percentile(0.5) * 1000:.1f}",
            f"{echo.percentile(0.99) * 1000:.1f}",
            f"{core.percentile(0.5) / echo.percentile(0.5):.1f}x",
            f"{rss:.0f}",
        )
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="1,100,1000", help="comma-separated concurrency levels")
    parser.add_argument("--workers", type=int, default=4, help="service worker tasks")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the whole run here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    levels = [int(level) for level in args.users.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        rows = profiler.runcall(asyncio.run, bench(levels, args.workers))
        profiler.dump_stats(args.profile)
    else:
        rows = asyncio.run(bench(levels, args.workers))
    print(_table(rows))
    print(
        "ms/job = wall time / jobs at that concurrency (server + client in one process, zero-cost engine);"
        " lost = users without a done event + jobs left unfinished in the store."
    )
    lost = sum(core.lost + unfinished for core, _, unfinished, _ in rows)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
