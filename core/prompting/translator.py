"""The translator port (any language -> a Chinese image prompt) and its two adapters."""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from pathlib import Path

from core.llm import ChatClient, LlmError
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

    def __init__(self, client: ChatClient, instructions: str, fallback: GlossaryTranslator) -> None:
        self.client = client
        self.instructions = instructions
        self.fallback = fallback

    def __repr__(self) -> str:
        return f"LlmTranslator({self.client!r})"

    @classmethod
    def from_settings(
        cls, settings: Settings, fallback: GlossaryTranslator, prompts_dir: Path | None = None
    ) -> LlmTranslator:
        instructions = read_data_file((prompts_dir or DEFAULT_PROMPTS_DIR) / "translate_instructions.md")
        return cls(ChatClient.from_settings(settings), instructions.strip(), fallback)

    async def translate(self, text: str, source_lang: str) -> Translation:
        try:
            reply = _chinese_reply(await self.client.complete(self.instructions, f"[{source_lang}] {text}"))
        except LlmError as err:
            logger.warning("LLM translation failed (%s), using the glossary", err)
            fallback = self.fallback.translate_now(text)
            note = "The translation service did not answer, so the prompt was translated word by word."
            return Translation(fallback.text_zh, fallback.unknown_words, (*fallback.notes, note))
        return Translation(reply)


def _chinese_reply(content: str) -> str:
    reply = collapse_whitespace(content).strip("\"'“”「」 ")
    if not reply or not contains_han(reply):
        raise LlmError("the reply has no Chinese text")
    return reply[:MAX_REPLY_CHARS]
