"""The token budget: fit_parts with a WordPiece vocabulary (built-in, and official where present)."""

from __future__ import annotations

import pytest

from core.prompting import PromptPart, fit_parts
from core.tokenizer import BasicTokenCounter, WordPieceTokenizer
from tests.support import vocabularies, vocabulary


@pytest.fixture(scope="module", params=vocabularies())
def tokenizer(request: pytest.FixtureRequest) -> WordPieceTokenizer:
    return vocabulary(request.param)


def texts(parts: list[PromptPart]) -> list[str]:
    return [part.text for part in parts]


def test_everything_fits(tokenizer: WordPieceTokenizer) -> None:
    parts = [PromptPart("一只猫", required=True), PromptPart("水墨画", 1)]
    kept, cut = fit_parts(parts, tokenizer, 75)
    assert kept == parts and cut == []


def test_style_tags_go_before_the_subject(tokenizer: WordPieceTokenizer) -> None:
    subject = PromptPart("一只在月球上看书的猫", required=True)  # 10 pieces
    detail = PromptPart("戴着红色帽子", 300)  # 6
    quality = PromptPart("高清", 200)  # 2
    style_a, style_b = PromptPart("水墨画", 100), PromptPart("中国画", 99)  # 3 + 3
    parts = [subject, detail, style_a, style_b, quality]
    assert tokenizer.count("，".join(texts(parts))) == 10 + 6 + 2 + 3 + 3 + 4
    kept, cut = fit_parts(parts, tokenizer, 25)
    assert texts(cut) == ["中国画"]
    assert texts(kept) == ["一只在月球上看书的猫", "戴着红色帽子", "水墨画", "高清"]
    kept, cut = fit_parts(parts, tokenizer, 19)
    assert texts(cut) == ["中国画", "水墨画", "高清"]
    kept, cut = fit_parts(parts, tokenizer, 12)
    assert texts(cut) == ["中国画", "水墨画", "高清", "戴着红色帽子"]
    assert texts(kept) == ["一只在月球上看书的猫"]


def test_equal_priority_drops_the_later_part(tokenizer: WordPieceTokenizer) -> None:
    parts = [PromptPart("猫", required=True), PromptPart("红色", 5), PromptPart("蓝色", 5)]
    kept, cut = fit_parts(parts, tokenizer, 4)
    assert texts(kept) == ["猫", "红色"] and texts(cut) == ["蓝色"]


def test_a_long_required_part_is_shortened_and_the_tail_reported(tokenizer: WordPieceTokenizer) -> None:
    head = "猫" * 100
    kept, cut = fit_parts([PromptPart(head, required=True), PromptPart("高清", 1)], tokenizer, 75)
    assert texts(kept) == ["猫" * 75]
    assert texts(cut) == ["高清", "猫" * 25]
    assert tokenizer.count("，".join(texts(kept))) == 75


def test_english_words_are_not_split_in_half(tokenizer: WordPieceTokenizer) -> None:
    text = " ".join(["watercolor"] * 60)
    kept, cut = fit_parts([PromptPart(text, required=True)], tokenizer, 10)
    assert tokenizer.count(kept[0].text) <= 10
    assert all(word == "watercolor" for word in kept[0].text.split())
    assert kept[0].text + " " + cut[0].text == text


def test_large_input_is_quick(tokenizer: WordPieceTokenizer) -> None:
    parts = [PromptPart("一只猫", required=True)] + [PromptPart(f"细节{i}", 1000 - i) for i in range(2000)]
    kept, cut = fit_parts(parts, tokenizer, 75)
    assert tokenizer.count("，".join(texts(kept))) <= 75
    assert texts(kept)[:2] == ["一只猫", "细节0"] and len(kept) + len(cut) == len(parts)


def test_works_with_the_basic_counter() -> None:
    parts = [PromptPart("cat", required=True), PromptPart("moon", 1), PromptPart("night", 2)]
    kept, cut = fit_parts(parts, BasicTokenCounter(), 3)
    assert texts(kept) == ["cat", "night"] and texts(cut) == ["moon"]


def test_bad_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        fit_parts([PromptPart("猫")], BasicTokenCounter(), 0)
