"""Who may do what in the web chat: signed identity cookies, admins, the access token, the start warning."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import SecretStr

from bots.web.app import run_web
from bots.web.identity import COOKIE, Identities, exposure_warning, is_loopback, load_secret
from tests.support import PatternEngine, make_service, make_settings
from tests.web_support import IMAGINE, Browser, Web, start_web

TOKEN = "open sesame 芝麻开门"


@pytest.fixture
async def web(tmp_path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Web] = []

    async def start(engine: PatternEngine | None = None, **settings: Any) -> Web:
        server = await start_web(tmp_path, engine, **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.server.runner is not None:
            await server.close()


def _code(body: dict[str, Any]) -> str:
    return str(body["error"]["code"])


async def _cookie_of(browser: Browser) -> str:
    return next(c.value for c in browser.session.cookie_jar if c.key == COOKIE)


# the identity cookie ------------------------------------------------------------------------------


async def test_the_page_hands_out_a_signed_httponly_lax_cookie(web):
    server = await web()
    browser = server.browser("alice")
    page = await browser.get("/")
    header = page.headers["Set-Cookie"]
    assert header.startswith(f"{COOKIE}=") and "HttpOnly" in header and "SameSite=Lax" in header
    me = await (await browser.get("/api/me")).json()
    assert me == {"user": me["user"], "admin": False} and len(me["user"]) == 16
    assert (await _cookie_of(browser)).startswith(me["user"] + ".")
    # the same browser keeps its identity; another browser gets another one
    assert (await (await browser.get("/api/me")).json())["user"] == me["user"]
    assert await server.browser("bob").open() != me["user"]


@pytest.mark.parametrize("forge", ["unsigned", "other id", "garbage"])
async def test_a_forged_cookie_is_not_believed(web, forge):
    server = await web()
    victim = await server.user_id("victim")
    job = await server.browser("victim").imagine()
    cookie = await _cookie_of(server.browser("victim"))
    forged = {
        "unsigned": victim.removeprefix("web:"),
        "other id": "A" * 16 + cookie[16:],
        "garbage": "x" * 300,
    }[forge]
    mallory = Browser(server.base_url)
    try:
        response = await mallory.get("/api/me", headers={"Cookie": f"{COOKIE}={forged}"})
        assert (await response.json())["user"] != victim.removeprefix("web:")
        response = await mallory.post(
            f"/api/jobs/{job['id']}/actions",
            json={"action": "cancel", "index": 0},
            headers={"Cookie": f"{COOKIE}={forged}"},
        )
        assert response.status == 403
    finally:
        await mallory.close()


async def test_changing_the_user_field_does_not_dodge_the_pending_limit(web):
    gate = asyncio.Event()
    server = await web(PatternEngine(gate=gate), user_max_pending=1)
    alice = server.browser("alice")
    await alice.imagine()
    response = await alice.post(
        "/api/messages", json={"chat": "main", "user": "someone-else", "text": IMAGINE}
    )
    assert response.status == 400 and "Leave out 'user'" in (await response.json())["error"]["message"]
    assert _code(await alice.say(IMAGINE, status=429)) == "too_many_jobs"
    gate.set()


async def test_identities_survive_a_restart_with_the_secret_kept_in_the_data_dir(web, tmp_path):
    first = await web()
    user = await first.browser("alice").open()
    cookie = await _cookie_of(first.browser("alice"))
    await first.close()
    secret_file = tmp_path / "data" / "web_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    second = await web(operator=False)
    response = await second.browser("again").get("/api/me", headers={"Cookie": f"{COOKIE}={cookie}"})
    assert (await response.json())["user"] == user


def test_a_configured_secret_signs_the_same_way_everywhere(tmp_path):
    settings = [make_settings(tmp_path / name, web_secret=SecretStr("k" * 40)) for name in ("one", "two")]
    keys = [load_secret(s) for s in settings]
    assert keys[0] == keys[1] == b"k" * 40
    assert not (tmp_path / "one" / "data" / "web_secret").exists()
    one, two = (Identities(key) for key in keys)
    assert two.user_of(one.cookie_value("abcdefghijklmnop")) == "abcdefghijklmnop"
    assert Identities(b"z" * 40).user_of(one.cookie_value("abcdefghijklmnop")) is None


# admin rights -------------------------------------------------------------------------------------


ADMIN_ONLY = ("/settings enabled off", "/settings quota 5", "/settings style none", "/story end --force")


async def test_only_the_first_local_user_is_an_admin(web):
    server = await web()  # the "operator" browser opened first
    operator, alice = server.browser("operator"), server.browser("alice")
    assert (await (await operator.get("/api/me")).json())["admin"] is True
    assert (await (await alice.get("/api/me")).json())["admin"] is False
    await operator.say("/story new 月亮的故事")
    for text in ADMIN_ONLY:
        data = await alice.say(text, status=403)
        assert _code(data) == "not_allowed", text
    job = await operator.imagine()
    assert (await alice.act(job["id"], "cancel")).status == 403
    # the admin may do all of it, to anyone's
    theirs = await alice.imagine()
    assert (await operator.act(theirs["id"], "cancel")).status == 200
    for text in ADMIN_ONLY:
        data = await operator.say(text)
        assert data["replies"], text


async def test_the_first_local_user_stays_the_admin_after_a_restart(web):
    first = await web()
    cookie = await _cookie_of(first.browser("operator"))
    await first.close()
    second = await web(operator=False)
    newcomer = second.browser("newcomer")
    await newcomer.open()
    assert (await (await newcomer.get("/api/me")).json())["admin"] is False
    me = await second.browser("back").get("/api/me", headers={"Cookie": f"{COOKIE}={cookie}"})
    assert (await me.json())["admin"] is True


async def test_on_a_public_host_only_configured_admins_are_admins(web, tmp_path):
    first = await web(web_host="0.0.0.0", operator=False)
    boss = first.browser("boss")
    boss_id = await boss.open()
    assert (await (await boss.get("/api/me")).json())["admin"] is False
    assert _code(await boss.say("/settings quota 5", status=403)) == "not_allowed"
    cookie = await _cookie_of(boss)
    await first.close()
    second = await web(web_host="0.0.0.0", web_admins=f" nobody , {boss_id} ", operator=False)
    again = second.browser("boss again")
    headers = {"Cookie": f"{COOKIE}={cookie}"}
    assert (await (await again.get("/api/me", headers=headers)).json())["admin"] is True
    response = await again.post("/api/messages", json={"text": "/settings quota 5"}, headers=headers)
    assert response.status == 200, await response.text()
    assert (await second.service.chat_settings("web:@" + boss_id)).daily_quota == 5
    assert (await (await second.browser("other").get("/api/me")).json())["admin"] is False


async def test_an_admin_may_only_lower_the_quota_unless_the_operator_allows_more(web):
    server = await web(daily_image_quota=100)
    operator = server.browser("operator")
    data = await operator.say("/settings quota 10000", status=400)
    assert _code(data) == "invalid_option" and "0 to 100" in data["error"]["message"]
    assert (await operator.say("/settings quota 50"))["replies"]


async def test_the_operator_setting_allows_a_higher_chat_quota(web):
    server = await web(daily_image_quota=100, chat_quota_max=500)
    operator = server.browser("operator")
    assert (await operator.say("/settings quota 500"))["replies"]
    assert _code(await operator.say("/settings quota 501", status=400)) == "invalid_option"


# the access token ---------------------------------------------------------------------------------


async def test_with_a_token_nothing_but_the_page_and_health_answers_before_login(web):
    server = await web(web_token=SecretStr(TOKEN), operator=False)
    browser = server.browser("alice")
    page = await browser.get("/")
    assert page.status == 200 and COOKIE not in page.cookies
    assert (await browser.get("/healthz")).status == 200
    assert (await browser.get("/static/app.js")).status == 200
    for method, path in (("GET", "/api/me"), ("POST", "/api/messages"), ("GET", "/api/history")):
        response = await browser.request(method, path, json={"text": "/help"})
        assert response.status == 401 and _code(await response.json()) == "login_required"

    response = await browser.post("/api/login", json={"token": "wrong"})
    assert response.status == 403 and _code(await response.json()) == "wrong_token"
    response = await browser.post("/api/login", json={"token": TOKEN})
    assert response.status == 200
    assert (await browser.say("/help"))["replies"]
    # pictures stay reachable by their (unguessable) links, which other platforms post
    job = await browser.imagine()
    done = (await browser.events(job["id"]))[-1][1]
    stranger = server.browser("stranger")
    assert (await stranger.get(done["images"][0])).status == 200
    assert (await stranger.get(f"/api/jobs/{job['id']}")).status == 401


async def test_wrong_tokens_are_limited_per_client(web):
    server = await web(web_token=SecretStr(TOKEN), operator=False)
    browser = server.browser("guesser")
    statuses = [(await browser.post("/api/login", json={"token": f"guess {i}"})).status for i in range(11)]
    assert statuses == [403] * 10 + [429]
    assert (await browser.post("/api/login", json={"token": TOKEN})).status == 429


async def test_a_new_token_signs_everyone_out(web):
    first = await web(web_token=SecretStr(TOKEN), operator=False)
    browser = first.browser("alice")
    assert (await browser.post("/api/login", json={"token": TOKEN})).status == 200
    cookie = await _cookie_of(browser)
    await first.close()
    second = await web(web_token=SecretStr("another token"), operator=False)
    response = await second.browser("alice").get("/api/me", headers={"Cookie": f"{COOKIE}={cookie}"})
    assert response.status == 401


# the warning at start -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("", False), ("192.168.1.5", False), ("example.org", False)],
)  # fmt: skip
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_the_exposure_warning_needs_a_public_host_and_no_token(tmp_path):
    assert exposure_warning(make_settings(tmp_path)) is None
    assert exposure_warning(make_settings(tmp_path, web_host="0.0.0.0", web_token=SecretStr("t"))) is None
    warning = exposure_warning(make_settings(tmp_path, web_host="0.0.0.0"))
    assert warning is not None and "HUAHUA_WEB_TOKEN" in warning


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
async def test_the_server_warns_once_at_start_when_exposed_without_a_token(tmp_path, caplog, host, warned):
    service = await make_service(tmp_path, engine=PatternEngine(), web_host=host, web_port=0)
    try:
        with caplog.at_level(logging.INFO, logger="bots.web.app"):
            task = asyncio.create_task(run_web(service, service.settings))
            for _ in range(200):
                if "web chat on" in caplog.text:
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await service.stop()
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "HUAHUA_WEB_TOKEN" in r.getMessage()
    ]
    assert len(warnings) == (1 if warned else 0)
