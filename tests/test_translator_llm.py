"""LlmTranslator against a fake OpenAI-compatible server on loopback (aiohttp test server)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from pydantic import SecretStr

from core.prompting import GlossaryTranslator, LlmTranslator, load_prompt_data
from core.settings import Settings
from tests.fake_llm import FakeLlm

API_KEY = "sk-test-very-secret-4242"


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


async def test_success(fake_llm: tuple[FakeLlm, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    llm, url = fake_llm
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
    fake_llm: tuple[FakeLlm, str], caplog: pytest.LogCaptureFixture, mode: str, reply: str
) -> None:
    caplog.set_level(logging.DEBUG)
    llm, url = fake_llm
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


async def test_timeout_falls_back(fake_llm: tuple[FakeLlm, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    llm, url = fake_llm
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


async def test_long_reply_is_capped(fake_llm: tuple[FakeLlm, str]) -> None:
    llm, url = fake_llm
    llm.reply = "“" + "猫" * 1000 + "”"
    translation = await make_translator(url).translate("cats", "en")
    assert translation.text_zh == "猫" * 400
