"""Buttons under job messages: persistent dynamic items whose custom ids carry action, index and job."""

from __future__ import annotations

import logging
import re
from typing import Any, Protocol, cast

import discord

from core.types import Action, Job

logger = logging.getLogger(__name__)

CUSTOM_ID = re.compile(
    r"hh:(?P<action>reroll|variation|upscale|cancel|choose):(?P<index>[0-9]):(?P<job>[A-Za-z0-9_-]{1,64})"
)
MAX_BUTTON_IMAGES = 4


class ButtonHandler(Protocol):
    """The client that answers job buttons (`HuahuaBot`), named here without importing the bot."""

    async def on_job_button(
        self, interaction: discord.Interaction[Any], action: Action, index: int, job_id: str
    ) -> None: ...


def custom_id(action: Action, index: int, job_id: str) -> str:
    return f"hh:{action.value}:{index}:{job_id}"


def _button(action: Action, index: int, job_id: str) -> discord.ui.Button[Any]:
    cid = custom_id(action, index, job_id)
    if action == Action.REROLL:
        return discord.ui.Button(emoji="🔄", style=discord.ButtonStyle.secondary, custom_id=cid, row=2)
    if action == Action.CANCEL:
        return discord.ui.Button(label="Cancel", emoji="❌", style=discord.ButtonStyle.danger, custom_id=cid)
    if action == Action.CHOOSE:
        return discord.ui.Button(
            label=f"{index + 1}", emoji="⭐", style=discord.ButtonStyle.primary, custom_id=cid, row=3
        )
    letter, row = ("V", 0) if action == Action.VARIATION else ("U", 1)
    return discord.ui.Button(
        label=f"{letter}{index + 1}", style=discord.ButtonStyle.secondary, custom_id=cid, row=row
    )


class JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=CUSTOM_ID):
    """One button; it still works after a restart because everything it needs is in its custom id."""

    def __init__(self, action: Action, index: int, job_id: str) -> None:
        super().__init__(_button(action, index, job_id))
        self.action = action
        self.index = index
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> JobButton:
        return cls(Action(match["action"]), int(match["index"]), match["job"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        bot = cast(ButtonHandler, interaction.client)
        await bot.on_job_button(interaction, self.action, self.index, self.job_id)


def _view(*items: JobButton) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    view.stop()  # dispatch goes through the dynamic item template, so the view need not be kept
    return view


def running_view(job_id: str) -> discord.ui.View:
    """❌ cancel, shown while a job is queued or drawing."""
    return _view(JobButton(Action.CANCEL, 0, job_id))


def result_view(job: Job) -> discord.ui.View:
    """V1–Vn, U1–Un and 🔄 reroll under a finished result; ⭐1–⭐n under a story picture."""
    count = min(len(job.images), MAX_BUTTON_IMAGES)
    items = [JobButton(Action.VARIATION, i, job.id) for i in range(count)]
    items += [JobButton(Action.UPSCALE, i, job.id) for i in range(count)]
    items.append(JobButton(Action.REROLL, 0, job.id))
    if "story_id" in job.meta:  # a scene, or a reroll or variation of one: a candidate panel
        items += [JobButton(Action.CHOOSE, i, job.id) for i in range(count)]
    return _view(*items)
