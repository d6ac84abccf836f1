"""The WordPiece tokenizer against HuggingFace `tokenizers` and hand-checked cases, on the built-in
vocabulary always and on the official vocab_zh.txt too where this machine has it."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from core.errors import CheckpointError, InvalidOption
from core.tokenizer import BasicTokenCounter, WordPieceTokenizer, load_tokenizer
from core.vocabulary import builtin_vocabulary, builtin_vocabulary_text
from tests.support import import_or_skip, official_vocab, vocabularies

CASES = {
    "chinese": "一只可爱的猫咪，坐在窗台上，水彩画风格",
    "english": "A photo of an astronaut riding a horse on the moon",
    "mixed": "赛博朋克 city at night, 8k 高清!!",
    "traditional": "繁體中文的畫面很漂亮，龍與鳳",
    "emoji": "小狗🐶在草地上😂👍🔥",
    "full_width": "ＡＢＣ１２３，。！？Ｈｅｌｌｏ　ｗｏｒｌｄ",
    "punctuation": "...!!!???---***((()))[[]]{}<>@#$%^&*_+=|\\/~`'\"；：「」『』——……",
    "accents": "café naïve résumé Ångström Ÿ",
    "long_word": "supercalifragilisticexpialidocious " + "x" * 120,
    "controls": "hello\u200bworld\x00\ufffd\x07 ok\tnext\nline",
    "korean_japanese": "안녕하세요 こんにちは カタカナ",
    "very_long": "山水画，" * 60,
    "empty": "",
    "whitespace": " \t\n\u3000 ",
}


@dataclass(frozen=True)
class Vocab:
    name: str
    path: Path
    lines: list[str]
    tok: WordPieceTokenizer


@pytest.fixture(scope="module", params=vocabularies())
def vocab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Vocab:
    if request.param == "official":
        path = official_vocab()
        assert path is not None
    else:
        path = tmp_path_factory.mktemp("vocab") / "builtin_vocab.txt"
        path.write_text(builtin_vocabulary_text(), encoding="utf-8")
    lines = path.read_text(encoding="utf-8").split("\n")
    return Vocab(request.param, path, lines, WordPieceTokenizer.from_file(path))


@pytest.fixture(scope="module")
def tok(vocab: Vocab) -> WordPieceTokenizer:
    return vocab.tok


def line_of(lines: list[str], token: str) -> int:
    return lines.index(token)


def test_specials_and_size(vocab: Vocab) -> None:
    tok = vocab.tok
    assert tok.vocab_size == (21128 if vocab.name == "official" else len(builtin_vocabulary()))
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (0, 100, 101, 102)
    assert vocab.lines[101] == "[CLS]" and vocab.lines[102] == "[SEP]" and vocab.lines[103] == "[MASK]"
    assert vocab.lines[:104] == list(builtin_vocabulary()[:104])  # the built-in specials sit where these do
    assert tok.exact is True and tok.max_pieces == 75


HAND_CHECKED = {
    # text: (official pieces, built-in pieces)
    "猫，狗!": (["猫", "，", "狗", "!"], ["猫", "，", "狗", "!"]),
    "Café NAÏVE": (["cafe", "na", "##ive"], ["ca", "##fe", "na", "##iv", "##e"]),
    "ＡＢＣ": (["ａ", "##ｂ", "##ｃ"], ["[UNK]"]),  # no full-width continuations in the built-in one
    "龍與鳳": (["龍", "與", "鳳"], ["龍", "與", "鳳"]),
    "😂🐶": (["[UNK]"], ["[UNK]"]),
    "😂 🐶": (["😂", "[UNK]"], ["[UNK]", "[UNK]"]),
    "a\u200bb": (["ab"], ["ab"]),
    "[UNK] [unk]": (["[UNK]", "[", "u", "##nk", "]"], ["[UNK]", "[", "un", "##k", "]"]),
    "playing": (["play", "##ing"], ["pl", "##ay", "##ing"]),
    "  ": ([], []),
}


@pytest.mark.parametrize("text", HAND_CHECKED)
def test_hand_checked(vocab: Vocab, text: str) -> None:
    tok = vocab.tok
    pieces = HAND_CHECKED[text][0 if vocab.name == "official" else 1]
    assert tok.tokenize(text) == pieces
    expected = [101, *(line_of(vocab.lines, p) for p in pieces), 102]
    assert tok.encode(text) == expected + [0] * (77 - len(expected))
    assert tok.count(text) == len(pieces)


@pytest.mark.parametrize("word", ["playing", "astronaut", "watercolour"])
def test_longest_match_first(vocab: Vocab, word: str) -> None:
    # a word is split greedily: the longest prefix in the vocabulary, then "##" pieces.
    pieces = vocab.tok.tokenize(word)
    assert "".join(p.removeprefix("##") for p in pieces) == word
    assert pieces[0] in vocab.lines and all(p.startswith("##") for p in pieces[1:])
    first = pieces[0]
    assert not any((word[: len(first) + k]) in vocab.lines for k in range(1, len(word) + 1 - len(first)))


def test_word_over_100_chars_is_unk(tok: WordPieceTokenizer) -> None:
    assert tok.tokenize("a" * 101) == ["[UNK]"]
    assert tok.tokenize("a" * 100) != ["[UNK]"]


def test_truncation_keeps_sep(tok: WordPieceTokenizer) -> None:
    text = "猫" * 200
    ids = tok.encode(text)
    assert len(ids) == 77 and ids[0] == 101 and ids[-1] == 102
    assert ids[1:76] == [ids[1]] * 75
    assert tok.count(text) == 200
    short = tok.encode("猫", context_length=8)
    assert short == [101, ids[1], 102, 0, 0, 0, 0, 0]
    assert tok.encode("猫" * 10, context_length=4) == [101, ids[1], ids[1], 102]


def test_encode_batch(tok: WordPieceTokenizer) -> None:
    batch = tok.encode_batch(["猫", "", "狗" * 100])
    assert batch.dtype == np.int64 and batch.shape == (3, 77)
    assert batch[1].tolist() == [101, 102] + [0] * 75
    assert batch[2, -1] == 102
    assert tok.encode_batch([]).shape == (0, 77)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["list"]])
def test_wrong_types(tok: WordPieceTokenizer, bad: object) -> None:
    with pytest.raises(InvalidOption):
        tok.encode(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidOption):
        BasicTokenCounter().count(bad)  # type: ignore[arg-type]


def test_bad_context_length_and_batch(tok: WordPieceTokenizer) -> None:
    with pytest.raises(InvalidOption):
        tok.encode("猫", context_length=1)
    with pytest.raises(InvalidOption):
        tok.encode_batch("猫")


def test_huge_input_is_fast(tok: WordPieceTokenizer) -> None:
    text = "一只猫 a cat, " * 20000
    assert len(tok.encode(text)) == 77
    assert tok.count("一只猫 a cat, ") * 20000 == tok.count(text)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_huggingface_tokenizers(vocab: Vocab, name: str) -> None:
    tok = vocab.tok
    hf = _huggingface(vocab)
    hf_ids = hf.encode(CASES[name]).ids  # [CLS] ... [SEP], not cut
    expected = [*hf_ids[:76], 102] if len(hf_ids) > 77 else hf_ids + [0] * (77 - len(hf_ids))
    assert tok.encode(CASES[name]) == expected
    assert tok.count(CASES[name]) == len(hf_ids) - 2


FUZZ_POOL = (
    "猫狗山水畫龍鳳的一 abcxyzABCQ0189 .,!?-_#@'\"()[]{}；，。！？、「」…—"
    "éèñüÅçØßİ\u0301\u0308ＡＢｚ１２　\t\n\r\x00\x07\x0b\x85\u200b\u200d\u2028\ufffd\ue000"
    "😂👍🔥🐶🇨🇳안녕こんにカナ\U00020000\U0002f800\uf900"
)


def _huggingface(vocab: Vocab):  # type: ignore[no-untyped-def]
    tokenizers = import_or_skip(
        "tokenizers", "HuggingFace tokenizers", "the dev extra: pip install -e '.[dev]'"
    )
    return tokenizers.BertWordPieceTokenizer(str(vocab.path), lowercase=True, clean_text=True)


def test_matches_huggingface_on_random_text(vocab: Vocab) -> None:
    tok = vocab.tok
    hf = _huggingface(vocab)
    rng = np.random.default_rng(1234)
    pool = list(FUZZ_POOL)
    for _ in range(300):
        text = "".join(rng.choice(pool, size=int(rng.integers(0, 40))))
        assert tok.tokenize(text) == hf.encode(text, add_special_tokens=False).tokens, repr(text)


def test_missing_vocab_is_checkpoint_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(CheckpointError, match=r"nope\.txt"):
        WordPieceTokenizer.from_file(missing)


@pytest.mark.parametrize(
    "content", [b"", b"hello\nworld\n", b"\xff\xfe\x00garbage", b"[PAD]\n[UNK]\n[CLS]\n"]
)
def test_not_a_vocab(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"vocab\.txt"):
        WordPieceTokenizer.from_file(path)


def test_directory_is_not_a_vocab(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape(tmp_path.name)):
        WordPieceTokenizer.from_file(tmp_path)


def test_tiny_vocab_wordpiece(tmp_path: Path) -> None:
    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "aff", "猫", ",", "##a"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = WordPieceTokenizer.from_file(path)
    assert tok.vocab_size == len(lines)
    pieces = ["un", "##aff", "##able", ",", "猫", "aff", "##a", "[UNK]"]
    assert tok.tokenize("Unaffable,猫 affa xyz") == pieces
    assert tok.encode("unaffable", context_length=6) == [2, 4, 5, 6, 3, 0]


def test_basic_counter() -> None:
    counter = BasicTokenCounter()
    assert counter.exact is False and counter.max_pieces == 75
    assert counter.tokenize("一只猫, a Café!") == ["一", "只", "猫", ",", "a", "cafe", "!"]
    assert counter.count("一只猫, a Café!") == 7
    assert counter.count("") == 0


def test_load_tokenizer_falls_back_and_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "absent.txt"
    with caplog.at_level(logging.WARNING, logger="core.tokenizer"):
        first = load_tokenizer(missing)
        second = load_tokenizer(missing)
    assert isinstance(first, BasicTokenCounter) and isinstance(second, BasicTokenCounter)
    assert len([r for r in caplog.records if "absent.txt" in r.getMessage()]) == 1
    assert isinstance(load_tokenizer(None), BasicTokenCounter)


def test_load_tokenizer_picks_up_a_vocab_fetched_later(tmp_path: Path) -> None:
    path = tmp_path / "later.txt"
    assert isinstance(load_tokenizer(path), BasicTokenCounter)
    path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n猫\n", encoding="utf-8")
    tok = load_tokenizer(path)
    assert isinstance(tok, WordPieceTokenizer) and tok.tokenize("猫狗") == ["猫", "[UNK]"]
    assert load_tokenizer(path) is tok


def test_load_tokenizer_real(vocab: Vocab) -> None:
    tok = load_tokenizer(vocab.path)
    assert isinstance(tok, WordPieceTokenizer) and tok.exact
    assert load_tokenizer(vocab.path) is tok
