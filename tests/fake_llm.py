"""A fake OpenAI-compatible `/v1/chat/completions` endpoint on loopback, for the LLM clients' tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class FakeLlm:
    """What the fake endpoint answers next, and the requests it saw."""

    mode: str = "ok"
    reply: str = "一只在月球上看书的猫，夜晚"
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        self.requests.append(await request.json())
        if self.mode == "500":
            return web.Response(status=500, text="internal error")
        if self.mode == "slow":
            await asyncio.sleep(5)
        if self.mode == "malformed":
            return web.Response(text="{not json", content_type="application/json")
        if self.mode == "no_choices":
            return web.json_response({"choices": []})
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": self.reply}}]})


@pytest.fixture
async def fake_llm() -> AsyncIterator[tuple[FakeLlm, str]]:
    llm = FakeLlm()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", llm.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield llm, str(server.make_url("/v1"))
    finally:
        await server.close()
