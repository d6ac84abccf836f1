"""Parsing and validating /imagine options."""

from __future__ import annotations

import math
import re

import pytest

from core.engine import EngineLimits, area_band
from core.errors import EmptyPrompt, InvalidOption
from core.options import STEPS_FORMAT, UNREADABLE, ResolvedOptions, parse_imagine, resolve, size_for_ratio
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
        ("猫 --steps 1e3", "such as 30"),
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
    assert (resolved.width, resolved.height) == (576, 384)
    assert (resolved.seed, resolved.steps, resolved.n, resolved.guidance_scale) == (7, 30, 2, 9.0)
    assert resolved.style == "水墨画" and resolved.negative == "模糊" and resolved.seed_given
    assert resolved.text == "一只猫"


@pytest.mark.parametrize(("ratio", "size"), [("4:1", (256, 64)), ("3:2", (192, 128)), ("1:1", (128, 128))])
def test_tiny_engine_uses_the_tiny_area(styles: StyleBook, ratio: str, size: tuple[int, int]) -> None:
    tiny = Settings(_env_file=None, engine="tiny")  # type: ignore[call-arg]
    resolved = resolve(parse_imagine(f"猫 --ar {ratio}"), tiny, styles)
    assert (resolved.width, resolved.height) == size


REAL = EngineLimits.for_area(512 * 512)
TINY = EngineLimits.for_area(128 * 128)
RATIOS = ["1:1", "3:2", "2:3", "16:9", "9:16", "2:1", "1:2", "4:1", "1:4", "4:3", "21:9"]


@pytest.mark.parametrize(
    ("ratio", "limits", "size"),
    [
        ("1:1", REAL, (512, 512)),
        ("3:2", REAL, (576, 384)),
        ("2:3", REAL, (384, 576)),
        ("16:9", REAL, (704, 384)),
        ("9:16", REAL, (384, 704)),
        ("2:1", REAL, (768, 384)),
        ("4:1", REAL, (1024, 256)),
        ("1:4", REAL, (256, 1024)),
        ("1:1", TINY, (128, 128)),
        ("3:2", TINY, (192, 128)),
        ("2:3", TINY, (128, 192)),
        ("16:9", TINY, (128, 64)),
        ("9:16", TINY, (64, 128)),
        ("2:1", TINY, (128, 64)),
        ("4:1", TINY, (256, 64)),
        ("3:2", EngineLimits.for_area(1024 * 1024), (960, 640)),
        ("16:9", EngineLimits.for_area(2048 * 2048), (1024, 576)),
        ("１：１", TINY, (128, 128)),
    ],
)
def test_size_for_ratio(ratio: str, limits: EngineLimits, size: tuple[int, int]) -> None:
    assert size_for_ratio(ratio, limits) == size


def _ratio_error(width: int, height: int, ratio: str) -> float:
    w, h = (int(part) for part in ratio.split(":"))
    return abs(math.log(width / height) - math.log(w / h))


@pytest.mark.parametrize("area", [64 * 64, 128 * 128, 192 * 192, 384 * 384, 512 * 512, 640 * 640, 768 * 768])
@pytest.mark.parametrize("ratio", RATIOS)
def test_size_has_the_nearest_ratio_within_the_area_band(ratio: str, area: int) -> None:
    """Checked against every size in multiples of 64 (at most 1024 a side), not against a formula."""
    limits = EngineLimits.for_area(area)
    width, height = size_for_ratio(ratio, limits)
    w, h = (int(part) for part in ratio.split(":"))
    reachable = 1024 * 1024 * min(w, h) // max(w, h)  # the most pixels this ratio has within 1024 a side
    low, high = area_band(min(area, reachable))
    assert width % 64 == 0 and height % 64 == 0 and max(width, height) <= 1024
    assert low <= width * height <= high
    others = [(w, h) for w in range(64, 1025, 64) for h in range(64, 1025, 64) if low <= w * h <= high]
    best = min(_ratio_error(w, h, ratio) for w, h in others)
    assert _ratio_error(width, height, ratio) <= best + 1e-9
    # and the picture can be upscaled once: the engine accepts twice each side
    assert limits.fits(2 * width, 2 * height)


