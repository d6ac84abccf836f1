import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from core.engine import CancelToken, EngineLimits, configured_limits
from core.engines import http as http_engine
from core.engines.http import SECRET_HEADER, HttpEngine, error_from_wire, request_from_wire, request_to_wire
from core.engines.local import LocalEngine, tiny_engine
from core.errors import (
    BlockedPrompt,
    EngineUnavailable,
    HuahuaError,
    InvalidOption,
    JobCancelled,
    QueueFull,
)
from core.settings import Settings
from core.types import Action, GenerationRequest, JobStatus
from core.worker_server import create_app
from tests.support import make_service, make_settings

SECRET = "another-s3cret"
REQUEST = GenerationRequest(prompt="山水画", width=64, height=64, steps=3, seed=9, n=1)


def _ignore(step: int, total: int) -> None:
    pass


def test_wire_round_trip_keeps_every_field() -> None:
    request = GenerationRequest(
        prompt="猫", negative_prompt="狗", width=64, height=96, steps=5, guidance_scale=3,
        seed=2**40, n=3, sampler="ddim", init_image=b"\x89PNG\x00\xff", strength=0.4,
    )  # fmt: skip
    assert request_from_wire(json.loads(json.dumps(request_to_wire(request)))) == request


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("invalid_option", InvalidOption),
        ("blocked", BlockedPrompt),
        ("queue_full", QueueFull),
        ("cancelled", JobCancelled),
        ("engine_unavailable", EngineUnavailable),
        ("something_new", EngineUnavailable),
    ],
)
def test_error_codes_map_back_to_core_errors(code: str, cls: type[HuahuaError]) -> None:
    error = error_from_wire({"type": "error", "code": code, "message": "Nope."})
    assert type(error) is cls and error.message == "Nope."


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(  # type: ignore[call-arg]
        engine="tiny", model_dir=tmp_path_factory.mktemp("m"), vocab_path=None, _env_file=None
    )


@pytest.fixture
async def local(settings: Settings) -> AsyncIterator[LocalEngine]:
    engine = tiny_engine(settings)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture
