"""The optional LLM scene planner: one chat-completions call asked for JSON, validated, with the offline
planner as the fallback on any failure. What it returns is moderated again like every prompt."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

from core.llm import ChatClient, LlmError
from core.prompting.glossary import contains_han
from core.prompting.normalize import clean_text, normalize_chinese
from core.story.model import ScenePlan, Story
from core.story.planner import ScenePlanner

logger = logging.getLogger(__name__)

MAX_ACTION_CHARS = 200
MAX_FIELD_CHARS = 30
_FIELDS = ("location", "time_of_day", "season", "mood")


class LlmScenePlanner(ScenePlanner):
    name = "llm"

    def __init__(self, offline: ScenePlanner, client: ChatClient, instructions: str) -> None:
        super().__init__(
            offline.lexicon, offline.translator, offline.tokenizer, offline.styles, offline.limit
        )
        self.client = client
        self.instructions = instructions

    async def plan(self, excerpt: str, story: Story) -> ScenePlan:
        cleaned, _ = clean_text(excerpt)
        try:
            reply = await self.client.complete(self.instructions, _request(cleaned, story), json_object=True)
            return _validated(reply, story)
        except LlmError as err:
            logger.warning("LLM scene planning failed (%s), using the offline planner", err)
            plan = await super().plan(excerpt, story)
            note = "The planning service did not give a usable answer, so the scene was planned offline."
            return replace(plan, planner=ScenePlanner.name, notes=(*plan.notes, note))


def _request(excerpt: str, story: Story) -> str:
    carried = story.continuity
    return json.dumps(
        {
            "cast": [{"name": m.name, "description": m.description} for m in story.cast],
            "previous": {
                "location": carried.location,
                "time_of_day": carried.time_of_day,
                "season": carried.season,
                "last_character": carried.last_character,
            },
            "passage": excerpt,
        },
        ensure_ascii=False,
    )


def _validated(reply: str, story: Story) -> ScenePlan:
    """The reply as a ScenePlan; LlmError for anything that is not the asked-for shape."""
    try:
        data: Any = json.loads(reply.strip().removeprefix("```json").removesuffix("```"))
    except json.JSONDecodeError as err:
        raise LlmError("the plan is not JSON") from err
    if not isinstance(data, dict):
        raise LlmError("the plan is not a JSON object")
    action = data.get("action")
    if not isinstance(action, str) or not contains_han(action) or len(action) > MAX_ACTION_CHARS:
        raise LlmError("the plan has no usable Chinese action")
    names = data.get("characters") or []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise LlmError("the plan's characters are not a list of names")
    members = [story.member(name) for name in names]
    characters = tuple(dict.fromkeys(m.name for m in members if m is not None))
    fields = {name: _phrase(data.get(name), name) for name in _FIELDS}
    carried = story.continuity
    return ScenePlan(
        characters=characters,
        action=normalize_chinese(action),
        location=fields["location"] or carried.location,
        time_of_day=fields["time_of_day"] or carried.time_of_day,
        season=fields["season"] or carried.season,
        mood=fields["mood"],
        language="zh",
        planner=LlmScenePlanner.name,
    )


def _phrase(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS:
        raise LlmError(f"the plan's {name} is not a short phrase")
    return normalize_chinese(value)
