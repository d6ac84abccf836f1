"""Per-chat settings: what `/settings` shows and changes, stored under the scope "chat:<chat>"."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.errors import InvalidOption
from core.settings import Settings

if TYPE_CHECKING:
    from core.prompting.styles import StyleBook

SETTING_FIELDS = {
    "style": "style",
    "quota": "daily_quota",
    "enabled": "enabled",
    "gallery": "gallery",
    "story_auto": "story_auto",
}
"""The names `/settings <name> <value>` takes, and the fields they set."""
_CLEARABLE = ("style", "gallery", "daily_quota")
_ON = ("on", "true", "yes")
_OFF = ("off", "false", "no")


@dataclass(frozen=True)
class ChatSettings:
    """One chat's settings; None means the server's default."""

    style: str | None = None
    daily_quota: int | None = None
    enabled: bool = True
    gallery: str | None = None
    story_auto: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        return ", ".join(f"{name}={self.shown(name)}" for name in SETTING_FIELDS)

    def shown(self, name: str) -> Any:
        return getattr(self, SETTING_FIELDS[name])


def parse_setting(key: str, value: str, styles: StyleBook, settings: Settings) -> tuple[str, dict[str, Any]]:
    """`/settings <key> <value>` as (setting name, the change to store); InvalidOption when malformed.

    A chat's quota may only lower the server's (`HUAHUA_DAILY_IMAGE_QUOTA`) unless the operator allows
    more with `HUAHUA_CHAT_QUOTA_MAX`."""
    name = key.lower()
    if name not in SETTING_FIELDS:
        raise InvalidOption(f"Unknown setting {key!r}: use one of {', '.join(SETTING_FIELDS)}.")
    field = SETTING_FIELDS[name]
    if value.lower() in ("", "none", "default", "off") and field in _CLEARABLE:
        return name, {field: None}
    if field == "style":
        return name, {field: styles.get(value).name}
    if field == "daily_quota":
        most = settings.daily_image_quota if settings.chat_quota_max is None else settings.chat_quota_max
        if not (value.isascii() and value.isdigit()) or int(value) > most:
            raise InvalidOption(f"quota must be a whole number of images per user per day, 0 to {most}.")
        return name, {field: int(value)}
    if field in ("enabled", "story_auto"):
        if value.lower() not in (*_ON, *_OFF):
            raise InvalidOption(f"{name} must be on or off.")
        return name, {field: value.lower() in _ON}
    return name, {field: value}
