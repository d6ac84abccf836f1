"""Blocklist moderation: real blocklist file, bypass attempts, no false positives on ordinary words."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from core.errors import BlockedPrompt, HuahuaError
from core.moderation import BLOCKED_MESSAGE, Moderator, latin_words, squeeze
from core.prompting import PromptDataError


@pytest.fixture(scope="module")
def moderator() -> Moderator:
    return Moderator.from_file()


@pytest.mark.parametrize(
    "text",
    [
        "儿童色情",
        "兒童色情",  # Traditional
        "儿 童 色 情",  # spaces
        "儿.童-色_情",  # punctuation inside
        "儿\u200b童色\u200d情",  # zero-width characters
        "一张血肉模糊的脸",
        "斬首",
        "lolicon",
        "ＬＯＬＩＣＯＮ",  # full-width
        "l o l i c o n",
        "l.o.l.i.c.o.n",
        "child porn",
        "CHILD-PORN pictures",
        "childporn",
        "child pornography",
        "a picture of a nude child",
        "一个nude child",
        "decapitated man",
        "de capitated",
        "the dismemberment",
        "r a p e",
        "ｒａｐｅ scene",
    ],
)
def test_blocked(moderator: Moderator, text: str) -> None:
    with pytest.raises(BlockedPrompt) as caught:
        moderator.check(text)
    assert str(caught.value) == BLOCKED_MESSAGE
    assert isinstance(caught.value, HuahuaError)


@pytest.mark.parametrize(
    "text",
    [
        "一只在月球上看书的猫",
        "a bunch of grapes on a table",
        "a therapist in her office",
        "a pedometer on a wrist",
        "a child reading a book",
        "剥香蕉皮的猴子",
        "a decent cape",
        "",
        "   ",
        "🐱🌙",
    ],
)
def test_allowed(moderator: Moderator, text: str) -> None:
    moderator.check(text)
    assert moderator.match(text) is None


def test_message_never_echoes_the_term(moderator: Moderator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BlockedPrompt) as caught:
        moderator.check("please draw lolicon art")
    assert "lolicon" not in str(caught.value)
    assert "lolicon" not in caplog.text
    assert "category minors" in caplog.text


def test_long_text_is_fast_and_found(moderator: Moderator) -> None:
    text = "一只猫在花园里 " * 1200 + " beheading"
    with pytest.raises(BlockedPrompt):
        moderator.check(text)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("p.o.r.n", ["porn"]),
        ("l o l i cat", ["loli", "cat"]),
        ("a cat", ["a", "cat"]),
        ("Ｃａｔ！", ["cat"]),
    ],
)
def test_latin_words(text: str, words: list[str]) -> None:
    assert latin_words(text) == words


def test_squeeze() -> None:
    assert squeeze("兒 童，色\t情!") == "儿童色情"


def test_custom_file_with_sections(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("# comment\n[bad]\nzorblax\n禁词\nfoo bar\nwidget*\n", encoding="utf-8")
    moderator = Moderator.from_file(path)
    assert len(moderator) == 4
    for text in ("ZORBLAX", "禁 詞", "foo-bar", "foobar", "Foo Bar!", "widgets"):
        with pytest.raises(BlockedPrompt):
            moderator.check(text)
    for text in ("foo", "bar", "zorb", "wid"):
        moderator.check(text)


@pytest.mark.parametrize("content", ["[x]\n!!!\n", "abc*\n"])
def test_malformed_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptDataError, match=r"line [12]"):
        Moderator.from_file(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PromptDataError, match="missing"):
        Moderator.from_file(tmp_path / "nope.txt")
