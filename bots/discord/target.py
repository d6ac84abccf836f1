"""Where a job's Discord messages go, kept in the job's meta so delivery survives a restart."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import discord

DEFAULT_SIZE_LIMIT = 10 * 1024 * 1024
TOKEN_MARGIN_S = 30.0
"""Stop using an interaction token this long before Discord's 15-minute expiry."""

_PREFIX = "discord_"


@dataclass(frozen=True)
class Target:
    """The interaction webhook (while its token lives) and the channel to fall back to.

    `edit_status` says whether the interaction's original response shows the job's progress.
    """

    channel_id: int
    guild_id: int | None = None
    application_id: int | None = None
    token: str | None = None
    expires_at: float = 0.0
    size_limit: int = DEFAULT_SIZE_LIMIT
    edit_status: bool = True

    @classmethod
    def from_interaction(cls, interaction: discord.Interaction[Any], *, edit_status: bool = True) -> Target:
        channel_id = interaction.channel_id
        if channel_id is None:
            raise ValueError("an interaction without a channel has nowhere to deliver to")
        return cls(
            channel_id=channel_id,
            guild_id=interaction.guild_id,
            application_id=interaction.application_id,
            token=interaction.token,
            expires_at=interaction.expires_at.timestamp(),
            size_limit=interaction.filesize_limit or DEFAULT_SIZE_LIMIT,
            edit_status=edit_status,
        )

    def token_alive(self, now: float | None = None) -> bool:
        if not self.token or self.application_id is None:
            return False
        return (time.time() if now is None else now) < self.expires_at - TOKEN_MARGIN_S

    def to_meta(self) -> dict[str, str]:
        meta = {
            "channel": str(self.channel_id),
            "guild": "" if self.guild_id is None else str(self.guild_id),
            "app": "" if self.application_id is None else str(self.application_id),
            "token": self.token or "",
            "expires": f"{self.expires_at:.0f}",
            "size_limit": str(self.size_limit),
            "edit_status": "1" if self.edit_status else "0",
        }
        return {_PREFIX + key: value for key, value in meta.items()}

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> Target | None:
        """The target stored on a job, or None when the job did not come from Discord or the meta is bad."""
        values = {key[len(_PREFIX) :]: value for key, value in meta.items() if key.startswith(_PREFIX)}
        try:
            return cls(
                channel_id=int(values["channel"]),
                guild_id=int(values["guild"]) if values.get("guild") else None,
                application_id=int(values["app"]) if values.get("app") else None,
                token=values.get("token") or None,
                expires_at=float(values.get("expires") or 0),
                size_limit=int(values.get("size_limit") or DEFAULT_SIZE_LIMIT),
                edit_status=values.get("edit_status", "1") == "1",
            )
        except (KeyError, ValueError):
            return None
