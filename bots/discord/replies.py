"""A core `Reply` on Discord: its sentences in the deferred response, its files in follow-ups."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import discord

from bots.discord.delivery import CALL_TIMEOUT_S, NO_MENTIONS, Delivery, clip
from bots.discord.files import fit_image
from bots.discord.interactions import Interaction, say
from bots.discord.target import Target

if TYPE_CHECKING:
    from core.service import Huahua, Reply

logger = logging.getLogger(__name__)

MAX_FILES = 10
"""Attachments Discord takes on one message."""


def attachment_files(
    attachments: Iterable[tuple[str, bytes]], limit: int
) -> tuple[list[discord.File], list[str]]:
    """Files that fit `limit` (pictures shrunk when they must), and a note for each that does not."""
    files: list[discord.File] = []
    notes: list[str] = []
    for filename, data in attachments:
        if filename.lower().endswith(".png"):
            fitted = fit_image(data, limit, filename[:-4])
            if fitted is not None:
                filename, data = fitted
        if len(data) <= limit:
            files.append(discord.File(io.BytesIO(data), filename=filename))
        else:
            notes.append(f"({filename} is too large to attach here: {len(data) / 1e6:.1f} MB)")
    return files, notes


def batches(files: Sequence[discord.File]) -> list[list[discord.File]]:
    """The files in groups Discord takes on one message."""
    return [list(files[start : start + MAX_FILES]) for start in range(0, len(files), MAX_FILES)]


async def post_reply(
    interaction: Interaction, service: Huahua, delivery: Delivery, reply: Reply, target: Target
) -> None:
    """Answer a deferred command with `reply`; the jobs it started are delivered to `target`."""
    for job in reply.jobs:
        if Target.from_meta(job.meta) is None:  # a plug-in that did not keep MessageContext.meta
            await service.update_meta(job.id, target.to_meta())
            delivery.remember(job.id, target)
    files, notes = attachment_files(reply.attachments, target.size_limit)
    text = "\n".join([*reply.texts, *notes]) or "✅"
    await say(interaction, text)
    for group in batches(files):
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await interaction.followup.send(files=group, allowed_mentions=NO_MENTIONS, wait=True)
        except (discord.HTTPException, TimeoutError) as err:
            logger.info("could not send a reply's files: %s", type(err).__name__)
            await say(interaction, clip(f"{text}\nDiscord did not take the files; please try again."))
            return
