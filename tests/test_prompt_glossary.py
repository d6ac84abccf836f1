"""The offline glossary translator and the loading of prompts/ data files."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import InvalidOption
from core.prompting import Glossary, GlossaryTranslator, PromptDataError, StyleBook, load_prompt_data
from core.prompting.glossary import lemmas


@pytest.fixture(scope="module")
def glossary() -> Glossary:
    return load_prompt_data().glossary


def test_shipped_data_is_big_enough() -> None:
    data = load_prompt_data()
    assert len(data.glossary) >= 400
    for name in ("水墨画", "赛博朋克", "油画", "动漫", "写实摄影", "儿童绘本", "像素风"):
        assert data.styles.find(name) is not None
    assert data.default_negative[:3] == ("低质量", "模糊", "畸形")
    assert data.styles.quality


@pytest.mark.parametrize(
    ("text", "zh", "unknown"),
    [
        ("a cat", "猫", ()),
        ("cats", "猫", ()),
        ("The Puppies", "小狗", ()),
        ("a red fox in the snow", "红色狐狸在雪中", ()),
        ("a cat reading a book on the moon", "猫在月球上看书", ()),
        ("sunflowers, butterflies", "向日葵，蝴蝶", ()),
        ("an old man fishing", "老人钓鱼", ()),
        ("dancing foxes", "跳舞的狐狸", ()),
        ("three wolves", "三只狼", ()),
        ("a cat named Whiskers", "猫名叫Whiskers", ("Whiskers",)),
        ("a zorblax and a zorblax", "zorblax zorblax", ("zorblax",)),
        ("a cat and 猫", "猫猫", ()),
        ("2 dogs", "2条狗", ()),
        ("🐱 🌙", "猫月亮", ()),
        ("😀 smile", "😀微笑", ("😀",)),
        ("chat sur la lune", "chat sur la lune", ("chat", "sur", "la", "lune")),
        ("猫が月で本を読む", "猫が月で本を読む", ("が", "で", "を", "む")),
        ("кошка", "кошка", ("кошка",)),
        ("the of a", "", ()),
        ("<>()[]", "", ()),
        ("", "", ()),
    ],
)
def test_glossary_translation(glossary: Glossary, text: str, zh: str, unknown: tuple[str, ...]) -> None:
    result = glossary.translate(text)
    assert (result.text_zh, result.unknown_words) == (zh, unknown)


async def test_glossary_translator_port(glossary: Glossary) -> None:
    translation = await GlossaryTranslator(glossary).translate("a blue whale and a zorblax", "en")
    assert translation.text_zh == "蓝色鲸鱼zorblax"
    assert translation.unknown_words == ("zorblax",)


@pytest.mark.parametrize(
    ("word", "base"),
    [("cats", "cat"), ("puppies", "puppy"), ("wolves", "wolf"), ("foxes", "fox"), ("running", "run"),
     ("dancing", "dance"), ("painted", "paint"), ("cat's", "cat")],
)  # fmt: skip
def test_lemmas(word: str, base: str) -> None:
    assert base in lemmas(word)


def test_huge_input_is_handled(glossary: Glossary) -> None:
    result = glossary.translate("a cat on the moon " * 2000)
    assert result.text_zh.startswith("猫在月球上猫") and result.unknown_words == ()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cat\n", "line 1 must be 'english<TAB>chinese'"),
        ("cat\t猫\tx\n", "line 1 must be"),
        ("# c\ncat\t猫\nCat\t猫\n", "line 3 repeats the entry 'Cat'"),
        ("# only comments\n", "has no entries"),
    ],
)
def test_malformed_glossary(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "glossary.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptDataError, match=message):
        Glossary.from_file(path)


def test_glossary_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "glossary.tsv"
    path.write_bytes(b"cat\t\xff\xfe\n")
    with pytest.raises(PromptDataError, match="not valid UTF-8"):
        Glossary.from_file(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("quality = [\n", "not valid TOML"),
        ("quality = []\n", "needs a \\[styles.<name>\\] table"),
        ('[styles."a"]\ntags = []\n', "at least one tag"),
        ('[styles."a"]\ntags = ["x"]\ncolour = 1\n', "unknown keys"),
        ('[styles."a"]\ntags = [1]\n', "list of non-empty strings"),
        ('[styles."a"]\ntags = ["x"]\naliases = ["b"]\n[styles."b"]\ntags = ["y"]\n', "used by both"),
    ],
)
def test_malformed_styles(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "styles.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptDataError, match=message):
        StyleBook.from_file(path)


@pytest.mark.parametrize(
    ("name", "style"),
    [("ink", "水墨画"), ("INK-WASH", "水墨画"), ("水墨", "水墨画"), ("賽博朋克", "赛博朋克"),
     ("Cyber Punk", "赛博朋克"), ("picture book", "儿童绘本"), ("pixel_art", "像素风"), ("ｏｉｌ", "油画"),
     ("photo", "写实摄影"), ("anime", "动漫")],
)  # fmt: skip
def test_style_names_and_aliases(name: str, style: str) -> None:
    assert load_prompt_data().styles.get(name).name == style


def test_unknown_style_lists_the_choices() -> None:
    with pytest.raises(
        InvalidOption, match=r"^--style must be one of: 水墨画 \(ink\), 赛博朋克 \(cyberpunk\)"
    ):
        load_prompt_data().styles.get("vaporwave")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PromptDataError, match=r"negative\.txt is missing"):
        load_prompt_data(tmp_path)
