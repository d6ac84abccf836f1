"""The built-in WordPiece vocabulary: made by the rules below, a stand-in for the official vocab_zh.txt.

The official vocabulary (BERT's Chinese WordPiece, 21,128 lines) comes with the checkpoint from
`huahua model fetch`; the repository does not carry it. The tiny engine, and prompt building for it,
use this one when that file is absent, so a fresh clone draws without any download. Its special tokens
sit at the official ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103); every other id differs
from the official file, so it suits the random-weight tiny model only, never the official checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import string
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from core.settings import Settings
from core.tokenizer import WordPieceTokenizer, basic_tokens

logger = logging.getLogger(__name__)

SOURCE = "<built-in vocabulary>"

CHARACTER_RANGES = (
    (0x0021, 0x007E),  # ASCII punctuation, digits and letters
    (0x00A1, 0x00FF),  # Latin-1 symbols and the letters that survive lower-casing and accent stripping
    (0x2010, 0x205E),  # general punctuation: dashes, quotes, ellipsis
    (0x3001, 0x303F),  # CJK symbols and punctuation
    (0x3041, 0x30FF),  # hiragana and katakana
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xFF01, 0xFF65),  # full-width forms
)
"""Characters that get a token of their own, in this order."""

SUFFIXES = ("ing", "ed", "er", "est", "ly", "tion", "ness", "ment", "ful", "less", "able", "ous", "ism")
"""Common English endings, as continuation pieces (`##ing`), besides every letter and letter pair."""


def _specials() -> list[str]:
    """[PAD], [unused1] to [unused99], [UNK], [CLS], [SEP], [MASK]: ids 0 to 103, as in the official file."""
    return ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _characters() -> Iterator[str]:
    """Each character of CHARACTER_RANGES that is assigned and that basic tokenization keeps as it is."""
    for low, high in CHARACTER_RANGES:
        for code in range(low, high + 1):
            char = chr(code)
            if unicodedata.category(char) != "Cn" and list(basic_tokens(char)) == [char]:
                yield char


def _word_pieces() -> Iterator[str]:
    """Every lower-case letter and digit, and every pair of letters, as a word start and a continuation;
    then the SUFFIXES: so any ASCII word splits into known pieces, longest match first."""
    singles = string.ascii_lowercase + string.digits
    pairs = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    yield from ("##" + c for c in singles)
    yield from pairs
    yield from ("##" + p for p in pairs)
    yield from ("##" + s for s in SUFFIXES)


@functools.cache
def builtin_vocabulary() -> tuple[str, ...]:
    """The vocabulary's lines: line i is token id i."""
    lines = _specials()
    seen = set(lines)
    for token in (*_characters(), *_word_pieces()):
        if token not in seen:
            seen.add(token)
            lines.append(token)
    return tuple(lines)


def builtin_vocabulary_text() -> str:
    """The vocabulary as a vocab.txt file's text (one token a line)."""
    return "".join(line + "\n" for line in builtin_vocabulary())


def builtin_vocabulary_sha256() -> str:
    return hashlib.sha256(builtin_vocabulary_text().encode("utf-8")).hexdigest()


@functools.cache
def builtin_tokenizer() -> WordPieceTokenizer:
    """The tokenizer over the built-in vocabulary (made once per process)."""
    lines = builtin_vocabulary()
    logger.info("Using the built-in vocabulary (%d entries): vocab_zh.txt is not installed", len(lines))
    return WordPieceTokenizer.from_lines(lines, source=SOURCE)


def tiny_vocabulary(settings: Settings) -> Path | WordPieceTokenizer:
    """The tiny engine's vocabulary: the configured or installed vocab_zh.txt, else the built-in one.

    A `HUAHUA_VOCAB_PATH` that names no file is returned as it is, so loading it fails loudly."""
    path = settings.resolved_vocab_path
    if settings.vocab_path is not None or path.is_file():
        return path
    return builtin_tokenizer()
