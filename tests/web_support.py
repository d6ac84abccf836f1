"""The web chat on a real loopback server for tests, with one HTTP client (own cookie jar) per browser."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import ClientResponse
from aiohttp.test_utils import TestServer

from bots.web.app import create_app
from tests.support import PatternEngine, make_service

IMAGINE = "/imagine 一只在月球上看书的猫 --ar 3:2 --seed 7"


class Browser:
    """One browser: its own cookie jar, hence its own signed identity once the server gave it one."""

    def __init__(self, base_url: str) -> None:
        # unsafe: keep cookies of an IP-address host (the loopback server)
        self.session = aiohttp.ClientSession(base_url=base_url, cookie_jar=aiohttp.CookieJar(unsafe=True))

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.session.get(path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.session.post(path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.session.request(method, path, **kwargs)

    async def open(self) -> str:
        """Load the page (which hands out the identity) and return the user id."""
        page = await self.get("/")
        assert page.status == 200
        return str((await (await self.get("/api/me")).json())["user"])

    async def say(self, text: str, chat: str = "main", status: int = 200) -> dict[str, Any]:
        response = await self.post("/api/messages", json={"chat": chat, "text": text})
        assert response.status == status, await response.text()
        return await response.json()

    async def imagine(self, text: str = IMAGINE, chat: str = "main") -> dict[str, Any]:
        data = await self.say(text, chat=chat)
        assert data["job"] is not None, data
        return data["job"]

    async def act(self, job_id: str, action: str, index: Any = 0) -> ClientResponse:
        return await self.post(f"/api/jobs/{job_id}/actions", json={"action": action, "index": index})

    async def events(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        response = await self.get(f"/api/jobs/{job_id}/events")
        assert response.status == 200
        return [item async for item in read_events(response)]

    async def close(self) -> None:
        await self.session.close()


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


class Web:
    """A started service, its web app on loopback, and browsers by name (the PatternEngine unless
    `engine_name` asks for a real one).

    On a loopback chat the first browser the server sees is its admin: `start_web` opens "operator"
    first, so "alice" and "bob" are ordinary users unless a test says otherwise."""

    def __init__(self, server: TestServer, service: Any, engine: PatternEngine | None) -> None:
        self.server = server
        self.service = service
        self.engine = engine
        self.base_url = str(server.make_url("/"))
        self.browsers: dict[str, Browser] = {}

    def browser(self, name: str) -> Browser:
        if name not in self.browsers:
            self.browsers[name] = Browser(self.base_url)
        return self.browsers[name]

    @property
    def client(self) -> Browser:
        return self.browser("alice")

    async def user_id(self, name: str) -> str:
        """The service's user id ("web:<id>") of a browser, giving it an identity first if needed."""
        return "web:" + await self.browser(name).open()

    async def close(self) -> None:
        for browser in self.browsers.values():
            await browser.close()
        await self.server.close()
        await self.service.stop()


async def start_web(
    tmp_path: Path,
    engine: PatternEngine | None = None,
    *,
    operator: bool = True,
    heartbeat_s: float = 0.05,
    **settings: Any,
) -> Web:
    if engine is None and "engine_name" not in settings:
        engine = PatternEngine()
    service = await make_service(tmp_path, engine=engine, **settings)
    server = TestServer(create_app(service, service.settings, heartbeat_s=heartbeat_s), host="127.0.0.1")
    await server.start_server()
    web = Web(server, service, engine)
    if operator:
        await web.browser("operator").open()
    return web
