"""/share picture and /share story: post a result or the channel's storybook to the guild's gallery."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bots.discord.delivery import CALL_TIMEOUT_S, NO_MENTIONS, Delivery, clip
from bots.discord.interactions import Interaction, chat_of, guild_scope, is_admin, say, user_of
from bots.discord.replies import attachment_files, batches
from bots.discord.target import Target
from core import presenter
from core.errors import HuahuaError, InvalidOption, NotAllowed
from core.story.book import StoryBook
from core.types import Job, JobStatus

if TYPE_CHECKING:
    from core.service import Huahua

logger = logging.getLogger(__name__)

"""How far back /share looks for the user's last result when this process has not seen one."""


class Gallery:
    """The /share command group."""

    def __init__(self, service: Huahua, delivery: Delivery) -> None:
        self.service = service
        self.delivery = delivery

    def command(self) -> app_commands.Group:
        group = app_commands.Group(
            name="share", description="Post to this server's gallery channel.", guild_only=True
        )

        @group.command(name="picture", description="Post a result to the gallery channel.")
        @app_commands.describe(job="The job id (shown under a result); your last result if left out")
        async def picture(
            interaction: Interaction, job: app_commands.Range[str, 1, 64] | None = None
        ) -> None:
            await self._run(interaction, self.share_picture(interaction, job))

        @group.command(name="story", description="Post this channel's storybook to the gallery channel.")
        async def story(interaction: Interaction) -> None:
            await self._run(interaction, self.share_story(interaction))

        return group

    async def _run(self, interaction: Interaction, sharing: Any) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            await say(interaction, await sharing)
        except HuahuaError as err:
            await say(interaction, err.message)

    # a picture ---------------------------------------------------------------------------------

    async def share_picture(self, interaction: Interaction, job_id: str | None) -> str:
        guild_id = _guild(interaction)
        user = user_of(interaction)
        job = (
            await self._last_result(interaction)
            if job_id is None
            else await self.service.get_job(job_id.strip())
        )
        origin = Target.from_meta(job.meta)
        if origin is None or origin.guild_id != guild_id:
            raise InvalidOption("That picture was not made in this server.")
        if job.user != user and not is_admin(interaction):
            raise NotAllowed("Only the person who asked for this picture can share it.")
        if job.status != JobStatus.DONE or not job.images:
            raise InvalidOption("That picture is not ready yet: wait for it to finish.")
        gallery = await self._gallery(guild_id)
        images = [await self.service.image(digest) for digest in job.images]
        files, links = self.delivery.files_for(job, images, interaction.filesize_limit)
        content = "\n".join([f"Shared by <@{interaction.user.id}>", presenter.describe(job), *links])
        return await self._post(interaction, gallery, content, files, "picture")

    async def _last_result(self, interaction: Interaction) -> Job:
        chat, user = chat_of(interaction), user_of(interaction)
        job_id = self.delivery.last_result(chat, user)
        if job_id is not None:
            return await self.service.get_job(job_id)
        return await self.service.last_result(chat, user)  # e.g. after a restart

    # a storybook -------------------------------------------------------------------------------

    async def share_story(self, interaction: Interaction) -> str:
        guild_id = _guild(interaction)
        book = self.service.handler("story")
        if not isinstance(book, StoryBook):
            raise InvalidOption("Stories are not switched on for this bot.")

        async def admin() -> bool:
            return is_admin(interaction)

        shared = await book.for_sharing(chat_of(interaction), user_of(interaction), admin)
        gallery = await self._gallery(guild_id)
        files, notes = attachment_files([*shared.files, *shared.panels], interaction.filesize_limit)
        content = "\n".join(
            [
                f"📚 “{shared.story.title}”: {len(shared.panels)} panels, shared by <@{interaction.user.id}>",
                *notes,
            ]
        )
        return await self._post(interaction, gallery, content, files, "storybook")

    # posting -----------------------------------------------------------------------------------

    async def _gallery(self, guild_id: int) -> int:
        gallery = (await self.service.chat_settings(guild_scope(guild_id))).gallery
        if not gallery or not gallery.isdigit():
            raise InvalidOption(
                "This server has no gallery channel yet: an admin can set one with /settings."
            )
        return int(gallery)

    async def _post(
        self, interaction: Interaction, gallery: int, content: str, files: list[discord.File], what: str
    ) -> str:
        channel = interaction.client.get_partial_messageable(gallery, guild_id=interaction.guild_id)
        try:
            for index, group in enumerate(batches(files) or [[]]):
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    await channel.send(
                        content=clip(content) if index == 0 else None,
                        files=group,
                        allowed_mentions=NO_MENTIONS,
                    )
        except discord.Forbidden:
            return f"I may not post in <#{gallery}>: give me Send Messages and Attach Files there."
        except (discord.HTTPException, TimeoutError):
            return f"Discord did not take the {what} for <#{gallery}>; please try again."
        return f"Shared to <#{gallery}>."


def _guild(interaction: Interaction) -> int:
    if interaction.guild_id is None:  # the group is guild-only; this is for type checkers
        raise InvalidOption("Sharing works in a server, not in direct messages.")
    return interaction.guild_id
