from __future__ import annotations

from pathlib import Path

import pytest

from core.chat_settings import ChatSettings, parse_setting
from core.errors import InvalidOption
from core.prompting import StyleBook
from core.settings import Settings

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


@pytest.fixture(scope="module")
def styles() -> StyleBook:
    return StyleBook.from_file(PROMPTS / "styles.toml")


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, daily_image_quota=20, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("quota", "5", ("quota", {"daily_quota": 5})),
        ("QUOTA", "20", ("quota", {"daily_quota": 20})),
        ("quota", "default", ("quota", {"daily_quota": None})),
        ("enabled", "off", ("enabled", {"enabled": False})),
        ("story_auto", "yes", ("story_auto", {"story_auto": True})),
        ("gallery", "@channel", ("gallery", {"gallery": "@channel"})),
        ("gallery", "none", ("gallery", {"gallery": None})),
    ],
)
def test_parse_setting(
    styles: StyleBook, key: str, value: str, expected: tuple[str, dict[str, object]]
) -> None:
    assert parse_setting(key, value, styles, _settings()) == expected


def test_style_is_stored_by_its_preset_name(styles: StyleBook) -> None:
    name, change = parse_setting("style", "ink", styles, _settings())
    assert name == "style" and change == {"style": "水墨画"}


@pytest.mark.parametrize("value", ["21", "10000", "١٢", "-1", "x"])
def test_a_chat_quota_cannot_lift_the_servers(styles: StyleBook, value: str) -> None:
    with pytest.raises(InvalidOption, match="0 to 20"):
        parse_setting("quota", value, styles, _settings())


def test_the_operator_may_allow_chats_more(styles: StyleBook) -> None:
    assert parse_setting("quota", "50", styles, _settings(chat_quota_max=50)) == (
        "quota",
        {"daily_quota": 50},
    )
    with pytest.raises(InvalidOption, match="0 to 50"):
        parse_setting("quota", "51", styles, _settings(chat_quota_max=50))


def test_unknown_and_malformed(styles: StyleBook) -> None:
    with pytest.raises(InvalidOption, match="Unknown setting"):
        parse_setting("colour", "red", styles, _settings())
    with pytest.raises(InvalidOption, match="on or off"):
        parse_setting("enabled", "maybe", styles, _settings())


def test_shown_and_described() -> None:
    chat = ChatSettings.from_dict({"daily_quota": 3, "style": "水墨画", "unknown": 1})
    assert chat.shown("quota") == 3
    assert chat.describe() == "style=水墨画, quota=3, enabled=True, gallery=None, story_auto=False"
