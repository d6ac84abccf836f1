"""LlmTranslator against a fake OpenAI-compatible server on loopback (aiohttp test server)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from core.prompting import GlossaryTranslator, LlmTranslator, load_prompt_data
from core.settings import Settings

API_KEY = "sk-test-very-secret-4242"


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
async def fake() -> AsyncIterator[tuple[FakeLlm, str]]:
    llm = FakeLlm()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", llm.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield llm, str(server.make_url("/v1"))
    finally:
        await server.close()


def make_translator(base_url: str, timeout_s: float = 2.0) -> LlmTranslator:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        translator="llm",
        llm_base_url=base_url + "/",
        llm_model="test-model",
        llm_api_key=SecretStr(API_KEY),
        llm_timeout_s=timeout_s,
    )
    fallback = GlossaryTranslator(load_prompt_data().glossary)
    return LlmTranslator.from_settings(settings, fallback)


async def test_success(fake: tuple[FakeLlm, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    llm, url = fake
    translation = await make_translator(url).translate("a cat reading a book on the moon at night", "en")
    assert translation.text_zh == "一只在月球上看书的猫，夜晚"
    assert translation.unknown_words == () and translation.notes == ()
    body = llm.requests[0]
    assert body["model"] == "test-model"
    assert body["messages"][0]["role"] == "system" and "Chinese" in body["messages"][0]["content"]
    assert body["messages"][1] == {
        "role": "user",
        "content": "[en] a cat reading a book on the moon at night",
    }
    assert llm.headers[0]["Authorization"] == f"Bearer {API_KEY}"
    assert API_KEY not in caplog.text


@pytest.mark.parametrize(
    ("mode", "reply"),
    [("500", ""), ("malformed", ""), ("no_choices", ""), ("ok", "Sorry, I cannot help."), ("ok", "   ")],
)
async def test_failures_fall_back_to_the_glossary(
    fake: tuple[FakeLlm, str], caplog: pytest.LogCaptureFixture, mode: str, reply: str
) -> None:
    caplog.set_level(logging.DEBUG)
    llm, url = fake
    llm.mode, llm.reply = mode, reply
    translation = await make_translator(url).translate("a red fox and a zorblax", "en")
    assert translation.text_zh == "红色狐狸zorblax"
    assert translation.unknown_words == ("zorblax",)
    assert translation.notes == (
        "The translation service did not answer, so the prompt was translated word by word.",
    )
    assert "LLM translation failed" in caplog.text
    assert API_KEY not in caplog.text
    assert len(llm.requests) == 1


async def test_timeout_falls_back(fake: tuple[FakeLlm, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    llm, url = fake
    llm.mode = "slow"
    loop = asyncio.get_running_loop()
    started = loop.time()
    translation = await make_translator(url, timeout_s=0.3).translate("a blue whale", "en")
    assert loop.time() - started < 3
    assert translation.text_zh == "蓝色鲸鱼" and translation.notes
    assert "timed out" in caplog.text and API_KEY not in caplog.text


async def test_unreachable_service_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    translator = make_translator("http://127.0.0.1:9", timeout_s=1.0)
    translation = await translator.translate("a blue whale", "en")
    assert translation.text_zh == "蓝色鲸鱼" and translation.notes
    assert API_KEY not in caplog.text and API_KEY not in repr(translator)


async def test_long_reply_is_capped(fake: tuple[FakeLlm, str]) -> None:
    llm, url = fake
    llm.reply = "“" + "猫" * 1000 + "”"
    translation = await make_translator(url).translate("cats", "en")
    assert translation.text_zh == "猫" * 400
