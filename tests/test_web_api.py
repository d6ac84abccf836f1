"""The web chat's JSON and SSE API on a real loopback server, driving a real service and SQLite store."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from bots.web.app import create_app
from core.presenter import HELP
from tests.support import PatternEngine, make_service

IMAGINE = "/imagine 一只在月球上看书的猫 --ar 3:2 --seed 7"


class Web:
    """A started service, its web app on loopback and an HTTP client for it."""

    def __init__(self, client: TestClient, service: Any, engine: PatternEngine) -> None:
        self.client = client
        self.service = service
        self.engine = engine

    async def say(self, text: str, user: str = "alice", chat: str = "main") -> dict[str, Any]:
        response = await self.client.post("/api/messages", json={"chat": chat, "user": user, "text": text})
        assert response.status == 200, await response.text()
        return await response.json()

    async def imagine(self, user: str = "alice", text: str = IMAGINE) -> dict[str, Any]:
        data = await self.say(text, user=user)
        assert data["job"] is not None, data
        return data["job"]

    async def act(self, job_id: str, action: str, index: Any = 0, user: str = "alice") -> ClientResponse:
        return await self.client.post(
            f"/api/jobs/{job_id}/actions", json={"action": action, "index": index, "user": user}
        )

    async def events(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        response = await self.client.get(f"/api/jobs/{job_id}/events")
        assert response.status == 200
        return [item async for item in read_events(response)]


async def read_events(response: ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Parse a server-sent-events body into (event, data) pairs; comment lines are yielded as ("", {})."""
    kind = ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            yield "", {}
        elif line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            yield kind, json.loads(line[len("data: ") :])


@pytest.fixture
async def start_web(tmp_path) -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[TestClient, Any]] = []

    async def start(engine: PatternEngine | None = None, **settings: Any) -> Web:
        engine = engine or PatternEngine()
        service = await make_service(tmp_path, engine=engine, **settings)
        client = TestClient(TestServer(create_app(service, service.settings, heartbeat_s=0.05)))
        await client.start_server()
        started.append((client, service))
        return Web(client, service, engine)

    yield start
    for client, service in started:
        await client.close()
        await service.stop()


async def _wait_until(predicate: Callable[[], Any], within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# messages -----------------------------------------------------------------------------------------


async def test_help_is_a_plain_reply_without_job(start_web):
    web = await start_web()
    data = await web.say("/help")
    assert data == {"replies": [HELP], "job": None, "jobs": [], "attachments": []}


async def test_imagine_returns_the_job_and_runs_to_done_with_a_served_image(start_web):
    web = await start_web()
    data = await web.say(IMAGINE)
    assert len(data["replies"]) == 1 and "提示词" in data["replies"][0]
    job = data["job"]
    assert job["status"] in ("queued", "running")
    assert job["kind"] == "imagine" and job["parent_id"] is None
    params = job["params"]
    assert params["seed"] == 7
    assert set(params) == {
        "width",
        "height",
        "steps",
        "guidance_scale",
        "seed",
        "n",
        "sampler",
        "negative_prompt",
    }
    assert "猫" in job["prompt_zh"]

    events = await web.events(job["id"])
    assert events[-1][0] == "done"
    response = await web.client.get(f"/api/jobs/{job['id']}")
    assert response.status == 200
    done = await response.json()
    assert done["status"] == "done" and done["progress"] == 1.0 and done["error"] is None
    assert done["label"] == "test pattern"
    assert done["prompt_zh"] in done["caption"] and "seed 7" in done["caption"]
    assert len(done["images"]) == 1 and done["images"] == events[-1][1]["images"]

    image = await web.client.get(done["images"][0])
    assert image.status == 200
    assert image.headers["Content-Type"] == "image/png"
    assert "max-age=31536000" in image.headers["Cache-Control"]
    picture = Image.open(io.BytesIO(await image.read()))
    assert picture.size == (params["width"], params["height"])


async def test_user_and_chat_are_prefixed_with_web(start_web):
    web = await start_web()
    job = await web.imagine(user="bob")
    stored = await web.service.get_job(job["id"])
    assert stored.user == "web:bob" and stored.chat == "web:main"


async def test_hostile_text_is_returned_as_data_not_markup(start_web):
    web = await start_web()
    job = await web.imagine(text="/imagine <img src=x onerror=alert(1)> 猫 --seed 1")
    stored = await web.service.get_job(job["id"])
    assert job["caption"].startswith("提示词:")
    assert stored.source_text.startswith("<img")


async def test_text_over_the_length_limit_gets_a_friendly_reply(start_web):
    web = await start_web(max_text_length=100)
    data = await web.say("/imagine " + "猫" * 200)
    assert data["job"] is None and "too long" in data["replies"][0]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"not json", 400, "JSON object"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"chat": "main", "user": "alice"}', 400, "'text' is missing"),
        (b'{"chat": "main", "user": "alice", "text": 5}', 400, "'text' must be text"),
        (b'{"chat": [], "user": "alice", "text": "/help"}', 400, "'chat' must be text"),
        (b'{"chat": "main", "user": "", "text": "/help"}', 400, "'user' must be a short printable name"),
        (b'{"chat": "main", "user": "a\\u0000b", "text": "/help"}', 400, "printable"),
        (b'{"chat": "main", "user": "alice", "text": "   "}', 400, "Type a message"),
        (b'{"chat": "main", "user": "alice", "text": "\xff\xfe"}', 400, "JSON object"),
    ],
)
async def test_bad_message_bodies_get_400_with_one_sentence(start_web, body, status, fragment):
    web = await start_web()
    response = await web.client.post("/api/messages", data=body, headers={"Content-Type": "application/json"})
    assert response.status == status
    data = await response.json()
    assert fragment in data["error"]
    assert await web.service.queue.size() == 0


