"""Who and where an interaction is, in the service's ids, and how to answer it in one sentence."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord

from bots.discord.delivery import CALL_TIMEOUT_S, NO_MENTIONS, clip

logger = logging.getLogger(__name__)

Interaction = discord.Interaction[Any]


def user_of(interaction: Interaction) -> str:
    return f"dc:{interaction.user.id}"


def chat_of(interaction: Interaction) -> str:
    return f"dc:{interaction.channel_id}"


def guild_scope(guild_id: int) -> str:
    """Chat id under which guild-wide settings (the gallery channel) are kept."""
    return f"dc:guild:{guild_id}"


def is_admin(interaction: Interaction) -> bool:
    return bool(interaction.permissions.manage_guild)


async def say(interaction: Interaction, text: str, files: list[discord.File] | None = None) -> None:
    """Put `text` into the deferred response (ephemeral when the defer was)."""
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await interaction.edit_original_response(
                content=clip(text), attachments=files or [], allowed_mentions=NO_MENTIONS
            )
    except (discord.HTTPException, TimeoutError) as err:
        logger.info("could not answer an interaction: %s", type(err).__name__)


async def answer(interaction: Interaction, text: str) -> None:
    """An ephemeral sentence, whether or not the interaction was already deferred."""
    if interaction.response.is_done():
        await say(interaction, text)
        return
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await interaction.response.send_message(clip(text), ephemeral=True)
    except (discord.HTTPException, TimeoutError) as err:
        logger.info("could not answer an interaction: %s", type(err).__name__)
