"""Telegram adapter. Importing this package does not import python-telegram-bot; calling it does."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from telegram.ext import Application

    from core.service import Huahua
    from core.settings import Settings


def build_application(service: Huahua, settings: Settings) -> Application:  # type: ignore[type-arg]
    """See `bots.telegram.bot.build_application`."""
    from bots.telegram.bot import build_application as build

    return build(service, settings)


async def run_telegram(service: Huahua, settings: Settings) -> None:
    """See `bots.telegram.bot.run_telegram`."""
    from bots.telegram.bot import run_telegram as run

    await run(service, settings)


__all__ = ["build_application", "run_telegram"]