async def test_a_100_kb_message_is_refused_before_it_reaches_the_service(start_web):
    web = await start_web()
    body = {"chat": "main", "user": "alice", "text": "/imagine " + "x" * 100_000}
    response = await web.client.post("/api/messages", json=body)
    assert response.status == 413
    assert "too large" in (await response.json())["error"]


# jobs and events ----------------------------------------------------------------------------------


async def test_sse_order_queued_then_started_progress_and_done(start_web):
    gate = asyncio.Event()
    web = await start_web(PatternEngine(gate=gate))
    first = await web.imagine(user="alice")
    second = await web.imagine(user="bob")
    response = await web.client.get(f"/api/jobs/{second['id']}/events")
    stream = read_events(response)
    kind, data = await anext(stream)
    assert kind == "position" and data["status"] == "queued" and data["position"] == 1
    gate.set()
    rest = [(k, d) for k, d in [item async for item in stream] if k]
    kinds = [k for k, _ in rest]
    started = kinds.index("started")
    assert set(kinds[:started]) <= {"position"}
    assert set(kinds[started + 1 : -1]) == {"progress"} and kinds[-1] == "done"
    progress = [d["progress"] for k, d in rest if k == "progress"]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert len(progress) == second["params"]["steps"]
    assert all(d["status"] == "running" for k, d in rest if k in ("started", "progress"))
    assert rest[-1][1]["images"] and rest[-1][1]["id"] == second["id"]
    assert (await web.service.get_job(first["id"])).status.value == "done"


async def test_sse_of_a_finished_job_sends_the_final_event_and_closes(start_web):
    web = await start_web()
    job = await web.imagine()
    await web.events(job["id"])
    events = await web.events(job["id"])
    assert [k for k, _ in events] == ["done"]


async def test_sse_sends_heartbeats_and_unsubscribes_when_the_client_leaves(start_web):
    gate = asyncio.Event()
    web = await start_web(PatternEngine(gate=gate))
    job = await web.imagine()
    response = await web.client.get(f"/api/jobs/{job['id']}/events")
    assert response.headers["Content-Type"].startswith("text/event-stream")
    stream = read_events(response)
    assert (await anext(stream))[0] in ("position", "progress", "started")
    while (await anext(stream))[0] != "":
        pass
    # the bus's per-job subscriber queues (`wants()` also counts chat listeners, e.g. the story book's)
    subscribers = web.service.events._subscribers
    assert subscribers.get(job["id"])
    response.close()

    async def unsubscribed() -> bool:
        return not subscribers.get(job["id"])

    await _wait_until(unsubscribed)
    gate.set()


async def test_cancel_while_queued(start_web):
    gate = asyncio.Event()
    web = await start_web(PatternEngine(gate=gate))
    await web.imagine(user="alice")
    queued = await web.imagine(user="bob")
    response = await web.act(queued["id"], "cancel", user="alice")
    assert response.status == 403
    response = await web.act(queued["id"], "cancel", user="bob")
    assert response.status == 200
    cancelled = await response.json()
    assert cancelled["status"] == "cancelled"
    assert [k for k, _ in await web.events(queued["id"])] == ["cancelled"]
    gate.set()


