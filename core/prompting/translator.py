"""The translator port (any language -> a Chinese image prompt) and its two adapters."""

from __future__ import annotations

import abc
import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import SecretStr

from core.prompting.data import DEFAULT_PROMPTS_DIR, read_data_file
from core.prompting.glossary import Glossary, contains_han
from core.prompting.normalize import collapse_whitespace
from core.settings import Settings

logger = logging.getLogger(__name__)

MAX_REPLY_CHARS = 400


@dataclass(frozen=True)
class Translation:
    text_zh: str
    unknown_words: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


class Translator(abc.ABC):
    """Turns text in another language into a Chinese image prompt."""

    @abc.abstractmethod
    async def translate(self, text: str, source_lang: str) -> Translation:
        """`source_lang` is an ISO 639-1 code or "und"."""


class GlossaryTranslator(Translator):
    """Offline word-by-word translation over `prompts/glossary.tsv`; unknown words stay as written."""

    def __init__(self, glossary: Glossary) -> None:
        self.glossary = glossary

    async def translate(self, text: str, source_lang: str) -> Translation:
        return self.translate_now(text)

    def translate_now(self, text: str) -> Translation:
        result = self.glossary.translate(text)
        return Translation(result.text_zh, result.unknown_words)


class LlmTranslator(Translator):
    """Any OpenAI-compatible `/chat/completions` endpoint; falls back to the glossary on any failure."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: SecretStr | None,
        instructions: str,
        fallback: GlossaryTranslator,
        timeout_s: float = 20.0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key
        self.instructions = instructions
        self.fallback = fallback
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"LlmTranslator(url={self.url!r}, model={self.model!r})"

    @classmethod
    def from_settings(
        cls, settings: Settings, fallback: GlossaryTranslator, prompts_dir: Path | None = None
    ) -> LlmTranslator:
        instructions = read_data_file((prompts_dir or DEFAULT_PROMPTS_DIR) / "translate_instructions.md")
        return cls(
            base_url=settings.llm_base_url,
            model=settings.llm_model,
            api_key=settings.llm_api_key,
            instructions=instructions.strip(),
            fallback=fallback,
            timeout_s=settings.llm_timeout_s,
        )

    async def translate(self, text: str, source_lang: str) -> Translation:
        try:
            reply = await self._ask(text, source_lang)
        except (TimeoutError, aiohttp.ClientError, ValueError) as err:
            logger.warning("LLM translation failed (%s), using the glossary", _describe(err))
            fallback = self.fallback.translate_now(text)
            note = "The translation service did not answer, so the prompt was translated word by word."
            return Translation(fallback.text_zh, fallback.unknown_words, (*fallback.notes, note))
        return Translation(reply)

    async def _ask(self, text: str, source_lang: str) -> str:
        headers = {"Content-Type": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.get_secret_value()}"
        body = {
            "model": self.model,
            "temperature": 0.2,
            "messages": [
                {"role": "system", "content": self.instructions},
                {"role": "user", "content": f"[{source_lang}] {text}"},
            ],
        }
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(self.url, json=body, headers=headers) as response,
        ):
            if response.status != 200:
                raise ValueError(f"HTTP status {response.status}")
            payload = json.loads(await response.text())
        return _reply_text(payload)


def _reply_text(payload: Any) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError("the reply has no choices[0].message.content") from err
    if not isinstance(content, str):
        raise ValueError("the reply content is not text")
    reply = collapse_whitespace(content).strip("\"'“”「」 ")
    if not reply or not contains_han(reply):
        raise ValueError("the reply has no Chinese text")
    return reply[:MAX_REPLY_CHARS]


def _describe(err: BaseException) -> str:
    if isinstance(err, asyncio.TimeoutError):
        return "timed out"
    if isinstance(err, json.JSONDecodeError):
        return "the reply is not JSON"
    return f"{type(err).__name__}: {err}"