async def worker(local: LocalEngine) -> AsyncIterator[TestServer]:
    server = TestServer(create_app(local, secret=SECRET), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def remote(worker: TestServer) -> AsyncIterator[HttpEngine]:
    engine = HttpEngine(str(worker.make_url("/")), secret=SECRET, timeout_s=60)
    await engine.start()
    yield engine
    await engine.close()


async def test_remote_images_equal_local_ones(remote: HttpEngine, local: LocalEngine) -> None:
    steps: list[tuple[int, int]] = []
    [far] = await remote.generate(REQUEST, lambda s, t: steps.append((s, t)), CancelToken())
    [near] = await local.generate(REQUEST, _ignore, CancelToken())
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert far == near
    assert remote.label == "untrained test model"
    health = await remote.health()
    assert health["ready"] is True and health["engine"] == "http" and health["worker_engine"] == "tiny"


async def test_worker_errors_come_back_as_core_errors(remote: HttpEngine) -> None:
    bad = GenerationRequest(prompt="猫", width=72, height=64, steps=3)
    with pytest.raises(InvalidOption, match="multiples of 16"):
        await remote.generate(bad, _ignore, CancelToken())


async def test_cancel_closes_the_stream_and_the_worker_stops(remote: HttpEngine, local: LocalEngine) -> None:
    cancel = CancelToken()
    total = 50

    def on_progress(step: int, _total: int) -> None:
        if step == 1:
            cancel.cancel()

    with pytest.raises(JobCancelled):
        await remote.generate(
            GenerationRequest(prompt="猫", width=64, height=64, steps=total), on_progress, cancel
        )
    for _ in range(200):
        if local.stats.cancelled:
            break
        await asyncio.sleep(0.05)
    assert local.stats.cancelled == 1 and local.stats.steps < total


async def test_wrong_secret_is_a_friendly_error(worker: TestServer) -> None:
    engine = HttpEngine(str(worker.make_url("/")), secret="wrong", timeout_s=10)
    with pytest.raises(EngineUnavailable, match="HUAHUA_WORKER_SECRET") as info:
        await engine.generate(REQUEST, _ignore, CancelToken())
    assert "wrong" not in str(info.value)
    assert (await engine.health())["ready"] is False
    await engine.close()


async def test_unreachable_worker_is_engine_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = HttpEngine(f"http://127.0.0.1:{port}", timeout_s=5)
    await engine.start()  # must not raise
    assert (await engine.health())["ready"] is False
    with pytest.raises(EngineUnavailable, match="cannot be reached"):
        await engine.generate(REQUEST, _ignore, CancelToken())
    await engine.close()


async def _misbehaving_worker(lines: list[bytes], status: int = 200) -> TestServer:
    """A fake remote worker that answers with the given raw lines (a remote service, so a fake is fine)."""

    async def generate(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status)
        await response.prepare(request)
        for line in lines:
            await response.write(line)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/generate", generate)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.mark.parametrize(
    ("lines", "status", "message"),
    [
        ([b'{"type":"progress","step":1,"total":2}\n'], 200, "stopped before"),
        ([b"<html>oops</html>\n"], 200, "not JSON"),
        ([b"[1,2]\n"], 200, "not a JSON object"),
        ([b'{"type":"result","images":[{"png":"***"}]}\n'], 200, "malformed image"),
        ([b"Bad gateway"], 502, "HTTP status 502"),
        ([b'{"type":"error","code":"blocked","message":"Not that."}\n'], 200, "Not that."),
    ],
)
async def test_misbehaving_worker_gives_friendly_errors(
    lines: list[bytes], status: int, message: str
) -> None:
    server = await _misbehaving_worker(lines, status)
    engine = HttpEngine(str(server.make_url("/")), timeout_s=5)
    try:
        with pytest.raises(HuahuaError, match=message):
            await engine.generate(REQUEST, _ignore, CancelToken())
    finally:
        await engine.close()
        await server.close()


