"""Parsing and validating /imagine options."""

from __future__ import annotations

import pytest

from core.errors import EmptyPrompt, InvalidOption
from core.options import ResolvedOptions, parse_imagine, resolve, size_for_ratio
from core.prompting import StyleBook, load_prompt_data
from core.settings import Settings
from core.types import ImagineOptions


@pytest.fixture(scope="module")
def styles() -> StyleBook:
    return load_prompt_data().styles


@pytest.fixture
def settings() -> Settings:
    return Settings(_env_file=None, engine="wukong", max_steps=50, default_steps=20)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "一只在月球上看书的猫 --ar 3:2 --seed 7 --steps 30 --n 2 --no 模糊, 文字"
            " --style 水墨画 --guidance 9",
            ImagineOptions("一只在月球上看书的猫", "3:2", 7, 30, 2, "模糊, 文字", "水墨画", 9.0),
        ),
        (
            "a cat --guidance 7.5 --no blurry text --ar 16:9",
            ImagineOptions("a cat", aspect_ratio="16:9", negative="blurry text", guidance_scale=7.5),
        ),
        ("猫 —ar ３：２ ——seed ７", ImagineOptions("猫", aspect_ratio="3:2", seed=7)),
        ("猫 –n 2 －－steps １０", ImagineOptions("猫", n=2, steps=10)),
        ("猫 --AR 1:1 --cfg 5", ImagineOptions("猫", aspect_ratio="1:1", guidance_scale=5.0)),
        ("a--b test", ImagineOptions("a--b test")),
        ("他说——好", ImagineOptions("他说——好")),
        ("  only text  ", ImagineOptions("only text")),
        ("--seed 3", ImagineOptions("", seed=3)),
        ("", ImagineOptions("")),
    ],
)
def test_parse_imagine(text: str, expected: ImagineOptions) -> None:
    assert parse_imagine(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("猫 --size 3", "Unknown option --size"),
        ("猫 --foo 1 --bar 2", "--foo, --bar"),
        ("猫 --seed", "--seed needs a value"),
        ("猫 --seed 1 --seed 2", "more than once"),
        ("猫 --seed abc", "--seed must be a whole number from 0 to 4294967295."),
        ("猫 --seed 1.5", "--seed must be a whole number"),
        ("猫 --n two", "--n must be a whole number from 1 to 4."),
        ("猫 --guidance high", "--guidance must be a number from 1 to 20"),
        ("猫 --steps 1e3", "--steps must be a whole number"),
    ],
)
def test_parse_imagine_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidOption) as caught:
        parse_imagine(text)
    assert message in str(caught.value)


def test_resolve_defaults(settings: Settings, styles: StyleBook) -> None:
    resolved = resolve(parse_imagine("  一只猫  "), settings, styles)
    assert resolved == ResolvedOptions(
        text="一只猫",
        width=512,
        height=512,
        seed=resolved.seed,
        steps=20,
        n=1,
        guidance_scale=7.5,
        aspect_ratio="1:1",
    )
    assert 0 <= resolved.seed < 2**32 and not resolved.seed_given
    seeds = {resolve(parse_imagine("猫"), settings, styles).seed for _ in range(5)}
    assert len(seeds) > 1


def test_resolve_everything(settings: Settings, styles: StyleBook) -> None:
    text = "一只猫 --ar 3:2 --seed 7 --steps 30 --n 2 --no 模糊 --style ink --guidance 9"
    resolved = resolve(parse_imagine(text), settings, styles)
    assert (resolved.width, resolved.height) == (640, 448)
    assert (resolved.seed, resolved.steps, resolved.n, resolved.guidance_scale) == (7, 30, 2, 9.0)
    assert resolved.style == "水墨画" and resolved.negative == "模糊" and resolved.seed_given
    assert resolved.text == "一只猫"


def test_tiny_engine_uses_the_tiny_area(styles: StyleBook) -> None:
    tiny = Settings(_env_file=None, engine="tiny")  # type: ignore[call-arg]
    resolved = resolve(parse_imagine("猫 --ar 4:1"), tiny, styles)
    assert (resolved.width, resolved.height) == (256, 64)


@pytest.mark.parametrize(
    ("ratio", "area", "size"),
    [
        ("1:1", 512 * 512, (512, 512)),
        ("3:2", 512 * 512, (640, 448)),
        ("2:3", 512 * 512, (448, 640)),
        ("16:9", 512 * 512, (704, 384)),
        ("4:3", 512 * 512, (576, 448)),
        ("4:1", 512 * 512, (1024, 256)),
        ("1:4", 512 * 512, (256, 1024)),
        ("3:2", 1024 * 1024, (1024, 704)),
        ("16:9", 2048 * 2048, (1024, 576)),
        ("１：１", 128 * 128, (128, 128)),
    ],
)
def test_size_for_ratio(ratio: str, area: int, size: tuple[int, int]) -> None:
    width, height = size_for_ratio(ratio, area)
    assert (width, height) == size
    assert width % 64 == 0 and height % 64 == 0 and max(width, height) <= 1024


@pytest.mark.parametrize(
    "ratio", ["5:1", "1:5", "0:1", "3:0", "3/2", "wide", "", "1:1:1", "-3:2", "1000:999"]
)
def test_bad_ratios(ratio: str) -> None:
    with pytest.raises(InvalidOption, match=r"^--ar must look like 3:2, with each side between 1 and 4"):
        size_for_ratio(ratio, 512 * 512)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ImagineOptions("猫", steps=0), "--steps must be a whole number from 1 to 50."),
        (ImagineOptions("猫", steps=51), "--steps must be a whole number from 1 to 50."),
        (ImagineOptions("猫", n=0), "--n must be a whole number from 1 to 4."),
        (ImagineOptions("猫", n=5), "--n must be a whole number from 1 to 4."),
        (ImagineOptions("猫", guidance_scale=0.5), "--guidance must be a number from 1 to 20, such as 7.5."),
        (ImagineOptions("猫", guidance_scale=21), "--guidance must be a number from 1 to 20, such as 7.5."),
        (ImagineOptions("猫", seed=-1), "--seed must be a whole number from 0 to 4294967295."),
        (ImagineOptions("猫", seed=2**32), "--seed must be a whole number from 0 to 4294967295."),
        (ImagineOptions("猫", aspect_ratio="9:1"), "--ar must look like 3:2"),
        (ImagineOptions("猫", style="vaporwave"), "--style must be one of: 水墨画 (ink)"),
        (ImagineOptions("猫" * 2001), "under 2000 characters"),
    ],
)
def test_resolve_errors(options: ImagineOptions, message: str, settings: Settings, styles: StyleBook) -> None:
    with pytest.raises(InvalidOption) as caught:
        resolve(options, settings, styles)
    assert message in str(caught.value)


@pytest.mark.parametrize("text", ["", "   ", "--seed 3"])
def test_resolve_needs_a_description(text: str, settings: Settings, styles: StyleBook) -> None:
    with pytest.raises(EmptyPrompt, match="describe the picture"):
        resolve(parse_imagine(text), settings, styles)


def test_edge_values_are_accepted(settings: Settings, styles: StyleBook) -> None:
    options = ImagineOptions("猫", seed=2**32 - 1, steps=50, n=4, guidance_scale=20.0)
    resolved = resolve(options, settings, styles)
    assert (resolved.seed, resolved.steps, resolved.n, resolved.guidance_scale) == (2**32 - 1, 50, 4, 20.0)
    assert resolve(ImagineOptions("猫", seed=0, steps=1, guidance_scale=1), settings, styles).seed == 0
