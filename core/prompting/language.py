"""Which language a prompt is written in: a script fast path, then lingua over a small language set."""

from __future__ import annotations

import logging
from functools import lru_cache

from lingua import Language, LanguageDetector, LanguageDetectorBuilder

logger = logging.getLogger(__name__)

UNKNOWN = "und"
_SAMPLE_CHARS = 1000
_LANGUAGES = (
    Language.CHINESE,
    Language.ENGLISH,
    Language.JAPANESE,
    Language.KOREAN,
    Language.FRENCH,
    Language.GERMAN,
    Language.SPANISH,
    Language.ITALIAN,
    Language.PORTUGUESE,
    Language.RUSSIAN,
)


def is_han(char: str) -> bool:
    code = ord(char)
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF


def _is_kana(char: str) -> bool:
    return 0x3040 <= ord(char) <= 0x30FF


def _is_hangul(char: str) -> bool:
    code = ord(char)
    return 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF


@lru_cache(maxsize=1)
def _detector() -> LanguageDetector:
    logger.debug("building the language detector")
    return LanguageDetectorBuilder.from_languages(*_LANGUAGES).build()


def detect_language(text: str) -> str:
    """ISO 639-1 code ("zh", "en", "ja", ...) or "und" when the text has no letters or no clear answer.

    Mostly-Han text without kana is Chinese and never reaches lingua; kana means Japanese and Hangul
    Korean. Only the first 1,000 characters are looked at.
    """
    sample = text[:_SAMPLE_CHARS]
    letters = [char for char in sample if char.isalpha()]
    if not letters:
        return UNKNOWN
    han = sum(1 for char in letters if is_han(char))
    kana = sum(1 for char in letters if _is_kana(char))
    hangul = sum(1 for char in letters if _is_hangul(char))
    total = len(letters)
    if kana and (kana + han) * 2 >= total:
        return "ja"
    if hangul * 2 >= total:
        return "ko"
    if han * 2 >= total:
        return "zh"
    language = _detector().detect_language_of(sample)
    if language is None:
        return UNKNOWN
    return language.iso_code_639_1.name.lower()
