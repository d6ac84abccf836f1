"""/story, /cast, /illustrate and the "Illustrate" message menu: typed options composed into the core's
text commands (the core parses and answers; this module only writes the command line)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

import discord
from discord import app_commands

from bots.discord.interactions import Interaction, answer, is_admin

logger = logging.getLogger(__name__)

RunText = Callable[[Interaction, str, str | None], Awaitable[None]]
"""Runs a text command for an interaction: (interaction, "/story add …", text of a replied-to message)."""
StyleChoices = Callable[[Interaction, str], Coroutine[Any, Any, list[app_commands.Choice[str]]]]
AddPicture = Callable[[Interaction, str, discord.Attachment], Awaitable[None]]
"""Runs `/cast add` with a picture: (interaction, "<name>: <description>", the attachment)."""

STORY_COMMANDS = frozenset({"story", "cast", "illustrate"})
MAX_PANELS = 500
MAX_PICTURES = 100


class StoryCommands:
    """The story family as Discord commands; each callback hands one text command to `run`."""

    def __init__(self, run: RunText, style_choices: StyleChoices, add_picture: AddPicture) -> None:
        self.run = run
        self.style_choices = style_choices
        self.add_picture = add_picture

    def commands(
        self, names: frozenset[str]
    ) -> list[app_commands.Group | app_commands.Command[Any, Any, None]]:
        """The commands for the story names the service answers (`names`)."""
        built: list[app_commands.Group | app_commands.Command[Any, Any, None]] = []
        if "story" in names:
            built.append(self._story_group())
        if "cast" in names:
            built.append(self._cast_group())
        if "illustrate" in names:
            built.append(self._illustrate_command())
        return built

    def context_menus(self, names: frozenset[str]) -> list[app_commands.ContextMenu]:
        return [self._illustrate_menu()] if "illustrate" in names else []

    # /story ------------------------------------------------------------------------------------

    def _story_group(self) -> app_commands.Group:
        group = app_commands.Group(name="story", description="This channel's illustrated story.")
        run = self.run

        @group.command(name="new", description="Start this channel's story.")
        @app_commands.describe(title="The story's title", style="A style preset for every panel")
        async def new(
            interaction: Interaction, title: app_commands.Range[str, 1, 100], style: str | None = None
        ) -> None:
            await run(interaction, f"/story new {title}" + (f" --style {style}" if style else ""), None)

        @group.command(name="add", description="Add a passage of the story.")
        @app_commands.describe(excerpt="The passage, in any language")
        async def add(interaction: Interaction, excerpt: app_commands.Range[str, 1, 2000]) -> None:
            await run(interaction, f"/story add {excerpt}", None)

        @group.command(name="show", description="The story so far, with its latest panels.")
        async def show(interaction: Interaction) -> None:
            await run(interaction, "/story show", None)

        @group.command(name="style", description="Set the story's style preset (before the first panel).")
        @app_commands.describe(preset="A style preset")
        async def style(interaction: Interaction, preset: app_commands.Range[str, 1, 40]) -> None:
            await run(interaction, f"/story style {preset}", None)

        @group.command(name="auto", description="Whether every message here is a passage of the story.")
        @app_commands.describe(state="on: every message is a passage; off: only /story add")
        async def auto(interaction: Interaction, state: Literal["on", "off"]) -> None:
            await run(interaction, f"/story auto {state}", None)

        @group.command(name="choose", description="Pick which picture of a panel goes into the book.")
        @app_commands.describe(panel="The panel number", picture="The picture number within the panel")
        async def choose(
            interaction: Interaction,
            panel: app_commands.Range[int, 1, MAX_PANELS],
            picture: app_commands.Range[int, 1, MAX_PICTURES],
        ) -> None:
            await run(interaction, f"/story choose {panel} {picture}", None)

        @group.command(name="rerender", description="Draw a panel again with exactly the same settings.")
        @app_commands.describe(panel="The panel number")
        async def rerender(interaction: Interaction, panel: app_commands.Range[int, 1, MAX_PANELS]) -> None:
            await run(interaction, f"/story rerender {panel}", None)

        @group.command(name="export", description="The storybook as HTML and PDF files.")
        async def export(interaction: Interaction) -> None:
            await run(interaction, "/story export", None)

        @group.command(name="end", description="Finish this channel's story.")
        @app_commands.describe(force="Admins: end a story someone else started")
        async def end(interaction: Interaction, force: bool = False) -> None:
            if force and not is_admin(interaction):
                await answer(interaction, "Only members with the Manage Server permission can force this.")
                return
            await run(interaction, "/story end --force" if force else "/story end", None)

        new.autocomplete("style")(self.style_choices)
        style.autocomplete("preset")(self.style_choices)
        return group

    # /cast -------------------------------------------------------------------------------------

    def _cast_group(self) -> app_commands.Group:
        group = app_commands.Group(name="cast", description="The story's characters.")
        run, add_picture = self.run, self.add_picture

        @group.command(name="add", description="Add a character, drawn the same way in every panel.")
        @app_commands.describe(
            name="The character's name",
            description="How they look (may be left out when giving a picture of someone in the cast)",
            picture="A picture of them: every panel with them follows it",
        )
        async def add(
            interaction: Interaction,
            name: app_commands.Range[str, 1, 30],
            description: app_commands.Range[str, 1, 200] | None = None,
            picture: discord.Attachment | None = None,
        ) -> None:
            if ":" in name or "：" in name:
                await answer(interaction, "A character's name cannot contain a colon.")
                return
            args = f"{name}: {description}" if description else name
            if picture is not None:
                await add_picture(interaction, args, picture)
                return
            await run(interaction, f"/cast add {args}", None)

        @group.command(name="show", description="A character's description and reference picture.")
        @app_commands.describe(name="The character's name")
        async def show(interaction: Interaction, name: app_commands.Range[str, 1, 30]) -> None:
            await run(interaction, f"/cast show {name}", None)

        @group.command(name="list", description="The story's characters.")
        async def list_(interaction: Interaction) -> None:
            await run(interaction, "/cast list", None)

        @group.command(name="remove", description="Remove a character.")
        @app_commands.describe(name="The character's name")
        async def remove(interaction: Interaction, name: app_commands.Range[str, 1, 30]) -> None:
            await run(interaction, f"/cast remove {name}", None)

        return group

    # /illustrate -------------------------------------------------------------------------------

    def _illustrate_command(self) -> app_commands.Command[Any, Any, None]:
        run = self.run

        @app_commands.command(name="illustrate", description="Draw the story's latest passages.")
        @app_commands.describe(count="How many of the latest passages to draw (1–4)")
        async def illustrate(
            interaction: Interaction, count: app_commands.Range[int, 1, 4] | None = None
        ) -> None:
            await run(interaction, "/illustrate" + (f" {count}" if count else ""), None)

        return illustrate

    def _illustrate_menu(self) -> app_commands.ContextMenu:
        run = self.run

        async def illustrate_message(interaction: Interaction, message: discord.Message) -> None:
            if not message.content.strip():
                await answer(interaction, "That message has no text to illustrate.")
                return
            await run(interaction, "/illustrate", message.content)

        return app_commands.ContextMenu(name="Illustrate", callback=illustrate_message)
