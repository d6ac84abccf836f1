"""English-to-Chinese word list for prompts: longest phrase first, simple lemmas, stop words dropped.

`prompts/glossary.tsv` rows are `english<TAB>chinese`; a Chinese side of `-` marks a stop word that is
dropped. Words the list does not know stay in the prompt as written and are reported, never dropped.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.prompting.data import PromptDataError, data_lines
from core.prompting.language import is_han

STOP = "-"
CLAUSE_BREAK = "，"

_TOKEN = re.compile(
    r"(?P<latin>[A-Za-zÀ-ÖØ-öø-ɏ]+(?:['’][A-Za-zÀ-ÖØ-öø-ɏ]+)*)"
    r"|(?P<number>\d+(?:\.\d+)?)"
    r"|(?P<han>[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)"
    r"|(?P<letters>[^\W\d_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)"
    r"|(?P<brk>[,;.!?，。；！？\n])"
    r"|(?P<other>\S)"
)
_PHRASE_SPACE = re.compile(r"[\s\-]+")


@dataclass(frozen=True)
class Token:
    text: str
    kind: str  # latin, number, han, letters, brk, other


def tokenize(text: str) -> Iterator[Token]:
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup or "other"
        yield Token(match.group(), kind)


def lemmas(word: str) -> list[str]:
    """The word and its likely base forms: plurals, -ing, -ed, possessive 's."""
    forms = [word]
    if word.endswith(("'s", "’s")):
        forms.append(word[:-2])
        word = word[:-2]

    def add(form: str) -> None:
        if len(form) >= 2 and form not in forms:
            forms.append(form)

    if word.endswith("ies") and len(word) > 4:
        add(word[:-3] + "y")
    if word.endswith("ves"):
        add(word[:-3] + "f")
        add(word[:-3] + "fe")
    if word.endswith("es"):
        add(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        add(word[:-1])
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            stem = word[: -len(suffix)]
            add(stem)
            add(stem + "e")
            if len(stem) > 2 and stem[-1] == stem[-2]:
                add(stem[:-1])
            if suffix == "ed" and stem.endswith("i"):
                add(stem[:-1] + "y")
    return forms


@dataclass(frozen=True)
class GlossaryResult:
    text_zh: str
    unknown_words: tuple[str, ...]


class Glossary:
    """Immutable English phrase -> Chinese table."""

    def __init__(self, entries: Mapping[str, str]) -> None:
        self._entries = dict(entries)
        self._max_words = max((len(key.split(" ")) for key in self._entries), default=1)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, phrase: object) -> bool:
        return isinstance(phrase, str) and _phrase_key(phrase) in self._entries

    @classmethod
    def from_file(cls, path: Path) -> Glossary:
        entries: dict[str, str] = {}
        for number, line in data_lines(path):
            fields = [field.strip() for field in line.split("\t")]
            if len(fields) != 2 or not fields[0] or not fields[1]:
                raise PromptDataError(
                    f"{path.name} line {number} must be 'english<TAB>chinese' (or '-' for a stop word)."
                )
            key = _phrase_key(fields[0])
            if key in entries:
                raise PromptDataError(f"{path.name} line {number} repeats the entry '{fields[0]}'.")
            entries[key] = fields[1]
        if not entries:
            raise PromptDataError(f"{path.name} has no entries.")
        return cls(entries)

    def lookup(self, phrase: str) -> str | None:
        """The Chinese for a phrase ("" for a stop word), trying base forms of its last word."""
        words = _phrase_key(phrase).split(" ")
        for last in lemmas(words[-1]):
            found = self._entries.get(" ".join([*words[:-1], last]))
            if found is not None:
                return "" if found == STOP else found
        return None

    def translate(self, text: str) -> GlossaryResult:
        """Word-by-word translation; Han text passes through, unknown words stay as written."""
        tokens = list(tokenize(text))
        pieces: list[tuple[str, bool]] = []  # (text, is_latin_like)
        unknown: list[str] = []
        index = 0
        while index < len(tokens):
            token = tokens[index]
            if token.kind == "latin":
                span, chinese = self._longest_match(tokens, index)
                if chinese is None:
                    pieces.append((token.text, True))
                    if token.text.lower() not in (word.lower() for word in unknown):
                        unknown.append(token.text)
                    index += 1
                    continue
                if chinese:
                    pieces.append((chinese, False))
                index += span
                continue
            if token.kind == "brk":
                pieces.append((CLAUSE_BREAK, False))
            elif token.kind == "han":
                pieces.append((token.text, False))
            elif token.kind == "number":
                pieces.append((token.text, True))
            elif token.kind in ("letters", "other"):
                chinese = self._entries.get(token.text)
                if chinese is not None and chinese != STOP:
                    pieces.append((chinese, False))
                elif token.kind == "letters" or token.text.isalnum() or _is_symbol(token.text):
                    pieces.append((token.text, token.kind == "letters"))
                    if token.text not in unknown:
                        unknown.append(token.text)
            index += 1
        return GlossaryResult(_join(pieces), tuple(unknown))

    def _longest_match(self, tokens: list[Token], start: int) -> tuple[int, str | None]:
        words: list[str] = []
        for token in tokens[start : start + self._max_words]:
            if token.kind != "latin":
                break
            words.append(token.text.lower())
        for length in range(len(words), 0, -1):
            found = self.lookup(" ".join(words[:length]))
            if found is not None:
                return length, found
        return 1, None


def _is_symbol(text: str) -> bool:
    return unicodedata.category(text[0]) == "So"


def _phrase_key(phrase: str) -> str:
    return _PHRASE_SPACE.sub(" ", phrase.strip().lower().replace("’", "'"))


def _join(pieces: list[tuple[str, bool]]) -> str:
    out: list[str] = []
    previous_latin = False
    for text, latin in pieces:
        if text == CLAUSE_BREAK and (not out or out[-1] == CLAUSE_BREAK):
            continue
        if out and latin and previous_latin:
            out.append(" ")
        out.append(text)
        previous_latin = latin
    while out and out[-1] == CLAUSE_BREAK:
        out.pop()
    return "".join(out)


def contains_han(text: str) -> bool:
    return any(is_han(char) for char in text)
