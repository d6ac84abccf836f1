"""PromptBuilder end to end with the shipped data and the real tokenizer; language, normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import EmptyPrompt, InvalidOption
from core.prompting import GlossaryTranslator, PromptBuilder, Translation, Translator, load_prompt_data
from core.prompting.language import detect_language
from core.prompting.normalize import clean_text, normalize_chinese
from core.tokenizer import BasicTokenCounter, WordPieceTokenizer
from core.vocabulary import builtin_tokenizer, builtin_vocabulary_text
from tests.support import vocabularies, vocabulary


@pytest.fixture(scope="module", params=vocabularies())
def tokenizer(request: pytest.FixtureRequest) -> WordPieceTokenizer:
    return vocabulary(request.param)


class RecordingTranslator(Translator):
    """Wraps the real glossary translator and records what reached the port."""

    def __init__(self, inner: GlossaryTranslator) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    async def translate(self, text: str, source_lang: str) -> Translation:
        self.calls.append((text, source_lang))
        return await self.inner.translate(text, source_lang)


@pytest.fixture
def translator() -> RecordingTranslator:
    return RecordingTranslator(GlossaryTranslator(load_prompt_data().glossary))


@pytest.fixture
def builder(tokenizer: WordPieceTokenizer, translator: RecordingTranslator) -> PromptBuilder:
    data = load_prompt_data()
    return PromptBuilder(data.glossary, data.styles, tokenizer, translator, data.default_negative)


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("一只在月球上看书的猫", "zh"),
        ("一隻在月球上看書的貓", "zh"),
        ("a cat reading a book on the moon", "en"),
        ("un chat qui lit un livre sur la lune", "fr"),
        ("ein kleiner Hund spielt im Garten", "de"),
        ("猫が月で本を読んでいる", "ja"),
        ("달에서 책을 읽는 고양이", "ko"),
        ("一只猫 in the garden", "en"),
        ("🐱🌙", "und"),
        ("12345 !!!", "und"),
    ],
)
def test_detect_language(text: str, language: str) -> None:
    assert detect_language(text) == language


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("一隻貓", "一只猫"),
        ("ＡＢＣ１２３：貓", "ABC123:猫"),
        ("一只  猫\t\n在 月球", "一只猫在月球"),
        ("猫\u3000狗", "猫狗"),
        ("a  cat", "a cat"),
        ("猫\x00\x07狗\u200b", "猫狗"),
    ],
)
def test_normalize_chinese(text: str, normalized: str) -> None:
    assert normalize_chinese(text) == normalized


def test_clean_text_strips_markup_and_controls() -> None:
    assert clean_text("<b>猫</b>\x00 <script src=x>") == ("猫", True)
    assert clean_text("3 < 4 and 5 > 2") == ("3 < 4 and 5 > 2", False)


async def test_chinese_is_kept(builder: PromptBuilder, translator: RecordingTranslator) -> None:
    built = await builder.build("一只在月球上看书的猫")
    assert built.prompt == "一只在月球上看书的猫，高清，细节丰富"
    assert built.language == "zh" and translator.calls == []
    assert built.negative_prompt == "低质量，模糊，畸形，文字，水印，签名，多余的手指，画面扭曲，丑陋"
    assert built.token_count == 18 and built.cut == () and built.notes == ()


async def test_traditional_and_full_width(builder: PromptBuilder) -> None:
    built = await builder.build("一隻在月球上看書的貓，ＨＤ")
    assert built.prompt.startswith("一只在月球上看书的猫，HD，")
    assert built.source_text == "一隻在月球上看書的貓，ＨＤ"


async def test_english_goes_through_the_translator(
    builder: PromptBuilder, translator: RecordingTranslator
) -> None:
    built = await builder.build("A red fox in the snow, at night", style="ink")
    assert translator.calls == [("A red fox in the snow, at night", "en")]
    assert built.prompt == "红色狐狸在雪中，夜晚，水墨画，中国画，留白，写意，高清，细节丰富"
    assert built.language == "en" and built.unknown_words == ()
    assert built.negative_prompt.startswith("色彩鲜艳，照片，低质量")


async def test_unknown_words_are_kept_and_reported(builder: PromptBuilder) -> None:
    built = await builder.build("猫が月で本を読む")
    assert built.language == "ja"
    assert built.prompt.startswith("猫が月で本を読む，")
    assert built.unknown_words == ("が", "で", "を", "む")
    assert any("kept as written" in note and "が" in note for note in built.notes)


async def test_mixed_text(builder: PromptBuilder) -> None:
    built = await builder.build("a 熊猫 eating bamboo")
    assert built.prompt.startswith("熊猫吃竹子，")


async def test_emoji(builder: PromptBuilder) -> None:
    built = await builder.build("🐱🌙")
    assert built.prompt.startswith("猫月亮，") and built.language == "und"


async def test_hostile_markup(builder: PromptBuilder) -> None:
    built = await builder.build("<script>alert('x')</script><b>a red fox</b>")
    assert "<" not in built.prompt and "script" not in built.prompt
    assert "红色狐狸" in built.prompt
    assert any("HTML-like tags were removed" in note for note in built.notes)


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "\x00\x01\u200b", "<br><p></p>"])
async def test_empty(builder: PromptBuilder, text: str) -> None:
    with pytest.raises(EmptyPrompt, match="describe the picture"):
        await builder.build(text)


async def test_nothing_to_draw(builder: PromptBuilder) -> None:
    with pytest.raises(EmptyPrompt, match="could not find anything to draw"):
        await builder.build("the of a")


async def test_unknown_style(builder: PromptBuilder) -> None:
    with pytest.raises(InvalidOption, match="--style must be one of"):
        await builder.build("猫", style="vaporwave")


async def test_style_tags_are_cut_before_the_subject(
    builder: PromptBuilder, tokenizer: WordPieceTokenizer
) -> None:
    subject = (
        "一只戴着红色帽子的橘猫坐在古老的木桥上，远处是连绵的雪山和金色的晚霞，"
        "桥下流水潺潺，岸边开满了桃花，一只白鹭在天空中飞过"
    )
    built = await builder.build(subject, style="水墨画")
    assert tokenizer.count(built.prompt) <= 75 == builder.limit
    assert built.prompt.startswith(subject)
    assert built.cut and set(built.cut) <= {"写意", "留白", "中国画", "水墨画", "细节丰富", "高清"}
    assert built.cut == ("写意", "留白", "中国画")
    assert built.prompt.endswith("，水墨画，高清，细节丰富")
    assert any("left out" in note for note in built.notes)


async def test_trailing_details_go_after_the_tags(
    builder: PromptBuilder, tokenizer: WordPieceTokenizer
) -> None:
    head = "一只在月球上看书的猫"
    details = [f"细节描写第{i}段很长很长" for i in range(12)]
    built = await builder.build("，".join([head, *details]), style="像素风")
    assert built.prompt.startswith(head + "，细节描写第0段")
    assert built.cut[:5] == ("复古游戏", "像素艺术", "像素风", "细节丰富", "高清")
    assert built.cut[5] == details[-1]
    assert tokenizer.count(built.prompt) == built.token_count <= 75


async def test_ten_thousand_characters(builder: PromptBuilder, tokenizer: WordPieceTokenizer) -> None:
    built = await builder.build("猫" * 10_000)
    assert built.prompt == "猫" * 75 and built.token_count == 75
    english = await builder.build("a cat on the moon " * 600)
    assert english.token_count <= 75 and english.prompt.startswith("猫在月球上")


async def test_user_negative_is_translated_and_first(builder: PromptBuilder) -> None:
    built = await builder.build("猫", negative="blurry, dogs")
    assert built.negative_prompt.startswith("模糊，狗，低质量，畸形，文字")
    assert built.negative_prompt.count("模糊") == 1
    chinese = await builder.build("猫", negative="狗、 文字")
    assert chinese.negative_prompt.startswith("狗，文字，低质量")


async def test_works_without_the_vocabulary(translator: RecordingTranslator) -> None:
    data = load_prompt_data()
    builder = PromptBuilder(
        data.glossary, data.styles, BasicTokenCounter(), translator, data.default_negative
    )
    built = await builder.build("一只猫", style="anime")
    assert built.prompt == "一只猫，动漫风格，日系插画，精致线条，明亮色彩，高清，细节丰富"


def test_load_prompt_builder_follows_the_settings(tmp_path: Path) -> None:
    from core.prompting import LlmTranslator, load_prompt_builder
    from core.settings import Settings

    vocab = tmp_path / "vocab.txt"
    vocab.write_text(builtin_vocabulary_text(), encoding="utf-8")
    glossary_settings = Settings(_env_file=None, vocab_path=vocab)  # type: ignore[call-arg]
    builder = load_prompt_builder(glossary_settings)
    assert isinstance(builder.translator, GlossaryTranslator)
    assert isinstance(builder.tokenizer, WordPieceTokenizer) and builder.tokenizer.source == str(vocab)
    # the tiny engine without vocab_zh.txt: prompts are counted with the tokenizer it draws with
    tiny = Settings(_env_file=None, engine="tiny", model_dir=tmp_path / "models")  # type: ignore[call-arg]
    assert load_prompt_builder(tiny).tokenizer is builtin_tokenizer()
    llm_settings = Settings(_env_file=None, translator="llm", vocab_path=tmp_path / "none.txt")  # type: ignore[call-arg]
    builder = load_prompt_builder(llm_settings)
    assert isinstance(builder.translator, LlmTranslator) and isinstance(builder.tokenizer, BasicTokenCounter)
