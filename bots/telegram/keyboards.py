"""Inline keyboards and their callback data: "hh:<action>:<index>:<job id>", stateless and <= 64 bytes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, TypeAlias

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from core.types import Action

logger = logging.getLogger(__name__)

PREFIX = "hh"
MAX_CALLBACK_BYTES = 64
SHARE: Literal["share"] = "share"
"""↗️: post the result to the chat's gallery channel (an adapter action, not a service one)."""
Press: TypeAlias = Action | Literal["share"]
_CODES: dict[Press, str] = {
    Action.REROLL: "r",
    Action.VARIATION: "v",
    Action.UPSCALE: "u",
    Action.CANCEL: "c",
    Action.CHOOSE: "s",
    SHARE: "g",
}
_ACTIONS = {code: action for action, code in _CODES.items()}


@dataclass(frozen=True)
class ButtonPress:
    """What a pressed button asks for; everything needed is in the callback data, nothing in memory."""

    action: Press
    index: int
    job_id: str


def encode(action: Press, index: int, job_id: str) -> str:
    data = f"{PREFIX}:{_CODES[action]}:{index}:{job_id}"
    if len(data.encode()) > MAX_CALLBACK_BYTES:
        raise ValueError(f"callback data over {MAX_CALLBACK_BYTES} bytes for job {job_id!r}")
    return data


def decode(data: object) -> ButtonPress | None:
    """Parse callback data; None for anything that is not one of our buttons."""
    if not isinstance(data, str) or len(data.encode()) > MAX_CALLBACK_BYTES:
        return None
    parts = data.split(":")
    if len(parts) != 4 or parts[0] != PREFIX or parts[1] not in _ACTIONS:
        return None
    _, code, index, job_id = parts
    if not index.isdigit() or not job_id or not job_id.isalnum():
        return None
    return ButtonPress(_ACTIONS[code], int(index), job_id)


def cancel_keyboard(job_id: str) -> InlineKeyboardMarkup:
    """The ❌ button on a running job's status message."""
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton("❌ Cancel", callback_data=encode(Action.CANCEL, 0, job_id))]]
    )


def result_keyboard(
    job_id: str, count: int, *, choose: bool = False, share: bool = False
) -> InlineKeyboardMarkup:
    """🔄 reroll, then V1..Vn and U1..Un for the n pictures of a finished job; ⭐1..⭐n on story pictures;
    ↗️ Share when the chat has a gallery channel."""
    rows = [[InlineKeyboardButton("🔄", callback_data=encode(Action.REROLL, 0, job_id))]]
    labels = [("V", Action.VARIATION), ("U", Action.UPSCALE)]
    if choose:
        labels.append(("⭐", Action.CHOOSE))
    for label, action in labels if count > 0 else []:
        rows.append(
            [
                InlineKeyboardButton(f"{label}{i + 1}", callback_data=encode(action, i, job_id))
                for i in range(count)
            ]
        )
    if share:
        rows.append([InlineKeyboardButton("↗️ Share", callback_data=encode(SHARE, 0, job_id))])
    return InlineKeyboardMarkup(rows)
