"""Blocklist moderation of user text and final prompts, robust to spacing, width and script tricks."""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from core.errors import BlockedPrompt
from core.prompting.data import DEFAULT_PROMPTS_DIR, PromptDataError, data_lines
from core.prompting.language import is_han
from core.prompting.normalize import strip_controls, to_simplified

logger = logging.getLogger(__name__)

BLOCKED_MESSAGE = "Sorry, I can't draw that: the request asks for something that isn't allowed here."
_SECTION = re.compile(r"^\[([\w-]+)\]$")
_LATIN_WORD = re.compile(r"[a-z0-9\u00df-\u024f]+")
_INNER_PUNCTUATION = re.compile(r"(?<=[^\W_])[^\w\s]+(?=[^\W_])|_+")
_MAX_WINDOW = 8


@dataclass(frozen=True)
class BlockTerm:
    category: str
    text: str
    """Normalised: Han terms without spaces; Latin terms as words joined without spaces."""
    prefix: bool = False


def fold(text: str) -> str:
    """NFKC, lower case, Simplified script, control and zero-width characters removed."""
    return to_simplified(strip_controls(unicodedata.normalize("NFKC", text)).casefold())


def squeeze(text: str) -> str:
    """Only letters and digits are left: spaces and punctuation removed."""
    return "".join(char for char in fold(text) if char.isalnum())


def latin_words(text: str) -> list[str]:
    """Latin words after joining split-up words ("p.o.r.n" -> "porn", "l o l i" -> "loli")."""
    words = _LATIN_WORD.findall(_INNER_PUNCTUATION.sub("", fold(text)))
    joined: list[str] = []
    letters: list[str] = []
    for word in words:
        if len(word) == 1:
            letters.append(word)
            continue
        if letters:
            joined.append("".join(letters))
            letters = []
        joined.append(word)
    if letters:
        joined.append("".join(letters))
    return joined


class Moderator:
    """Raises BlockedPrompt for text that matches the blocklist."""

    def __init__(self, terms: list[BlockTerm]) -> None:
        self._han = [term for term in terms if any(is_han(char) for char in term.text)]
        latin = [term for term in terms if term not in self._han]
        self._exact = {term.text: term for term in latin if not term.prefix}
        self._prefixes = [term for term in latin if term.prefix]
        self._prefix_texts = tuple(term.text for term in self._prefixes)

    def __len__(self) -> int:
        return len(self._han) + len(self._exact) + len(self._prefixes)

    @classmethod
    def from_file(cls, path: Path | None = None) -> Moderator:
        path = path or DEFAULT_PROMPTS_DIR / "blocklist.txt"
        category = "general"
        terms: list[BlockTerm] = []
        for number, line in data_lines(path):
            section = _SECTION.match(line)
            if section:
                category = section.group(1)
                continue
            prefix = line.endswith("*")
            raw = line.rstrip("*").strip()
            text = squeeze(raw) if any(is_han(char) for char in fold(raw)) else "".join(latin_words(raw))
            if not text or (prefix and len(text) < 4):
                raise PromptDataError(
                    f"{path.name} line {number}: '{line}' has no letters to match "
                    "(a * term needs at least 4 letters)."
                )
            terms.append(BlockTerm(category, text, prefix))
        return cls(terms)

    def match(self, text: str) -> BlockTerm | None:
        """The first blocklist term found in the text, or None."""
        if not text:
            return None
        squeezed = squeeze(text)
        for term in self._han:
            if term.text in squeezed:
                return term
        words = latin_words(text)
        for start in range(len(words)):
            window = ""
            for word in words[start : start + _MAX_WINDOW]:
                window += word
                found = self._exact.get(window)
                if found is not None:
                    return found
                if self._prefix_texts and window.startswith(self._prefix_texts):
                    return next(term for term in self._prefixes if window.startswith(term.text))
        return None

    def check(self, text: str) -> None:
        """Raise BlockedPrompt (without echoing the term) when the text matches the blocklist."""
        term = self.match(text)
        if term is not None:
            logger.info("blocked a request (category %s)", term.category)
            raise BlockedPrompt(BLOCKED_MESSAGE)
