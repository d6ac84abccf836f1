import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image

from core.engines.local import LocalEngine, tiny_engine
from core.settings import Settings
from core.worker_server import create_app

SECRET = "worker-s3cret-value"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(  # type: ignore[call-arg]
        engine="tiny", model_dir=tmp_path_factory.mktemp("m"), vocab_path=None, _env_file=None
    )


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[LocalEngine]:
    engine = tiny_engine(settings)
    await engine.start()
    yield engine
    await engine.close()


async def _serve(engine: LocalEngine, secret: str | None) -> TestServer:
    server = TestServer(create_app(engine, secret=secret), host="127.0.0.1")
    await server.start_server()
    return server


@pytest.fixture
async def worker(engine: LocalEngine) -> AsyncIterator[TestServer]:
    server = await _serve(engine, SECRET)
    yield server
    await server.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"X-Huahua-Secret": SECRET}) as session:
        yield session


BODY = {"prompt": "一只猫", "width": 64, "height": 64, "steps": 3, "seed": 5, "n": 2}


async def test_health_describes_the_engine(worker: TestServer, client: aiohttp.ClientSession) -> None:
    async with client.get(worker.make_url("/v1/health")) as resp:
        assert resp.status == 200
        info = await resp.json()
    assert info["engine"] == "tiny" and info["ready"] is True
    assert info["device"] == "CPU" and info["dtype"] == "float32" and info["model"] == "wukong-tiny"
    assert info["load"] == {"busy": False, "waiting": 0, "requests": 0}


async def test_generate_streams_progress_then_images(
    worker: TestServer, client: aiohttp.ClientSession
) -> None:
    async with client.post(worker.make_url("/v1/generate"), json=BODY) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/x-ndjson"
        lines = [json.loads(line) async for line in resp.content]
    assert lines[:-1] == [{"type": "progress", "step": s, "total": 3} for s in (1, 2, 3)]
    result = lines[-1]
    assert result["type"] == "result"
    assert [(i["width"], i["height"], i["seed"]) for i in result["images"]] == [(64, 64, 5), (64, 64, 6)]
    image = Image.open(io.BytesIO(base64.b64decode(result["images"][0]["png"])))
    assert image.format == "PNG" and image.size == (64, 64)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"width": 128}).encode(), "'prompt'"),
        (json.dumps({**BODY, "steps": "ten"}).encode(), "'steps'"),
        (json.dumps({**BODY, "seed": -1}).encode(), "'seed'"),
        (json.dumps({**BODY, "evil": 1}).encode(), "'evil'"),
        (json.dumps({**BODY, "init_image": "%%%"}).encode(), "base64"),
        (json.dumps({**BODY, "init_image": "aGVsbG8=", "strength": 0.5}).encode(), "image"),
        (json.dumps({**BODY, "width": 72}).encode(), "multiples of 16"),
        (json.dumps({**BODY, "sampler": "magic"}).encode(), "sampler"),
    ],
)
async def test_bad_requests_get_400_with_a_clear_message(
    worker: TestServer, client: aiohttp.ClientSession, body: bytes, message: str
) -> None:
    async with client.post(worker.make_url("/v1/generate"), data=body) as resp:
        assert resp.status == 400
        error = await resp.json()
    assert error["type"] == "error" and error["code"] == "invalid_option"
    assert message in error["message"]


async def test_huge_body_is_refused(worker: TestServer, client: aiohttp.ClientSession) -> None:
    body = json.dumps({**BODY, "prompt": "x" * (33 * 1024 * 1024)})
    async with client.post(worker.make_url("/v1/generate"), data=body) as resp:
        assert resp.status in (400, 413)


async def test_secret_is_required_and_never_logged(
    worker: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as anonymous:
        for headers in ({}, {"X-Huahua-Secret": "wrong"}, {"X-Huahua-Secret": SECRET + "x"}):
            async with anonymous.get(worker.make_url("/v1/health"), headers=headers) as resp:
                assert resp.status == 401
            async with anonymous.post(worker.make_url("/v1/generate"), json=BODY, headers=headers) as resp:
                assert resp.status == 401
    assert SECRET not in caplog.text
    assert "refused" in caplog.text


async def test_no_secret_configured_means_open(engine: LocalEngine) -> None:
    server = await _serve(engine, None)
    try:
        async with aiohttp.ClientSession() as session, session.get(server.make_url("/v1/health")) as resp:
            assert resp.status == 200
    finally:
        await server.close()


async def test_client_disconnect_cancels_sampling(
    worker: TestServer, client: aiohttp.ClientSession, engine: LocalEngine
) -> None:
    total = 50
    resp = await client.post(worker.make_url("/v1/generate"), json={**BODY, "n": 1, "steps": total})
    first = json.loads(await resp.content.readline())
    assert first["type"] == "progress"
    resp.close()  # the client goes away mid-run
    for _ in range(200):
        if engine.stats.cancelled:
            break
        await asyncio.sleep(0.05)
    assert engine.stats.cancelled == 1
    assert engine.stats.images == 0
    assert engine.stats.steps < total
    async with client.get(worker.make_url("/v1/health")) as health:
        info = await health.json()
    assert info["load"]["busy"] is False and info["load"]["requests"] == 0


async def test_serve_worker_listens_until_cancelled(settings: Settings) -> None:
    import socket

    from core.worker_server import serve_worker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = settings.model_copy(update={"worker_port": port, "worker_secret": None})
    task = asyncio.create_task(serve_worker(config))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/v1/health") as resp:
                        info = await resp.json()
                        break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the worker did not start listening")
        assert info["engine"] == "tiny" and info["ready"] is True
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
