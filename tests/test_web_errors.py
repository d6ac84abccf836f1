"""The web chat's refusals: HTTP statuses, JSON error bodies, hostile bodies and broken requests."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from bots.web.errors import ProtocolErrorSummary
from bots.web.payload import MAX_JSON_DEPTH, json_depth
from tests.support import PatternEngine
from tests.web_support import IMAGINE, Web, start_web

JSON_ENDPOINTS = ("/api/messages", "/api/jobs/{job}/actions", "/api/stories/{story}/choose", "/api/login")
DEEP_BODIES = {"arrays": b"[" * 30_000, "objects": b'{"a":' * 12_000, "closed": b"[" * 40 + b"]" * 40}


@pytest.fixture
async def web(tmp_path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Web] = []

    async def start(engine: PatternEngine | None = None, **settings: Any) -> Web:
        server = await start_web(tmp_path, engine, **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


def _error(body: dict[str, Any]) -> tuple[str, str]:
    assert set(body) >= {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]["code"], body["error"]["message"]


# deeply nested JSON -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(DEEP_BODIES))
@pytest.mark.parametrize("endpoint", JSON_ENDPOINTS)
async def test_deeply_nested_json_is_a_400_on_every_json_endpoint(web, caplog, endpoint, shape):
    server = await web()
    job = await server.client.imagine()
    await server.client.say("/story new 月亮")
    story = (await (await server.client.get("/api/chats/main/story")).json())["id"]
    path = endpoint.format(job=job["id"], story=story)
    with caplog.at_level(logging.WARNING):
        response = await server.client.post(
            path, data=DEEP_BODIES[shape], headers={"Content-Type": "application/json"}
        )
    assert response.status == 400
    code, message = _error(await response.json())
    assert code == "bad_request" and f"at most {MAX_JSON_DEPTH} levels" in message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"{}", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'{"a": "[[[[{{{{"}', 1),
        (b'{"a": "\\"[[[[", "b": [[1]]}', 3),
        (b'["\\\\", [2]]', 2),
        (b'"\\\\\\"[[["', 0),
        (b"[" * 33 + b"]" * 33, 33),
        (b"5", 0),
    ],
)
def test_json_depth_counts_brackets_outside_strings(raw, depth):
    assert json_depth(raw) == depth


def test_json_depth_is_linear_on_escaped_quotes():
    raw = b'"' + b'\\"' * 30_000
    started = time.perf_counter()
    assert json_depth(raw) == 0
    assert time.perf_counter() - started < 1.0


# lone surrogates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "/imagine \\ud800 cat",
        "/story new t\\ud800",
        "/settings gallery @x\\ud800",
        "/imagine 一只猫 --style \\ud800",
        "\\udfff",
    ],
)
async def test_lone_surrogates_in_text_are_a_friendly_400(web, caplog, text):
    server = await web()
    body = ('{"chat": "main", "text": "' + text + '"}').encode()
    response = await server.client.post("/api/messages", data=body)
    assert response.status == 400
    code, message = _error(await response.json())
    assert code == "bad_request" and "surrogate" in message
    assert await server.service.store.recent_jobs("web:main", 5) == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_lone_surrogate_in_the_room_or_a_key_is_a_400(web):
    server = await web()
    for body in (b'{"chat": "m\\ud800", "text": "/help"}', b'{"\\ud800": 1, "text": "/help"}'):
        response = await server.client.post("/api/messages", data=body)
        assert response.status == 400 and "surrogate" in _error(await response.json())[1]


async def test_a_paired_surrogate_escape_is_a_real_character(web):
    server = await web()
    body = '{"chat": "main", "text": "/imagine 猫 \\ud83d\\ude00 --seed 1"}'.encode()
    response = await server.client.post("/api/messages", data=body)
    assert response.status == 200
    assert (await response.json())["job"]["text"] == "猫 😀"


# statuses of the core's refusals ------------------------------------------------------------------


async def test_refusals_of_a_message_have_their_http_status(web):
    gate = asyncio.Event()
    server = await web(PatternEngine(gate=gate), user_max_pending=1, daily_image_quota=2, queue_max_size=1)
    alice, bob, carol = (server.browser(name) for name in ("alice", "bob", "carol"))
    cases = [
        (alice, "/imagine 一只猫 --steps 1000", 400, "invalid_option"),
        (alice, "/imagine", 400, "empty_prompt"),
        (alice, "/imagine 儿童色情", 400, "blocked"),
        (alice, "/frobnicate", 400, "invalid_option"),
        (alice, "/imagine 一只猫 --n 3", 429, "quota"),
    ]
    for browser, text, status, code in cases:
        assert _error(await browser.say(text, status=status))[0] == code, text
    running = await alice.imagine()
    assert _error(await alice.say(IMAGINE, status=429))[0] == "too_many_jobs"
    for _ in range(500):  # the queue holds waiting jobs: once alice's runs, bob's fills it
        if (await server.service.get_job(running["id"])).status.value == "running":
            break
        await asyncio.sleep(0.01)
    await bob.imagine()
    assert _error(await carol.say(IMAGINE, status=429))[0] == "queue_full"
    assert _error(await alice.say("/settings quota 1", status=403))[0] == "not_allowed"
    gate.set()


async def test_an_unavailable_engine_is_503_and_healthz_says_so(web):
    # the real wukong engine with no weights in its (empty) model dir: it cannot draw
    server = await web(None, engine_name="wukong")
    data = await server.client.say(IMAGINE, status=503)
    assert _error(data)[0] == "engine_unavailable"
    response = await server.client.get("/healthz")
    assert response.status == 503
    health = await response.json()
    assert health["ok"] is False and health["engine"] == "wukong"
    assert health["error"]["code"] == "engine_unavailable" and health["error"]["message"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def own_redis(tmp_path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server this test may stop."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs redis-server (apt-get install redis-server)")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", process
    process.terminate()
    process.wait(timeout=10)


async def test_redis_down_is_503_on_messages_and_healthz(web, own_redis):
    url, process = own_redis
    server = await web(queue="redis", redis_url=url)
    assert (await server.client.get("/healthz")).status == 200
    process.terminate()
    process.wait(timeout=10)
    data = await server.client.say(IMAGINE, status=503)
    assert _error(data)[0] == "service_unavailable"
    response = await server.client.get("/healthz")
    assert response.status == 503
    health = await response.json()
    assert health["ok"] is False and health["error"]["code"] == "service_unavailable"


# aiohttp's own refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/no/such/page", 404, "not_found"),
        ("GET", "/static/no-such-file.js", 404, "not_found"),
        ("DELETE", "/api/messages", 405, "method_not_allowed"),
        ("GET", "/api/login", 405, "method_not_allowed"),
    ],
)
async def test_aiohttps_own_refusals_are_json(web, method, path, status, code):
    server = await web()
    response = await server.client.request(method, path)
    assert response.status == status and response.content_type == "application/json"
    assert _error(await response.json())[0] == code
    if status == 405:
        assert "POST" in response.headers["Allow"]


async def test_the_history_limit_is_checked(web):
    server = await web()
    for limit in ("0", "201", "x", "١٢"):
        response = await server.client.get(f"/api/history?limit={limit}")
        assert response.status == 400 and "1 to 200" in _error(await response.json())[1]


# broken HTTP --------------------------------------------------------------------------------------


async def _raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await reader.read(65536)
    writer.close()
    return answer


async def test_malformed_http_requests_are_refused_without_a_traceback_each(web, caplog):
    server = await web()
    port = server.server.port
    assert port is not None
    broken = b"POST /api/messages HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"
    with caplog.at_level(logging.DEBUG):
        answers = [await _raw_request(port, broken) for _ in range(5)]
    assert all(b" 400 " in answer.split(b"\r\n", 1)[0] for answer in answers), answers
    protocol = [r for r in caplog.records if r.name.startswith("bots.web.errors.protocol")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in protocol if r.exc_info or r.exc_text]
    warnings = [r for r in protocol if r.levelno == logging.WARNING]
    assert len(warnings) <= 1
    assert all("malformed HTTP request" in r.getMessage() for r in warnings)


def test_the_protocol_log_summary_lets_one_line_through_per_interval():
    now = [0.0]
    summary = ProtocolErrorSummary(interval_s=60, clock=lambda: now[0])

    def record() -> logging.LogRecord:
        try:
            raise ValueError("Invalid header value")
        except ValueError:
            import sys

            return logging.LogRecord(
                "x", logging.ERROR, __file__, 1, "Error handling request", (), sys.exc_info()
            )

    first = record()
    assert summary.filter(first) and first.levelno == logging.WARNING and first.exc_info is None
    assert "Invalid header value" in first.getMessage()
    assert not summary.filter(record()) and not summary.filter(record())
    now[0] = 61.0
    later = record()
    assert summary.filter(later) and "2 more" in later.getMessage()
    info = logging.LogRecord("x", logging.INFO, __file__, 1, "fine", (), None)
    assert summary.filter(info) and info.levelno == logging.INFO
