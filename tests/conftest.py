"""Shared fixtures: a job factory, a real redis-server and a real PostgreSQL cluster on loopback ports."""

from __future__ import annotations

import itertools
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.types import GenerationRequest, Job, JobKind
from tests.pg_server import PgCluster, start_cluster
from tests.store_backends import Backend, PostgresBackend, SqliteBackend
from tests.support import CHROMIUM, CHROMIUM_ARGS, INSTALL_DEV, import_or_skip, skip_needing

pytest_plugins = ["tests.fake_llm", "tests.fake_discord", "tests.s3_server"]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

_job_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def fresh_rate_limits() -> Iterator[None]:
    """Rate-limited loggers (core.logs.RateLimit) keep their windows per process: each test starts and
    leaves them empty, so one test's refusals never hide the next one's log lines."""
    from core.logs import RateLimit

    def reset() -> None:
        for logger in logging.Logger.manager.loggerDict.values():
            for found in getattr(logger, "filters", ()):
                if isinstance(found, RateLimit):
                    found.reset()

    reset()
    yield
    reset()


@pytest.fixture
def make_job() -> Callable[..., Job]:
    """Build a Job with unique id; keyword arguments override Job fields, `n`/`prompt` the request."""

    def build(user: str = "web:alice", **overrides: Any) -> Job:
        request = GenerationRequest(
            prompt=overrides.pop("prompt", "一只猫"),
            n=overrides.pop("n", 1),
            seed=overrides.pop("seed", 7),
        )
        fields: dict[str, Any] = {
            "id": f"job-{next(_job_ids)}",
            "user": user,
            "chat": "web:room1",
            "kind": JobKind.IMAGINE,
            "source_text": "a cat",
            "request": request,
            "created_at": 1_700_000_000.0,
        }
        fields.update(overrides)
        return Job(**fields)

    return build


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start in time")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a throwaway redis-server (no persistence) for the whole test session."""
    if not Path(REDIS_SERVER).exists():
        skip_needing("redis-server", "apt-get install redis-server")
    directory = tmp_path_factory.mktemp("redis")
    port = _free_port()
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for_port(port, process)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl on a free loopback port) for the whole session."""
    try:
        cluster = start_cluster()
    except LookupError as err:
        pytest.skip(str(err))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """URL (with password) of a new empty database in the session's cluster."""
    return pg_cluster.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each store implementation in turn: the contract tests run against both."""
    if request.param == "postgres":
        pytest.importorskip("asyncpg", reason="needs asyncpg (pip install 'huahua[postgres]')")
        return PostgresBackend(request.getfixturevalue("pg_url"))
    return SqliteBackend(tmp_path / "db" / "huahua.sqlite3")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Chromium through playwright (its own browser download is never used)."""
    playwright_api = import_or_skip("playwright.async_api", "playwright", INSTALL_DEV)
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        await browser.close()