def test_the_area_band_is_a_quarter_either_way_and_wider_for_small_areas() -> None:
    assert area_band(512 * 512) == (3 * 512 * 512 // 4, 5 * 512 * 512 // 4)
    assert area_band(128 * 128) == (2 * 64 * 64, 6 * 64 * 64)


def test_sizes_never_exceed_the_engines_limits() -> None:
    small = EngineLimits(image_area=512 * 512, max_area=320 * 320, max_side=384, max_steps=50)
    for ratio in RATIOS:
        width, height = size_for_ratio(ratio, small)
        assert small.fits(width, height), (ratio, width, height)


@pytest.mark.parametrize(
    "ratio", ["5:1", "1:5", "0:1", "3:0", "3/2", "wide", "", "1:1:1", "-3:2", "1000:999"]
)
def test_bad_ratios(ratio: str) -> None:
    with pytest.raises(InvalidOption, match=r"^--ar must look like 3:2, with each side between 1 and 4"):
        size_for_ratio(ratio, REAL)


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


def test_bad_steps_do_not_quote_a_wrong_limit(settings: Settings, styles: StyleBook) -> None:
    with pytest.raises(InvalidOption) as caught:
        parse_imagine("猫 --steps 1e3")
    assert str(caught.value) == STEPS_FORMAT and "200" not in str(caught.value)
    with pytest.raises(InvalidOption, match=r"^--steps must be a whole number from 1 to 50\.$"):
        resolve(parse_imagine("猫 --steps 1000"), settings, styles)


def test_a_smaller_engine_step_limit_wins(settings: Settings, styles: StyleBook) -> None:
    limits = EngineLimits.for_area(128 * 128, max_steps=10)
    with pytest.raises(InvalidOption, match="from 1 to 10"):
        resolve(parse_imagine("猫 --steps 20"), settings, styles, limits)
    assert resolve(parse_imagine("猫"), settings, styles, limits).steps == 10


def test_many_unknown_options_are_named_once_and_counted() -> None:
    with pytest.raises(InvalidOption) as caught:
        parse_imagine("猫 " + " ".join(["--x 1"] * 330))
    message = str(caught.value)
    assert message.count("--x") == 1 and "more" not in message
    with pytest.raises(InvalidOption) as caught:
        parse_imagine("猫 " + " ".join(f"--{name} 1" for name in ["aa", "bb", "cc", "dd", "ee", "aa"] * 50))
    message = str(caught.value)
    assert message.startswith("Unknown option --aa, --bb, --cc and 2 more;")
    assert "--dd" not in message and len(message) < 200


@pytest.mark.parametrize(
    ("text", "option"),
    [
        ("猫 --seed ١٢٣", "--seed"),
        ("猫 --steps ۲۰", "--steps"),
        ("猫 --n २", "--n"),
        ("猫 --guidance ٧.٥", "--guidance"),
        ("猫 --ar ٣:٢", "--ar"),
    ],
)
def test_digits_of_other_scripts_are_refused(
    text: str, option: str, settings: Settings, styles: StyleBook
) -> None:
    with pytest.raises(InvalidOption, match=f"^Please write {option} with the digits 0-9, for example"):
        resolve(parse_imagine(text), settings, styles)


def test_full_width_digits_are_still_read() -> None:
    assert parse_imagine("猫 --seed １２３ --ar １６：９").seed == 123
    assert size_for_ratio("１６：９", REAL) == size_for_ratio("16:9", REAL)


@pytest.mark.parametrize(
    "text", ["猫 --style \ud800", "猫 --no \udfff 狗", "猫 --ar 3\ud800:2", "\ud800 猫", "猫 --seed 1\udc00"]
)
def test_lone_surrogates_are_a_friendly_error(text: str, settings: Settings, styles: StyleBook) -> None:
    with pytest.raises(InvalidOption, match=f"^{re.escape(UNREADABLE)}$"):
        resolve(parse_imagine(text), settings, styles)


@pytest.mark.parametrize(
    "options",
    [
        ImagineOptions("猫", style="\ud800"),
        ImagineOptions("猫", negative="\ud800"),
        ImagineOptions("猫\ud800"),
        ImagineOptions("猫", aspect_ratio="\ud800"),
    ],
)
def test_lone_surrogates_from_slash_command_fields(
    options: ImagineOptions, settings: Settings, styles: StyleBook
) -> None:
    with pytest.raises(InvalidOption, match=f"^{re.escape(UNREADABLE)}$"):
        resolve(options, settings, styles)
