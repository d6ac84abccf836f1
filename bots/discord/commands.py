"""Slash commands and button presses, translated into calls on the Huahua service."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bots.discord.delivery import CALL_TIMEOUT_S, NO_MENTIONS, Delivery, clip
from bots.discord.target import Target
from core import presenter
from core.errors import HuahuaError, InvalidOption, NotAllowed
from core.service import MessageContext
from core.types import Action, ImagineOptions, JobStatus

if TYPE_CHECKING:
    from core.service import Huahua

logger = logging.getLogger(__name__)

Interaction = discord.Interaction[Any]
RESERVED = frozenset({"imagine", "settings", "share", "help", "start"})
COMMAND_NAME = re.compile(r"[a-z0-9_-]{1,32}")
MAX_CHOICES = 25


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


class SlashCommands:
    """Installs /imagine, /settings, /share, /help and the service's plug-in commands on a tree."""

    def __init__(self, service: Huahua, delivery: Delivery) -> None:
        self.service = service
        self.delivery = delivery

    def install(self, tree: app_commands.CommandTree[Any]) -> None:
        tree.add_command(self._imagine_command())
        tree.add_command(self._settings_command())
        tree.add_command(self._share_command())
        tree.add_command(self._help_command())
        for name, handler in sorted(self.service._handlers.items()):
            if name in RESERVED or not COMMAND_NAME.fullmatch(name):
                continue
            tree.add_command(self._plugin_command(name, handler))

    async def style_choices(self, interaction: Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = list(getattr(self.service.styles, "names", ()))
        wanted = current.casefold()
        return [app_commands.Choice(name=n, value=n) for n in names if wanted in n.casefold()][:MAX_CHOICES]

    # /imagine ----------------------------------------------------------------------------------

    def _imagine_command(self) -> app_commands.Command[Any, Any, None]:
        @app_commands.command(name="imagine", description="Draw a picture from your words, in any language.")
        @app_commands.describe(
            prompt="What to draw",
            ar="Aspect ratio, e.g. 3:2 or 9:16",
            seed="Seed, for a repeatable picture",
            steps="Sampling steps",
            n="How many pictures (1–4)",
            negative="Things to avoid",
            style="A style preset",
        )
        async def imagine(
            interaction: Interaction,
            prompt: app_commands.Range[str, 1, 2000],
            ar: app_commands.Range[str, 1, 10] | None = None,
            seed: app_commands.Range[int, 0, 4_294_967_295] | None = None,
            steps: app_commands.Range[int, 1, 200] | None = None,
            n: app_commands.Range[int, 1, 4] | None = None,
            negative: app_commands.Range[str, 1, 1000] | None = None,
            style: str | None = None,
        ) -> None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            options = ImagineOptions(
                text=prompt, aspect_ratio=ar, seed=seed, steps=steps, n=n, negative=negative, style=style
            )
            target = Target.from_interaction(interaction)
            try:
                await self.service.imagine(
                    chat_of(interaction), user_of(interaction), options, meta=target.to_meta()
                )
            except HuahuaError as err:
                await say(interaction, err.message)

        imagine.autocomplete("style")(self.style_choices)
        return imagine

    # /settings ---------------------------------------------------------------------------------

    def _settings_command(self) -> app_commands.Command[Any, Any, None]:
        @app_commands.command(
            name="settings", description="Show Huahua's settings here; admins can change them."
        )
        @app_commands.guild_only()
        @app_commands.describe(
            style="Default style preset for this channel",
            quota="Images per user per day in this channel",
            enabled="Whether Huahua draws in this channel",
            gallery="The server's gallery channel for /share",
            clear_gallery="Forget the gallery channel",
        )
        async def settings(
            interaction: Interaction,
            style: str | None = None,
            quota: app_commands.Range[int, 0, 10_000] | None = None,
            enabled: bool | None = None,
            gallery: app_commands.AppCommandChannel | None = None,
            clear_gallery: bool = False,
        ) -> None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            assert interaction.guild_id is not None  # guild_only
            chat, guild = chat_of(interaction), guild_scope(interaction.guild_id)
            changes: list[tuple[str, str]] = []
            if style is not None:
                changes.append((chat, f"style {style}"))
            if quota is not None:
                changes.append((chat, f"quota {quota}"))
            if enabled is not None:
                changes.append((chat, f"enabled {'on' if enabled else 'off'}"))
            if gallery is not None:
                if gallery.type not in (discord.ChannelType.text, discord.ChannelType.news):
                    await say(interaction, "The gallery must be a text channel.")
                    return
                changes.append((guild, f"gallery {gallery.id}"))
            elif clear_gallery:
                changes.append((guild, "gallery off"))
            if not changes:
                await say(interaction, await self._show_settings(interaction, chat, guild))
                return
            if not is_admin(interaction):
                await say(
                    interaction,
                    "Only members with the Manage Server permission can change Huahua's settings.",
                )
                return
            context = MessageContext(is_admin=True)
            answers: list[str] = []
            for scope, args in changes:
                reply = await self.service.handle_message(
                    scope, user_of(interaction), f"/settings {args}", context
                )
                answers.extend(reply.texts)
            await say(interaction, "\n".join(answers))

        settings.autocomplete("style")(self.style_choices)
        return settings

    async def _show_settings(self, interaction: Interaction, chat: str, guild: str) -> str:
        reply = await self.service.handle_message(chat, user_of(interaction), "/settings")
        gallery = (await self.service.chat_settings(guild)).gallery
        where = f"<#{gallery}>" if gallery else "none (an admin can set one with /settings gallery:)"
        return "\n".join([*reply.texts, f"Gallery channel for /share: {where}."])

    # /share ------------------------------------------------------------------------------------

    def _share_command(self) -> app_commands.Command[Any, Any, None]:
        @app_commands.command(name="share", description="Post a result to this server's gallery channel.")
        @app_commands.guild_only()
        @app_commands.describe(job="The job id (shown under a result); your last result if left out")
        async def share(interaction: Interaction, job: app_commands.Range[str, 1, 64] | None = None) -> None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            try:
                await say(interaction, await self._share(interaction, job))
            except HuahuaError as err:
                await say(interaction, err.message)

        return share

    async def _share(self, interaction: Interaction, job_id: str | None) -> str:
        assert interaction.guild_id is not None  # guild_only
        user = user_of(interaction)
        if job_id is None:
            job_id = self.delivery.last_result(chat_of(interaction), user)
            if job_id is None:
                raise InvalidOption("There is nothing to share yet: draw something first, or give a job id.")
        job = await self.service.get_job(job_id.strip())
        origin = Target.from_meta(job.meta)
        if origin is None or origin.guild_id != interaction.guild_id:
            raise InvalidOption("That picture was not made in this server.")
        if job.user != user and not is_admin(interaction):
            raise NotAllowed("Only the person who asked for this picture can share it.")
        if job.status != JobStatus.DONE or not job.images:
            raise InvalidOption("That picture is not ready yet: wait for it to finish.")
        gallery = (await self.service.chat_settings(guild_scope(interaction.guild_id))).gallery
        if not gallery or not gallery.isdigit():
            raise InvalidOption(
                "This server has no gallery channel yet: an admin can set one with /settings."
            )
        images = [await self.service.image(digest) for digest in job.images]
        files, links = self.delivery.files_for(job, images, interaction.filesize_limit)
        content = "\n".join([f"Shared by <@{interaction.user.id}>", presenter.describe(job), *links])
        channel = interaction.client.get_partial_messageable(int(gallery), guild_id=interaction.guild_id)
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await channel.send(content=clip(content), files=files, allowed_mentions=NO_MENTIONS)
        except discord.Forbidden:
            return f"I may not post in <#{gallery}>: give me Send Messages and Attach Files there."
        except (discord.HTTPException, TimeoutError):
            return f"Discord did not take the picture for <#{gallery}>; please try again."
        return f"Shared to <#{gallery}>."

    # /help and plug-in commands ----------------------------------------------------------------

    def _help_command(self) -> app_commands.Command[Any, Any, None]:
        @app_commands.command(name="help", description="How to use Huahua.")
        async def help_(interaction: Interaction) -> None:
            await interaction.response.send_message(presenter.HELP, ephemeral=True)

        return help_

    def _plugin_command(self, name: str, handler: Any) -> app_commands.Command[Any, Any, None]:
        description = clip(getattr(handler, "description", "") or f"/{name}", 100)

        async def run(interaction: Interaction, text: app_commands.Range[str, 0, 2000] = "") -> None:
            await interaction.response.defer(thinking=True)
            target = Target.from_interaction(interaction, edit_status=False)
            context = MessageContext(is_admin=is_admin(interaction), meta=target.to_meta())
            reply = await self.service.handle_message(
                chat_of(interaction), user_of(interaction), f"/{name} {text}".strip(), context
            )
            for job in _jobs_of(reply):
                self._route(job.id, target)
            files = [
                discord.File(io.BytesIO(data), filename=filename) for filename, data in reply.attachments
            ]
            await say(interaction, "\n".join(reply.texts) or "✅", files)

        return app_commands.Command(name=name, description=description, callback=run)

    # buttons -----------------------------------------------------------------------------------

    async def on_job_button(self, interaction: Interaction, action: Action, index: int, job_id: str) -> None:
        user = user_of(interaction)
        if action == Action.CANCEL:
            try:
                job = await self.service.cancel(job_id, user, is_admin=is_admin(interaction))
            except HuahuaError as err:
                await interaction.response.send_message(err.message, ephemeral=True)
                return
            done = "❌ Cancelled." if job.status == JobStatus.CANCELLED else "Stopping the drawing…"
            if job.status.finished and job.status != JobStatus.CANCELLED:
                done = "That picture has already finished."
            await interaction.response.send_message(done, ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        target = Target.from_interaction(interaction)
        try:
            job = await self.service.act(job_id, action, index, user)
        except HuahuaError as err:
            await say(interaction, err.message)
            return
        if action.value == "choose":
            await say(interaction, f"⭐ Picture {index + 1} is now the storybook's panel.")
            return
        self._route(job.id, target)

    def _route(self, job_id: str, target: Target) -> None:
        """Deliver a job the service made without our meta (buttons, plug-in commands) to `target`.

        Kept in memory only: `Huahua.update_meta` rewrites the whole job and would race the worker
        (a job could go back to "queued" after it finished), so these jobs are not re-delivered after
        a restart until `Huahua.act` takes a `meta` argument."""
        self.delivery.remember(job_id, target)


def _jobs_of(reply: Any) -> tuple[Any, ...]:
    jobs = getattr(reply, "jobs", None)
    if jobs is not None:
        return tuple(jobs)
    return (reply.job,) if getattr(reply, "job", None) is not None else ()
