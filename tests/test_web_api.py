"""The web chat's JSON and SSE API on a real loopback server, driving a real service and SQLite store."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from PIL import Image

from core.presenter import HELP
from tests.support import PatternEngine, until
from tests.web_support import IMAGINE, Web, read_events
from tests.web_support import start_web as start_web_server


@pytest.fixture
async def start_web(tmp_path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Web] = []

    async def start(engine: PatternEngine | None = None, **settings: Any) -> Web:
        web = await start_web_server(tmp_path, engine, **settings)
        started.append(web)
        return web

    yield start
    for web in started:
        await web.close()


async def _wait_until(predicate: Callable[[], Any], within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _message(body: dict[str, Any]) -> str:
    """The sentence of an API error body {"error": {"code": ..., "message": ...}}."""
    return str(body["error"]["message"])


# messages -----------------------------------------------------------------------------------------


async def test_help_is_a_plain_reply_without_job(start_web):
    web = await start_web()
    data = await web.client.say("/help")
    assert data == {"replies": [HELP], "job": None, "jobs": [], "attachments": []}


async def test_imagine_returns_the_job_and_runs_to_done_with_a_served_image(start_web):
    web = await start_web()
    data = await web.client.say(IMAGINE)
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

    events = await web.client.events(job["id"])
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


async def test_the_user_comes_from_the_cookie_and_the_chat_is_prefixed_with_web(start_web):
    web = await start_web()
    bob = await web.user_id("bob")
    job = await web.browser("bob").imagine()
    stored = await web.service.get_job(job["id"])
    assert stored.user == bob and stored.chat == "web:main" and job["mine"] is True
    assert bob != await web.user_id("alice")
    own = (await web.browser("bob").say("/imagine 一只猫", chat=""))["job"]
    assert (await web.service.get_job(own["id"])).chat == f"web:@{bob.removeprefix('web:')}"


async def test_hostile_text_is_returned_as_data_not_markup(start_web):
    web = await start_web()
    job = await web.client.imagine(text="/imagine <img src=x onerror=alert(1)> 猫 --seed 1")
    stored = await web.service.get_job(job["id"])
    assert job["caption"].startswith("提示词:")
    assert stored.source_text.startswith("<img")


async def test_text_over_the_length_limit_gets_a_friendly_reply(start_web):
    web = await start_web(max_text_length=100)
    data = await web.client.say("/imagine " + "猫" * 200, status=400)
    assert data["error"]["code"] == "invalid_option" and "too long" in _message(data)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"not json", 400, "JSON object"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"chat": "main"}', 400, "'text' is missing"),
        (b'{"chat": "main", "text": 5}', 400, "'text' must be text"),
        (b'{"chat": [], "text": "/help"}', 400, "'chat' must be text"),
        (b'{"chat": "main", "user": "alice", "text": "/help"}', 400, "Leave out 'user'"),
        (b'{"chat": "a\\u0000b", "text": "/help"}', 400, "printable"),
        (b'{"chat": "@someone", "text": "/help"}', 400, "not starting with @"),
        (b'{"chat": "main", "text": "   "}', 400, "Type a message"),
        (b'{"chat": "main", "text": "\\ufeff "}', 400, "Type a message"),
        (b'{"chat": "main", "text": "\xff\xfe"}', 400, "JSON object"),
    ],
)
async def test_bad_message_bodies_get_400_with_one_sentence(start_web, body, status, fragment):
    web = await start_web()
    response = await web.client.post("/api/messages", data=body, headers={"Content-Type": "application/json"})
    assert response.status == status
    data = await response.json()
    assert fragment in _message(data) and data["error"]["code"] == "bad_request"
    assert await web.service.queue.size() == 0


async def test_a_100_kb_message_is_refused_before_it_reaches_the_service(start_web):
    web = await start_web()
    body = {"chat": "main", "text": "/imagine " + "x" * 100_000}
    response = await web.client.post("/api/messages", json=body)
    assert response.status == 413
    data = await response.json()
    assert "too large" in _message(data) and data["error"]["code"] == "too_large"


# jobs and events ----------------------------------------------------------------------------------


async def test_sse_order_queued_then_started_progress_and_done(start_web):
    gate = asyncio.Event()
    web = await start_web(PatternEngine(gate=gate))
    first = await web.browser("alice").imagine()
    second = await web.browser("bob").imagine()
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
    job = await web.client.imagine()
    await web.client.events(job["id"])
    events = await web.client.events(job["id"])
    assert [k for k, _ in events] == ["done"]


async def test_sse_sends_heartbeats_and_unsubscribes_when_the_client_leaves(start_web):
    gate = asyncio.Event()
    web = await start_web(PatternEngine(gate=gate))
    job = await web.client.imagine()
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
    await web.browser("alice").imagine()
    queued = await web.browser("bob").imagine()
    response = await web.browser("alice").act(queued["id"], "cancel")
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "not_allowed"
    response = await web.browser("bob").act(queued["id"], "cancel")
    assert response.status == 200
    cancelled = await response.json()
    assert cancelled["status"] == "cancelled"
    assert [k for k, _ in await web.client.events(queued["id"])] == ["cancelled"]
    gate.set()


async def test_cancel_while_running(start_web):
    gate = asyncio.Event()
    web = await start_web(PatternEngine(gate=gate))
    job = await web.client.imagine()

    async def running() -> bool:
        return (await web.service.get_job(job["id"])).status.value == "running"

    await _wait_until(running)
    response = await web.client.get(f"/api/jobs/{job['id']}/events")
    stream = read_events(response)
    await anext(stream)
    answer = await web.client.act(job["id"], "cancel")
    assert answer.status == 200 and (await answer.json())["id"] == job["id"]
    gate.set()
    kinds = [k async for k, _ in stream if k]
    assert kinds[-1] == "cancelled"
    final = await (await web.client.get(f"/api/jobs/{job['id']}")).json()
    assert final["status"] == "cancelled" and final["images"] == []


async def test_reroll_variation_and_upscale_make_child_jobs(start_web):
    web = await start_web()
    parent = await web.client.imagine()
    await web.client.events(parent["id"])
    for action, kind in (("reroll", "reroll"), ("variation", "variation"), ("upscale", "upscale")):
        response = await web.client.act(parent["id"], action, 0)
        assert response.status == 200, await response.text()
        child = await response.json()
        assert child["kind"] == kind and child["parent_id"] == parent["id"] and child["id"] != parent["id"]
        assert (await web.client.events(child["id"]))[-1][0] == "done"
    upscaled = await web.service.get_job(child["id"])
    assert upscaled.request.width == parent["params"]["width"] * 2


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"action": "explode", "index": 0}, 400, "reroll, variation, upscale or cancel"),
        ({"action": "variation", "index": 5}, 400, "from 1 to 1"),
        ({"action": "upscale", "index": -1}, 400, "from 1 to 1"),
        ({"action": "variation", "index": "1"}, 400, "whole number"),
        ({"action": "variation", "index": True}, 400, "whole number"),
        ({"action": "reroll", "index": 0, "user": "bob"}, 400, "Leave out 'user'"),
        ({"action": 3, "index": 0}, 400, "'action' must be text"),
    ],
)
async def test_bad_actions_get_400(start_web, body, status, fragment):
    web = await start_web()
    parent = await web.client.imagine()
    await web.client.events(parent["id"])
    response = await web.client.post(f"/api/jobs/{parent['id']}/actions", json=body)
    assert response.status == status
    assert fragment in _message(await response.json())


async def test_quota_refusal_on_an_action_is_429(start_web):
    web = await start_web(daily_image_quota=1)
    parent = await web.client.imagine()
    await web.client.events(parent["id"])
    response = await web.client.act(parent["id"], "reroll")
    assert response.status == 429
    data = await response.json()
    assert "quota" in _message(data) and data["error"]["code"] == "quota"


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
    body = {"action": "reroll", "index": 0}
    response = await web.client.request(method, path, json=body if method == "POST" else None)
    assert response.status == 404
    assert "can't find" in _message(await response.json())


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
    await web.browser("alice").imagine()
    await web.browser("bob").imagine()
    response = await web.client.get("/healthz")
    assert response.status == 200
    health = await response.json()
    assert health["ok"] is True and health["engine"] == "pattern" and health["label"] == "test pattern"
    assert health["queue"] == await web.service.queue.size() >= 1
    gate.set()

    async def counted() -> bool:
        counters = (await (await web.client.get("/healthz")).json())["counters"]
        return bool(counters.get("jobs_done") == 2)

    await until(counted)


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
    assert body == {
        "error": {"code": "internal", "message": "Something went wrong on the server; please try again."}
    }
    assert "unexpected error on GET /healthz" in caplog.text
