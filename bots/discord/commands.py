"""Slash commands and button presses, translated into calls on the Huahua service."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bots.discord.delivery import Delivery, clip
from bots.discord.gallery import Gallery
from bots.discord.interactions import (
    Interaction,
    chat_of,
    guild_scope,
    is_admin,
    say,
    user_of,
)
from bots.discord.replies import post_reply
from bots.discord.story import STORY_COMMANDS, StoryCommands
from bots.discord.target import Target
from core import presenter
from core.errors import HuahuaError, InvalidOption, ServiceUnavailable
from core.images import check_upload_bytes
from core.service import MessageContext, Reply
from core.story.book import StoryBook
from core.story.model import picture_panel
from core.types import Action, ImagineOptions, JobStatus

if TYPE_CHECKING:
    from core.service import Huahua

logger = logging.getLogger(__name__)

RESERVED = frozenset({"", "imagine", "settings", "share", "help", "start"})
COMMAND_NAME = re.compile(r"[a-z0-9_-]{1,32}")
MAX_CHOICES = 25


class SlashCommands:
    """Installs /imagine, /settings, /share, /help, the story commands and the service's other plug-in
    commands on a tree."""

    def __init__(self, service: Huahua, delivery: Delivery) -> None:
        self.service = service
        self.delivery = delivery
        self.gallery = Gallery(service, delivery)
        self.story = StoryCommands(self.run_text, self.style_choices, self.add_cast_picture)

    def install(self, tree: app_commands.CommandTree[Any]) -> None:
        tree.add_command(self._imagine_command())
        tree.add_command(self._settings_command())
        tree.add_command(self.gallery.command())
        tree.add_command(self._help_command())
        names = frozenset(self.service.commands())
        for command in self.story.commands(names):
            tree.add_command(command)
        for menu in self.story.context_menus(names):
            tree.add_command(menu)
        for name in sorted(names - RESERVED - STORY_COMMANDS):
            if COMMAND_NAME.fullmatch(name):
                tree.add_command(self._plugin_command(name, self.service.handler(name)))

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

    # /help and plug-in commands ----------------------------------------------------------------

    def _help_command(self) -> app_commands.Command[Any, Any, None]:
        @app_commands.command(name="help", description="How to use Huahua.")
        async def help_(interaction: Interaction) -> None:
            await interaction.response.send_message(presenter.HELP, ephemeral=True)

        return help_

    def _plugin_command(self, name: str, handler: Any) -> app_commands.Command[Any, Any, None]:
        description = clip(getattr(handler, "description", "") or f"/{name}", 100)

        async def run(interaction: Interaction, text: app_commands.Range[str, 0, 2000] = "") -> None:
            await self.run_text(interaction, f"/{name} {text}".strip(), None)

        return app_commands.Command(name=name, description=description, callback=run)

    async def run_text(self, interaction: Interaction, text: str, reply_to_text: str | None) -> None:
        """A text command on behalf of the interaction, answered in public; its jobs' results follow."""
        await interaction.response.defer(thinking=True)
        target = Target.from_interaction(interaction, edit_status=False)
        context = MessageContext(
            is_admin=is_admin(interaction), reply_to_text=reply_to_text, meta=target.to_meta()
        )
        async with self.delivery.answering(interaction.token):
            reply = await self.service.handle_message(
                chat_of(interaction), user_of(interaction), text, context
            )
            await post_reply(interaction, self.service, self.delivery, reply, target)

    async def add_cast_picture(
        self, interaction: Interaction, args: str, picture: discord.Attachment
    ) -> None:
        """`/cast add` with a picture: its size (as Discord reports it) is checked before it is read,
        then the core validates and keeps it as the member's reference."""
        await interaction.response.defer(thinking=True)
        target = Target.from_interaction(interaction, edit_status=False)
        try:
            book = self.service.handler("cast")
            if not isinstance(book, StoryBook):
                raise ServiceUnavailable("Stories are not switched on for this bot.")
            if picture.content_type and not picture.content_type.startswith("image/"):
                raise InvalidOption("That attachment is not a picture: send a PNG, JPEG or WebP image.")
            check_upload_bytes(picture.size)
            try:
                data = await picture.read()
            except discord.HTTPException as err:
                logger.warning("could not read a Discord attachment: %s", type(err).__name__)
                raise ServiceUnavailable(
                    "I couldn't fetch that picture from Discord; please try again."
                ) from None
            reply = await book.cast_add_with_picture(chat_of(interaction), user_of(interaction), args, data)
        except HuahuaError as err:
            reply = Reply(texts=(err.message,), error=err)
        async with self.delivery.answering(interaction.token):
            await post_reply(interaction, self.service, self.delivery, reply, target)

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
            job = await self.service.act(
                job_id, action, index, user, meta=target.to_meta(), is_admin=is_admin(interaction)
            )
        except HuahuaError as err:
            await say(interaction, err.message)
            return
        if action == Action.CHOOSE:
            await say(interaction, f"⭐ Panel {picture_panel(job, index) or '?'} now uses this picture.")
