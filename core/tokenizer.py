"""The Wukong-Huahua text tokenizer: BERT basic tokenization then WordPiece over `vocab_zh.txt`.

Ids match the reference (`ldm/models/clip_zh/simple_tokenizer.py` of minddiffusion): `[CLS]` first,
`[SEP]` last, `[PAD]` after, at most 75 pieces. When the vocabulary is absent, `BasicTokenCounter`
counts basic tokens instead, so prompt building can still keep within the budget approximately.
"""

from __future__ import annotations

import itertools
import logging
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from core.errors import CheckpointError, InvalidOption

logger = logging.getLogger(__name__)

MAX_PIECES = 75
CONTEXT_LENGTH = 77
MAX_WORD_CHARS = 100
MAX_VOCAB_BYTES = 16 * 1024 * 1024
UNK, CLS, SEP, PAD = "[UNK]", "[CLS]", "[SEP]", "[PAD]"
_KEPT_WHOLE = frozenset({UNK, "<|startoftext|>", "<|endoftext|>"})
"""Whitespace-separated words the reference neither lower-cases nor splits; all of them end up [UNK]."""

_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(char: str) -> bool:
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _strip_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def _clean(text: str) -> str:
    """Drop NUL, U+FFFD and control characters, turn whitespace into spaces, space out CJK characters."""
    out: list[str] = []
    for char in text:
        if char in "\x00\ufffd" or _is_control(char):
            continue
        if _is_whitespace(char):
            out.append(" ")
        elif _is_cjk(char):
            out.append(f" {char} ")
        else:
            out.append(char)
    return "".join(out)


def _split_punctuation(word: str) -> Iterator[str]:
    start = 0
    for i, char in enumerate(word):
        if _is_punctuation(char):
            if start < i:
                yield word[start:i]
            yield char
            start = i + 1
    if start < len(word):
        yield word[start:]


def basic_tokens(text: str) -> Iterator[str]:
    """BERT basic tokenization: cleaned, lower-cased, accents stripped, CJK and punctuation split."""
    if not isinstance(text, str):
        raise InvalidOption(f"The prompt must be text, not {type(text).__name__}.")
    for word in _clean(text).split():
        if word in _KEPT_WHOLE:
            yield UNK
            continue
        for token in _split_punctuation(_strip_accents(word.lower())):
            yield from token.split()


COUNT_CACHE_SIZE = 8192


class WordPieceTokenizer:
    """Greedy longest-match-first WordPiece over the BERT Chinese vocabulary; ids as the reference."""

    exact = True
    max_pieces: int = MAX_PIECES

    def __init__(self, vocab: dict[str, int], source: str = "<memory>") -> None:
        missing = [t for t in (PAD, UNK, CLS, SEP) if t not in vocab]
        if missing:
            lacking = ", ".join(missing)
            raise CheckpointError(f"The vocabulary {source} lacks {lacking}: it is not vocab_zh.txt.")
        self._vocab = vocab
        self._longest = max(len(token) for token in vocab)
        self.vocab_size = len(vocab)
        self.unk_id, self.cls_id, self.sep_id, self.pad_id = (vocab[t] for t in (UNK, CLS, SEP, PAD))
        self.source = source
        self._count_cache: dict[str, int] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> WordPieceTokenizer:
        path = Path(path)
        try:
            if path.stat().st_size > MAX_VOCAB_BYTES:
                raise CheckpointError(f"The vocabulary {path} is too large to be vocab_zh.txt.")
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise CheckpointError(f"The vocabulary file {path} does not exist.") from err
        except UnicodeDecodeError as err:
            raise CheckpointError(f"The vocabulary {path} is not UTF-8 text.") from err
        except OSError as err:
            raise CheckpointError(f"The vocabulary {path} cannot be read ({err.strerror}).") from err
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        tokenizer = cls.from_lines(lines, source=str(path))
        logger.info("Loaded vocabulary %s (%d entries)", path, len(lines))
        return tokenizer

    @classmethod
    def from_lines(cls, lines: Sequence[str], source: str = "<memory>") -> WordPieceTokenizer:
        """A tokenizer over vocabulary lines (line i is token id i)."""
        # Same reading as the reference: stripped lines, a later duplicate wins.
        return cls({line.strip(): index for index, line in enumerate(lines)}, source=source)

    def _word_pieces(self, word: str) -> list[str]:
        if len(word) > MAX_WORD_CHARS:
            return [UNK]
        pieces: list[str] = []
        start = 0
        while start < len(word):
            end = min(len(word), start + self._longest)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self._vocab:
                    pieces.append(piece)
                    break
                end -= 1
            else:
                return [UNK]
            start = end
        return pieces

    def _pieces(self, text: str) -> Iterator[str]:
        for token in basic_tokens(text):
            if token == UNK:
                yield UNK
            else:
                yield from self._word_pieces(token)

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of `text`, without specials and without cutting."""
        return list(self._pieces(text))

    def count(self, text: str) -> int:
        """How many pieces `text` takes of the 75-piece budget (memoised: prompt parts recur)."""
        cached = self._count_cache.get(text)
        if cached is None:
            cached = sum(1 for _ in self._pieces(text))
            if len(self._count_cache) >= COUNT_CACHE_SIZE:
                self._count_cache.clear()
            self._count_cache[text] = cached
        return cached

    def encode(self, text: str, context_length: int = CONTEXT_LENGTH) -> list[int]:
        """`[CLS]` ids `[SEP]`, `[PAD]` up to `context_length`; pieces past `context_length - 2` are cut."""
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise InvalidOption(f"The context length must be an integer >= 2, not {context_length!r}.")
        pieces = itertools.islice(self._pieces(text), context_length - 2)
        ids = [self.cls_id, *(self._vocab[p] for p in pieces), self.sep_id]
        return ids + [self.pad_id] * (context_length - len(ids))

    def encode_batch(self, texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """Token ids of each text as an int64 array of shape (len(texts), context_length)."""
        if isinstance(texts, str):
            raise InvalidOption("encode_batch takes a list of prompts, not one string.")
        rows = [self.encode(text, context_length) for text in texts]
        return np.array(rows, dtype=np.int64).reshape(len(rows), context_length)


class BasicTokenCounter:
    """Fallback without the vocabulary: every CJK character, word and punctuation mark counts as one."""

    exact = False
    max_pieces: int = MAX_PIECES

    def tokenize(self, text: str) -> list[str]:
        return list(basic_tokens(text))

    def count(self, text: str) -> int:
        return sum(1 for _ in basic_tokens(text))


_loaded: dict[Path, WordPieceTokenizer] = {}
_warned: set[Path | None] = set()


def load_tokenizer(path: Path | None) -> WordPieceTokenizer | BasicTokenCounter:
    """The real tokenizer when `path` is a readable vocabulary, else the approximate counter.

    A loaded vocabulary is kept for the process; a missing one is retried on each call (it may be
    fetched later) but the fallback is logged only once per path.
    """
    if path is not None:
        path = Path(path)
        if path in _loaded:
            return _loaded[path]
        try:
            tokenizer = _loaded[path] = WordPieceTokenizer.from_file(path)
            return tokenizer
        except CheckpointError as err:
            reason = err.message
    else:
        reason = "No vocabulary is configured."
    if path not in _warned:
        _warned.add(path)
        logger.warning("%s Counting basic tokens instead; token counts are approximate.", reason)
    return BasicTokenCounter()
