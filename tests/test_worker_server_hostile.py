"""`huahua worker` against a hostile client: odd secret bytes, picture bombs, floods of bad requests."""

import asyncio
import base64
import json
import logging
import re
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from core.engines.local import LocalEngine, tiny_engine
from core.settings import Settings
from core.worker_server import SERVER_OPTIONS, create_app

SECRET = "worker-s3cret-value"
BODY = {"prompt": "一只猫", "width": 64, "height": 64, "steps": 3, "seed": 5, "n": 1, "strength": 0.5}
BOMB_SIDE = 9400


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR (8-bit RGB), as a real encoder writes them."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def _blank_png(width: int, height: int) -> bytes:
    """A whole, valid black PNG, compressed row by row (a 9400² one is 250 KB, 265 MB decoded)."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return _png_header(width, height) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return _blank_png(BOMB_SIDE, BOMB_SIDE)


@pytest.fixture
def engine(tmp_path: Path) -> LocalEngine:
    """Never started: every request here must be refused before the engine is asked."""
    settings = Settings(engine="tiny", model_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    return tiny_engine(settings)


@pytest.fixture
async def worker(engine: LocalEngine) -> AsyncIterator[str]:
    """The worker as `serve_worker` runs it (same runner options), on a free loopback port."""
    runner = web.AppRunner(create_app(engine, secret=SECRET), **SERVER_OPTIONS)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"127.0.0.1:{port}"
    await runner.cleanup()


async def _raw(address: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (aiohttp's client would refuse to) and read the status and body."""
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _get_health(secret: bytes) -> bytes:
    return (
        b"GET /v1/health HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n"
        b"X-Huahua-Secret: " + secret + b"\r\n\r\n"
    )


@pytest.mark.parametrize("secret", [b"\xff\xfe\xfd", SECRET.encode() + b"\xe9", "密钥".encode("gbk")])
async def test_a_secret_that_is_not_utf8_gets_401_json(worker: str, secret: bytes) -> None:
    status, body = await _raw(worker, _get_health(secret))
    assert status == 401
    assert json.loads(body) == {
        "type": "error",
        "code": "not_allowed",
        "message": "Wrong or missing worker secret.",
    }


async def test_the_secret_is_compared_as_bytes(worker: str) -> None:
    status, body = await _raw(worker, _get_health(SECRET.encode()))
    assert status == 200 and json.loads(body)["engine"] == "tiny"
    twice = _get_health(SECRET.encode()).replace(b"\r\n\r\n", b"\r\nX-Huahua-Secret: other\r\n\r\n")
    assert (await _raw(worker, twice))[0] == 401


async def _generate(worker: str, init_image: bytes) -> tuple[int, dict[str, str]]:
    body = {**BODY, "init_image": base64.b64encode(init_image).decode("ascii")}
    headers = {"X-Huahua-Secret": SECRET}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{worker}/v1/generate", json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_huge_picture_is_refused_by_its_header(worker: str, engine: LocalEngine) -> None:
    # the header alone: decoding this would fail ("not an image I can read"), so "too large" proves
    # the size was judged from the header before any decoding
    status, error = await _generate(worker, _png_header(BOMB_SIDE, BOMB_SIDE) + _chunk(b"IEND", b""))
    assert status == 400 and error["code"] == "invalid_option"
    assert "too large" in error["message"] and "4096" in error["message"]
    # a readable picture of the same kind with a cut-off body is unreadable, not too large
    status, error = await _generate(worker, _blank_png(64, 64)[:-30])
    assert status == 400 and "not an image I can read" in error["message"]
    assert engine.stats.batches == 0 and not engine.ready


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the peak becomes the current RSS


def _peak_rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to read peak RSS")
async def test_ten_picture_bombs_cost_no_memory_and_leave_health_answering(worker: str, bomb: bytes) -> None:
    """The issue's measure: ten 9,400×9,400 PNGs (265 MB each decoded) grew RSS by 4 GB and blocked
    `/v1/health` for 10 s. Now the peak RSS may grow by the requests' bodies only."""
    _reset_peak_rss()
    before = _peak_rss_kib()
    results = await asyncio.gather(*(_generate(worker, bomb) for _ in range(10)))
    async with aiohttp.ClientSession() as session:
        health = await session.get(f"http://{worker}/v1/health", headers={"X-Huahua-Secret": SECRET})
        assert health.status == 200
    grown_mib = (_peak_rss_kib() - before) / 1024
    print(f"peak RSS grew by {grown_mib:.0f} MiB over 10 requests")
    assert all(status == 400 and "too large" in error["message"] for status, error in results)
    assert grown_mib < 100


async def test_a_flood_of_refused_requests_logs_one_line(
    worker: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(30):
        assert (await _raw(worker, _get_health(b"wrong")))[0] == 401
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING
    assert SECRET not in caplog.text


async def test_a_flood_of_malformed_requests_logs_one_line_without_a_traceback(
    worker: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for number in range(30):
        status, _ = await _raw(worker, b"GET /v1/health HTTP/1.1\r\nHost: w\r\nno colon %d\r\n\r\n" % number)
        assert status == 400
    errors = [r for r in caplog.records if "Error handling request" in r.getMessage()]
    assert len(errors) == 1
    assert errors[0].levelno == logging.WARNING and errors[0].exc_info is None
    assert "Traceback" not in caplog.text
    assert "BadHttpMessage" in errors[0].getMessage() or "Invalid" in errors[0].getMessage()
