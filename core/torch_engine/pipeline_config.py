"""The WukongConfig stored in a converted folder's `wukong.json` (no torch needed to read it)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from core.diffusion.config import WukongConfig
from core.errors import CheckpointError


def config_from(data: dict[str, Any]) -> WukongConfig:
    """The configuration from its JSON form (lists become tuples); CheckpointError if it is not valid."""
    known = {f.name for f in fields(WukongConfig)}
    values: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known
    }
    try:
        return WukongConfig(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"The converted model's configuration is not valid: {exc}.") from None