async def test_cancel_while_running(start_web):
    gate = asyncio.Event()
    web = await start_web(PatternEngine(gate=gate))
    job = await web.imagine()

    async def running() -> bool:
        return (await web.service.get_job(job["id"])).status.value == "running"

    await _wait_until(running)
    response = await web.client.get(f"/api/jobs/{job['id']}/events")
    stream = read_events(response)
    await anext(stream)
    answer = await web.act(job["id"], "cancel")
    assert answer.status == 200 and (await answer.json())["id"] == job["id"]
    gate.set()
    kinds = [k async for k, _ in stream if k]
    assert kinds[-1] == "cancelled"
    final = await (await web.client.get(f"/api/jobs/{job['id']}")).json()
    assert final["status"] == "cancelled" and final["images"] == []


async def test_reroll_variation_and_upscale_make_child_jobs(start_web):
    web = await start_web()
    parent = await web.imagine()
    await web.events(parent["id"])
    for action, kind in (("reroll", "reroll"), ("variation", "variation"), ("upscale", "upscale")):
        response = await web.act(parent["id"], action, 0)
        assert response.status == 200, await response.text()
        child = await response.json()
        assert child["kind"] == kind and child["parent_id"] == parent["id"] and child["id"] != parent["id"]
        assert (await web.events(child["id"]))[-1][0] == "done"
    upscaled = await web.service.get_job(child["id"])
    assert upscaled.request.width == parent["params"]["width"] * 2


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"action": "explode", "index": 0, "user": "alice"}, 400, "reroll, variation, upscale or cancel"),
        ({"action": "variation", "index": 5, "user": "alice"}, 400, "from 1 to 1"),
        ({"action": "upscale", "index": -1, "user": "alice"}, 400, "from 1 to 1"),
        ({"action": "variation", "index": "1", "user": "alice"}, 400, "whole number"),
        ({"action": "variation", "index": True, "user": "alice"}, 400, "whole number"),
        ({"action": "reroll", "index": 0}, 400, "'user' is missing"),
        ({"action": 3, "index": 0, "user": "alice"}, 400, "'action' must be text"),
    ],
)
async def test_bad_actions_get_400(start_web, body, status, fragment):
    web = await start_web()
    parent = await web.imagine()
    await web.events(parent["id"])
    response = await web.client.post(f"/api/jobs/{parent['id']}/actions", json=body)
    assert response.status == status
    assert fragment in (await response.json())["error"]


async def test_quota_refusal_on_an_action_is_429(start_web):
    web = await start_web(daily_image_quota=1)
    parent = await web.imagine()
    await web.events(parent["id"])
    response = await web.act(parent["id"], "reroll")
    assert response.status == 429
    assert "quota" in (await response.json())["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/jobs/nope"),
        ("GET", "/api/jobs/nope/events"),
        ("POST", "/api/jobs/nope/actions"),
    ],
)
async def test_unknown_job_is_404(start_web, method, path):
    web = await start_web()
    body = {"action": "reroll", "index": 0, "user": "alice"}
    response = await web.client.request(method, path, json=body if method == "POST" else None)
    assert response.status == 404
    assert "can't find" in (await response.json())["error"]


# images, page and health --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/images/..%2F..%2Fetc%2Fpasswd.png",
        "/images/../../etc/passwd.png",
        "/images/" + "0" * 64 + ".png",
        "/images/" + "A" * 64 + ".png",
        "/images/abc.png",
    ],
)
async def test_unknown_or_malformed_image_digests_are_404(start_web, path):
    web = await start_web()
    response = await web.client.get(path)
    assert response.status == 404
    assert "root:" not in await response.text()


async def test_healthz_reports_engine_and_queue(start_web):
    gate = asyncio.Event()
    web = await start_web(PatternEngine(gate=gate))
    await web.imagine(user="alice")
    await web.imagine(user="bob")
    response = await web.client.get("/healthz")
    assert response.status == 200
    health = await response.json()
    assert health["ok"] is True and health["engine"] == "pattern" and health["label"] == "test pattern"
    assert health["queue"] == await web.service.queue.size() >= 1
    gate.set()


async def test_the_page_and_its_assets_are_served(start_web):
    web = await start_web()
    page = await web.client.get("/")
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]
    html = await page.text()
    assert "/static/app.js" in html and "/static/style.css" in html
    script = await web.client.get("/static/app.js")
    assert script.status == 200 and "EventSource" in await script.text()
    assert "innerHTML" not in await script.text()


class BrokenHealthEngine(PatternEngine):
    async def health(self) -> dict[str, Any]:
        raise RuntimeError("token=hunter2 leaked")


async def test_unexpected_errors_are_a_generic_500_without_details(start_web, caplog):
    web = await start_web(BrokenHealthEngine())
    response = await web.client.get("/healthz")
    assert response.status == 500
    body = await response.json()
    assert body == {"error": "Something went wrong on the server; please try again."}
    assert "unexpected error on GET /healthz" in caplog.text
