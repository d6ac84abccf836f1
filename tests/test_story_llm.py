"""The LLM scene planner against a fake OpenAI-compatible server on loopback, and its offline fallback."""

from __future__ import annotations

import json

import pytest

from core.service import MessageContext
from core.story.llm_planner import LlmScenePlanner
from tests.support import PatternEngine, make_service


async def _story_service(tmp_path, base_url):
    service = await make_service(
        tmp_path,
        engine=PatternEngine(),
        story_planner="llm",
        llm_base_url=base_url,
        llm_api_key="sk-planner-key",
    )
    for text in ("/story new 森林", "/cast add 莉莉: 穿红斗篷的小女孩", "/cast add 阿狼: 一只灰色的大狼"):
        await service.handle_message("web:r", "web:a", text)
    return service


async def _illustrate(service, excerpt):
    await service.handle_message("web:r", "web:a", f"/story add {excerpt}")
    return await service.handle_message("web:r", "web:a", "/illustrate", MessageContext())


async def test_the_llm_plan_is_used_and_validated(tmp_path, fake_llm):
    fake, url = fake_llm
    fake.reply = json.dumps(
        {
            "characters": ["莉莉", "Nobody"],
            "action": "莉莉在月光下的湖边放飞一盏孔明灯",
            "location": "湖边",
            "time_of_day": "夜晚",
            "season": None,
            "mood": "宁静",
        },
        ensure_ascii=False,
    )
    service = await _story_service(tmp_path, url)
    try:
        assert isinstance(service.handler("story").planner, LlmScenePlanner)
        reply = await _illustrate(service, "That night Lily let a lantern fly over the lake.")
        prompt = reply.jobs[0].request.prompt
        assert prompt.startswith("穿红斗篷的小女孩在月光下的湖边放飞一盏孔明灯")
        assert "夜晚" in prompt and "宁静" in prompt
        sent = json.loads(fake.requests[0]["messages"][1]["content"])
        assert [m["name"] for m in sent["cast"]] == ["莉莉", "阿狼"]
        assert sent["passage"] == "That night Lily let a lantern fly over the lake."
        assert fake.requests[0]["response_format"] == {"type": "json_object"}
        story = await service.handler("story").active("web:r")
        plan = story.scenes[0].plan
        assert plan.planner == "llm" and plan.characters == ("莉莉",)
        assert story.continuity.location == "湖边"
    finally:
        await service.stop()


@pytest.mark.parametrize(
    "content",
    [
        "not json at all",
        json.dumps(["a", "list"]),
        json.dumps({"characters": ["莉莉"], "action": "no chinese here"}),
        json.dumps({"characters": "莉莉", "action": "莉莉跑"}),
        json.dumps({"characters": [], "action": "莉莉跑", "location": "x" * 500}),
    ],
)
async def test_a_malformed_plan_falls_back_to_the_offline_planner(tmp_path, fake_llm, content):
    fake, url = fake_llm
    fake.reply = content
    service = await _story_service(tmp_path, url)
    try:
        reply = await _illustrate(service, "清晨，莉莉走进了森林。")
        assert reply.jobs, reply.texts
        story = await service.handler("story").active("web:r")
        plan = story.scenes[0].plan
        assert plan.planner == "offline" and plan.characters == ("莉莉",)
        assert any("offline" in note for note in plan.notes)
        assert "穿红斗篷的小女孩" in reply.jobs[0].request.prompt
    finally:
        await service.stop()


async def test_an_unreachable_planner_falls_back(tmp_path, fake_llm):
    fake, url = fake_llm
    fake.mode = "500"
    service = await _story_service(tmp_path, url)
    try:
        reply = await _illustrate(service, "夜里，阿狼在山顶上唱歌。")
        assert reply.jobs and "一只灰色的大狼" in reply.jobs[0].request.prompt
    finally:
        await service.stop()


async def test_the_llm_plan_is_moderated_again(tmp_path, fake_llm, caplog):
    fake, url = fake_llm
    fake.reply = json.dumps({"characters": [], "action": "儿童色情"}, ensure_ascii=False)
    service = await _story_service(tmp_path, url)
    try:
        reply = await _illustrate(service, "A harmless passage about a walk.")
        assert reply.jobs == () and len(reply.texts) == 1
        assert "儿童色情" not in reply.texts[0]
        assert "sk-planner-key" not in caplog.text
    finally:
        await service.stop()
