"""Text clean-up shared by prompt building and moderation: control characters, width, script."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import opencc

_WHITESPACE = re.compile(r"\s+")
_MARKUP = re.compile(r"<\s*/?\s*[A-Za-z!][^<>]{0,500}>")
_FULL_WIDTH_START, _FULL_WIDTH_END, _FULL_WIDTH_SHIFT = 0xFF01, 0xFF5E, 0xFEE0
_IDEOGRAPHIC_SPACE = "\u3000"


@lru_cache(maxsize=1)
def _t2s() -> opencc.OpenCC:
    return opencc.OpenCC("t2s")


def to_simplified(text: str) -> str:
    """Traditional Chinese characters to Simplified (OpenCC t2s); other text is unchanged."""
    return str(_t2s().convert(text)) if text else text


def to_half_width(text: str) -> str:
    """Full-width ASCII forms (Ａ１：，) to their ASCII twins, and the ideographic space to a space."""
    chars = []
    for char in text:
        code = ord(char)
        if _FULL_WIDTH_START <= code <= _FULL_WIDTH_END:
            chars.append(chr(code - _FULL_WIDTH_SHIFT))
        elif char == _IDEOGRAPHIC_SPACE:
            chars.append(" ")
        else:
            chars.append(char)
    return "".join(chars)


def strip_controls(text: str) -> str:
    """Control and format characters (NUL, bidi marks, zero-width joiners) become spaces or vanish."""
    chars = []
    for char in text:
        category = unicodedata.category(char)
        if char in "\t\n\r" or category.startswith("Z"):
            chars.append(" ")
        elif category in ("Cc", "Cf", "Cs", "Co", "Cn"):
            continue
        elif char == "\ufe0f" or char == "\ufe0e":  # emoji presentation selectors
            continue
        else:
            chars.append(char)
    return "".join(chars)


def strip_markup(text: str) -> tuple[str, bool]:
    """Remove HTML/XML-looking tags; returns the text and whether anything was removed."""
    cleaned = _MARKUP.sub(" ", text)
    return cleaned, cleaned != text


def collapse_whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def clean_text(text: str) -> tuple[str, bool]:
    """Controls removed, markup removed, whitespace collapsed; returns (text, markup_removed)."""
    cleaned, had_markup = strip_markup(strip_controls(text))
    return collapse_whitespace(cleaned), had_markup


def normalize_chinese(text: str) -> str:
    """Chinese prompt form: Simplified script, half-width ASCII, single spaces, no spaces between CJK."""
    text = collapse_whitespace(to_half_width(strip_controls(text)))
    text = to_simplified(text)
    return _drop_spaces_between_cjk(text)


_CJK_SPACE = re.compile(r"(?<=[\u3400-\u9fff\uf900-\ufaff，。、！？：；]) (?=[\u3400-\u9fff\uf900-\ufaff])")


def _drop_spaces_between_cjk(text: str) -> str:
    return _CJK_SPACE.sub("", text)
