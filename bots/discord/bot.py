"""The Discord client: slash commands, persistent buttons and job delivery wired to the Huahua service.

The process running the client serves the "dc" outbox: finished jobs are posted by `Delivery.post`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from discord import app_commands
from yarl import URL

from bots.discord.commands import SlashCommands
from bots.discord.delivery import STATUS_EVENTS, Delivery
from bots.discord.interactions import answer
from bots.discord.views import JobButton
from core.errors import HuahuaError, ServiceUnavailable
from core.settings import Settings
from core.types import Action

if TYPE_CHECKING:
    from core.service import Huahua

logger = logging.getLogger(__name__)

CHAT_PREFIX = "dc:"
OUTBOX_PLATFORM = "dc"


class HuahuaBot(discord.Client):
    """Slash commands only, so it needs no privileged intents (no message content)."""

    def __init__(self, service: Huahua, settings: Settings, *, edit_interval: float = 1.0) -> None:
        super().__init__(
            intents=discord.Intents(guilds=True), allowed_mentions=discord.AllowedMentions.none()
        )
        self.service = service
        self.guild_id = settings.discord_guild_id
        self.tree: app_commands.CommandTree[HuahuaBot] = app_commands.CommandTree(self)
        self.delivery = Delivery(self, service, edit_interval=edit_interval)
        self.commands = SlashCommands(service, self.delivery)
        self.commands.install(self.tree)
        self.tree.on_error = self.on_command_error  # type: ignore[method-assign]
        service.listen(CHAT_PREFIX, self.delivery.on_event, STATUS_EVENTS)

    async def setup_hook(self) -> None:
        self.add_dynamic_items(JobButton)
        await self.sync_commands()
        self.delivery.open()
        self.service.outbox.serve(OUTBOX_PLATFORM, self.delivery.post)

    async def sync_commands(self) -> None:
        """Publish the commands: to one guild (instant) when HUAHUA_DISCORD_GUILD_ID is set, else globally."""
        try:
            if self.guild_id:
                guild = discord.Object(id=self.guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
            else:
                synced = await self.tree.sync()
            logger.info("synced %d slash commands", len(synced))
        except discord.HTTPException as err:
            logger.error("could not sync slash commands (HTTP %s, code %s)", err.status, err.code)

    async def on_command_error(
        self, interaction: discord.Interaction[Any], error: app_commands.AppCommandError
    ) -> None:
        """A bug or an outage must still end in one sentence, never a spinning "thinking…"."""
        logger.error("slash command /%s failed", getattr(interaction.command, "name", "?"), exc_info=error)
        await answer(interaction, "Something went wrong on my side; please try again in a moment.")

    async def on_job_button(
        self, interaction: discord.Interaction[Any], action: Action, index: int, job_id: str
    ) -> None:
        try:
            await self.commands.on_job_button(interaction, action, index, job_id)
        except Exception:
            logger.exception("the %s button of job %s failed", action.value, job_id)
            await answer(interaction, "Something went wrong on my side; please try again in a moment.")

    async def close(self) -> None:
        await self.service.outbox.stop(OUTBOX_PLATFORM)
        self.delivery.close()
        await super().close()


def build_client(service: Huahua, settings: Settings, *, edit_interval: float = 1.0) -> HuahuaBot:
    """A client ready to `login`/`start`; it already listens to the service's "dc:" job events and
    serves the "dc" outbox once logged in (`setup_hook`)."""
    return HuahuaBot(service, settings, edit_interval=edit_interval)


async def run_discord(service: Huahua, settings: Settings) -> None:
    """Run the bot until cancelled; closing logs out and stops delivering.

    Failing to start (a refused token, no network) raises a HuahuaError with one sentence."""
    if settings.discord_token is None or not settings.discord_token.get_secret_value().strip():
        raise HuahuaError("Set HUAHUA_DISCORD_TOKEN to your Discord application's bot token.")
    # the bot has no voice, so the library's warnings about missing voice packages are noise
    discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
    client = build_client(service, settings)
    async with client:
        try:
            await client.login(settings.discord_token.get_secret_value().strip())
        except discord.LoginFailure:
            raise HuahuaError("Discord refused the bot token: check HUAHUA_DISCORD_TOKEN.") from None
        except (aiohttp.ClientError, OSError, TimeoutError):
            host = URL(discord.http.Route.BASE).host or "discord.com"
            raise ServiceUnavailable(f"I can't reach Discord at {host}; is the network up?") from None
        except discord.HTTPException as err:
            raise ServiceUnavailable(
                f"Discord answered HTTP {err.status} when the bot logged in; try again in a moment."
            ) from None
        try:
            await client.connect()
        except discord.PrivilegedIntentsRequired:
            raise HuahuaError("Discord refused the gateway intents requested by the bot.") from None
        except discord.ConnectionClosed as err:
            if err.code == 4004:
                raise HuahuaError("Discord refused the bot token: check HUAHUA_DISCORD_TOKEN.") from None
            raise ServiceUnavailable(f"Discord closed the gateway connection (code {err.code}).") from None
