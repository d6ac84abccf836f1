"""Style presets (`prompts/styles.toml`): Chinese style tags, extra negative terms, English aliases."""

from __future__ import annotations

import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import InvalidOption
from core.prompting.data import PromptDataError, read_data_file
from core.prompting.normalize import to_simplified


@dataclass(frozen=True)
class Style:
    name: str
    tags: tuple[str, ...]
    negative: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


def _style_key(name: str) -> str:
    folded = to_simplified(unicodedata.normalize("NFKC", name)).casefold()
    return "".join(char for char in folded if char.isalnum())


@dataclass(frozen=True)
class StyleBook:
    """All presets plus the quality tags added to every prompt."""

    styles: tuple[Style, ...]
    quality: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        index: dict[str, Style] = {}
        for style in self.styles:
            for name in (style.name, *style.aliases):
                key = _style_key(name)
                other = index.get(key)
                if other is not None and other is not style:
                    raise PromptDataError(
                        f"The style name '{name}' is used by both {other.name} and {style.name}."
                    )
                index[key] = style
        object.__setattr__(self, "_index", index)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(style.name for style in self.styles)

    def find(self, name: str) -> Style | None:
        index: dict[str, Style] = getattr(self, "_index")  # noqa: B009
        return index.get(_style_key(name))

    def get(self, name: str) -> Style:
        """The preset for a name or alias; InvalidOption listing the presets otherwise."""
        style = self.find(name)
        if style is None:
            choices = ", ".join(f"{s.name} ({s.aliases[0]})" if s.aliases else s.name for s in self.styles)
            raise InvalidOption(f"--style must be one of: {choices}.")
        return style

    @classmethod
    def from_file(cls, path: Path) -> StyleBook:
        try:
            data = tomllib.loads(read_data_file(path))
        except tomllib.TOMLDecodeError as err:
            raise PromptDataError(f"{path.name} is not valid TOML: {err}.") from err
        quality = _strings(data.get("quality", []), path, "quality")
        table = data.get("styles")
        if not isinstance(table, dict) or not table:
            raise PromptDataError(f"{path.name} needs a [styles.<name>] table for each style.")
        styles = []
        for name, body in table.items():
            if not isinstance(body, dict):
                raise PromptDataError(f"{path.name}: styles.{name} must be a table.")
            unknown = set(body) - {"tags", "negative", "aliases"}
            if unknown:
                raise PromptDataError(f"{path.name}: styles.{name} has unknown keys {sorted(unknown)}.")
            tags = _strings(body.get("tags"), path, f"styles.{name}.tags")
            if not tags:
                raise PromptDataError(f"{path.name}: styles.{name}.tags must list at least one tag.")
            styles.append(
                Style(
                    name=name,
                    tags=tags,
                    negative=_strings(body.get("negative", []), path, f"styles.{name}.negative"),
                    aliases=_strings(body.get("aliases", []), path, f"styles.{name}.aliases"),
                )
            )
        return cls(tuple(styles), quality)


def _strings(value: Any, path: Path, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise PromptDataError(f"{path.name}: {where} must be a list of non-empty strings.")
    return tuple(item.strip() for item in value)