async def test_slow_worker_times_out() -> None:
    async def generate(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/generate", generate)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    engine = HttpEngine(str(server.make_url("/")), timeout_s=0.3)
    try:
        with pytest.raises(EngineUnavailable, match="too long"):
            await engine.generate(REQUEST, _ignore, CancelToken())
    finally:
        await engine.close()
        await server.close()


async def test_cancel_while_queued_behind_another_job(remote: HttpEngine, local: LocalEngine) -> None:
    started = asyncio.Event()
    first_cancel, second_cancel = CancelToken(), CancelToken()
    first = asyncio.create_task(
        remote.generate(
            GenerationRequest(prompt="猫", width=64, height=64, steps=50),
            lambda s, t: started.set(),
            first_cancel,
        )
    )
    await asyncio.wait_for(started.wait(), 30)
    second = asyncio.create_task(
        remote.generate(
            GenerationRequest(prompt="狗", width=128, height=128, steps=3), _ignore, second_cancel
        )
    )
    await asyncio.sleep(0.2)  # the second request now waits on the worker, with no stream yet
    second_cancel.cancel()
    began = time.perf_counter()
    with pytest.raises(JobCancelled):
        await second
    assert time.perf_counter() - began < 2.0
    assert not first.done()
    first_cancel.cancel()
    with pytest.raises(JobCancelled):
        await first
    for _ in range(200):
        if local.stats.cancelled == 2:
            break
        await asyncio.sleep(0.05)
    assert local.stats.cancelled == 2 and local.stats.images == 0


async def test_a_worker_without_weights_says_how_to_fetch_them(tmp_path: Path) -> None:
    from core.engines.local import wukong_engine

    settings = Settings(model_dir=tmp_path, vocab_path=None, _env_file=None)  # type: ignore[call-arg]
    local = wukong_engine(settings)
    await local.start()
    server = TestServer(create_app(local), host="127.0.0.1")
    await server.start_server()
    engine = HttpEngine(str(server.make_url("/")), timeout_s=10)
    try:
        await engine.start()  # must not raise
        health = await engine.health()
        assert health["ready"] is False and "huahua model fetch" in health["error"]
        with pytest.raises(EngineUnavailable, match="huahua model fetch"):
            await engine.generate(REQUEST, _ignore, CancelToken())
    finally:
        await engine.close()
        await server.close()
        await local.close()


# sizes: the bot side sizes requests by the worker's limits, not by its own HUAHUA_IMAGE_AREA


async def test_the_worker_reports_its_limits_in_health(worker: TestServer, local: LocalEngine) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(worker.make_url("/v1/health"), headers={SECRET_HEADER: SECRET}) as resp:
            health = await resp.json()
    assert EngineLimits.from_dict(health["limits"]) == local.limits
    assert local.limits == EngineLimits.for_area(128 * 128, multiple=16)


async def test_a_bot_with_a_larger_area_draws_and_upscales_at_the_workers_sizes(
    tmp_path: Path, worker: TestServer
) -> None:
    """HUAHUA_ENGINE=http with the bot's default 512x512 area, and a worker running the tiny engine
    (128x128): every job used to fail as "too large"."""
    values = {"worker_url": str(worker.make_url("/")), "worker_secret": SECRET}
    settings = make_settings(tmp_path, engine="http", **values)
    assert settings.image_area == 512 * 512
    engine = HttpEngine.from_settings(settings)
    service = await make_service(tmp_path, engine, engine_name="http", **values)
    try:
        reply = await service.handle_message("web:room", "web:ann", "/imagine 一只猫 --ar 3:2")
        assert reply.job is not None
        parent = await _finished(service, reply.job.id)
        assert parent.status == JobStatus.DONE, parent.error
        assert (parent.request.width, parent.request.height) == (192, 128)
        upscale = await _finished(service, (await service.act(parent.id, Action.UPSCALE, 0, "web:ann")).id)
        assert upscale.status == JobStatus.DONE, upscale.error
        assert (upscale.request.width, upscale.request.height) == (384, 256)
        with pytest.raises(InvalidOption, match="already as large"):
            await service.act(upscale.id, Action.UPSCALE, 0, "web:ann")
    finally:
        await service.stop()


async def test_an_older_worker_without_limits_leaves_the_settings_limits(tmp_path: Path) -> None:
    asked: list[str] = []

    async def health(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response({"engine": "wukong", "ready": True})

    app = web.Application()
    app.router.add_get("/v1/health", health)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    settings = make_settings(
        tmp_path, engine="http", worker_url=str(server.make_url("/")), image_area=256 * 256
    )
    engine = HttpEngine.from_settings(settings)
    try:
        assert await engine.fetch_limits() == configured_limits(settings)
        assert engine.limits.image_area == 256 * 256
        assert asked  # it did ask
    finally:
        await engine.close()
        await server.close()


async def test_the_workers_limits_are_asked_again_only_after_a_while(
    worker: TestServer, local: LocalEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = HttpEngine(str(worker.make_url("/")), secret=SECRET, timeout_s=10)
    asked: list[int] = []
    health = engine.health

    async def counted() -> dict:
        asked.append(1)
        return await health()

    monkeypatch.setattr(engine, "health", counted)
    try:
        for _ in range(3):
            assert await engine.fetch_limits() == local.limits
        assert len(asked) == 1
        monkeypatch.setattr(http_engine, "LIMITS_TTL_S", 0.0)
        await asyncio.sleep(0.01)
        await engine.fetch_limits()
        assert len(asked) == 2
    finally:
        await engine.close()


async def test_an_unreachable_worker_keeps_the_fallback_limits(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(tmp_path, engine="http", worker_url=f"http://127.0.0.1:{port}")
    engine = HttpEngine.from_settings(settings)
    try:
        assert await engine.fetch_limits() == configured_limits(settings)
    finally:
        await engine.close()


async def _finished(service, job_id: str):  # type: ignore[no-untyped-def]
    [event async for event in service.subscribe(job_id)]
    return await service.get_job(job_id)
