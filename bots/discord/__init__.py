"""The Discord adapter: `run_discord(service, settings)` for `huahua discord`, `build_client` for tests."""

from __future__ import annotations

from bots.discord.bot import HuahuaBot, build_client, run_discord

__all__ = ["HuahuaBot", "build_client", "run_discord"]
