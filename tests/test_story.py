"""Story-thread illustration: scene planning tables, continuity, panels, re-render and the storybook."""

from __future__ import annotations

import asyncio
import io
import re
from dataclasses import replace

import pytest
from pypdf import PdfReader

from core.app import build_scene_planner
from core.prompting import load_prompt_builder
from core.service import MessageContext
from core.story.export import find_cjk_font
from core.story.model import CastMember, Continuity, Story, story_from_dict, story_to_dict
from core.story.planner import next_continuity
from core.types import Action, EventType
from tests.support import PatternEngine, make_service, make_settings

LILY = CastMember("莉莉", "穿红斗篷的小女孩", 7919)
WOLF = CastMember("Wolf", "大灰狼", 15838)


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("planner"))
    return build_scene_planner(settings, load_prompt_builder(settings))


def _story(**changes) -> Story:
    base = Story(
        id="s1",
        chat="web:r",
        title="t",
        style=None,
        base_seed=100,
        created_by="web:a",
        created_at=0.0,
        cast=(LILY, WOLF),
    )
    return replace(base, **changes)


@pytest.mark.parametrize(
    ("excerpt", "characters", "location", "time_of_day", "mood"),
    [
        ("清晨，莉莉走进了森林。", ("莉莉",), "森林", "清晨", None),
        ("夜里，Wolf 在城堡外面哭了。", ("Wolf",), "古老的城堡", "夜晚", "忧伤的气氛"),
        ("莉莉和Wolf在海边开心地跳舞", ("莉莉", "Wolf"), "海边", None, "欢乐的气氛"),
        ("At night the wolf walked into the forest.", ("Wolf",), "森林", "夜晚", None),
        ("Wolf was happy in the garden", ("Wolf",), "花园", None, "欢乐的气氛"),
        ("雪白的兔子在跑", (), None, None, None),
    ],
)
async def test_planning_table(planner, excerpt, characters, location, time_of_day, mood):
    plan = await planner.plan(excerpt, _story())
    assert plan.characters == characters
    assert plan.location == location
    assert plan.time_of_day == time_of_day
    assert plan.mood == mood


async def test_cast_descriptions_replace_names_in_the_prompt(planner):
    story = _story()
    plan = await planner.plan("莉莉看见了Wolf。", story)
    prompt, cut = planner.compose(plan, story)
    assert LILY.description in prompt and WOLF.description in prompt
    assert "莉莉" not in prompt and "Wolf" not in prompt
    assert cut == ()


async def test_pronouns_resolve_to_the_last_named_character(planner):
    story = _story(continuity=Continuity(last_character="莉莉"))
    plan = await planner.plan("她害怕地跑了起来。", story)
    assert plan.characters == ("莉莉",)
    prompt, _ = planner.compose(plan, story)
    assert prompt.startswith(LILY.description)
    unnamed = await planner.plan("天空下起了雨。", story)
    assert unnamed.characters == ()


async def test_budget_cuts_style_before_the_story(planner):
    long_cast = replace(LILY, description="穿着红色斗篷戴着金色王冠拿着魔法书的非常非常勇敢的小女孩" * 2)
    story = _story(style="水墨画", cast=(long_cast, WOLF))
    plan = await planner.plan("清晨，莉莉在雪山顶上的古老城堡里读一本会发光的魔法书。她很开心。", story)
    prompt, cut = planner.compose(plan, story)
    assert planner.tokenizer.exact  # the tiny engine's own WordPiece vocabulary, not an estimate
    assert planner.tokenizer.count(prompt) <= 75
    assert long_cast.description in prompt
    style_tags = planner.styles.get("水墨画").tags
    assert any(tag in cut for tag in style_tags), cut
    assert not any(tag in prompt for tag in style_tags if tag in cut)


async def test_continuity_over_five_excerpts(planner):
    story = _story()
    excerpts = [
        "黄昏，莉莉来到了村庄。",  # place and time set
        "她敲开了一扇门。",  # both carry over, pronoun -> 莉莉
        "Wolf 在门后笑了。",  # carry over, new character
        "第二天清晨，莉莉走进了森林。",  # place and time change
        "天空下起了雪。",  # place carries, season appears
    ]
    seen = []
    for excerpt in excerpts:
        plan = await planner.plan(excerpt, story)
        seen.append((plan.characters, plan.location, plan.time_of_day, plan.season))
        story = replace(story, continuity=next_continuity(plan, story.continuity))
    assert seen == [
        (("莉莉",), "宁静的村庄", "黄昏", None),
        (("莉莉",), "宁静的村庄", "黄昏", None),
        (("Wolf",), "宁静的村庄", "黄昏", None),
        (("莉莉",), "森林", "清晨", None),
        ((), "森林", "清晨", "冬天，白雪"),
    ]


def test_story_document_round_trips():
    story = _story(excerpts=("a",), continuity=Continuity("森林", "夜晚", None, "莉莉"))
    assert story_from_dict(story_to_dict(story)) == story


async def _drain(service, jobs):
    for job in jobs:
        events = [event async for event in service.subscribe(job.id)]
        assert events[-1].type == EventType.DONE


async def _say(service, text, user="web:ann", chat="web:room", **context):
    return await service.handle_message(chat, user, text, MessageContext(**context))


async def test_a_story_from_commands_to_storybook(tmp_path):
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        assert "/story new" in (await _say(service, "/story add 太早了")).texts[0]
        assert "Started" in (await _say(service, "/story new 月亮的故事 --style 儿童绘本")).texts[0]
        assert "already has a story" in (await _say(service, "/story new 另一个")).texts[0]
        assert "莉莉" in (await _say(service, "/cast add 莉莉: 穿红斗篷的小女孩")).texts[0]
        assert "/cast add" in (await _say(service, "/cast add 没有冒号")).texts[0]
        for excerpt in ("清晨，莉莉走进了森林。", "她看见一只会说话的狐狸。", "莉莉 was happy at night."):
            await _say(service, f"/story add {excerpt}")
        reply = await _say(service, "/illustrate 3")
        assert len(reply.jobs) == 1  # the three panels are drawn together, as one batch
        assert reply.texts[0].count("🖼 Panel") == 3 and "Panels 1–3 are drawn together" in reply.texts[0]
        await _drain(service, reply.jobs)
        prompts = reply.jobs[0].request.panels
        assert len(prompts) == 3 and reply.jobs[0].request.n == 3
        assert all("穿红斗篷的小女孩" in prompt for prompt in prompts)
        assert all("儿童绘本" in prompt for prompt in prompts)
        assert "locked" in (await _say(service, "/story style 油画")).texts[0]

        book = service.handler("story")
        story = await book.active("web:room")
        assert [scene.index for scene in story.scenes] == [1, 2, 3]
        assert [scene.own_request.prompt for scene in story.scenes] == list(prompts)
        base = story.scenes[0].request.seed
        assert [scene.own_request.seed for scene in story.scenes] == [base, base + 1, base + 2]

        reroll = await service.act(reply.jobs[0].id, Action.REROLL, 0, "web:bob")
        await _drain(service, [reroll])
        await service.events.drain()
        story = await book.active("web:room")
        assert all(scene.job_ids == (reply.jobs[0].id, reroll.id) for scene in story.scenes)
        assert "picture 2" in (await _say(service, "/story choose 1 2")).texts[0]
        story = await book.active("web:room")
        assert story.scenes[0].chosen == (reroll.id, 0)
        reroll_job = await service.get_job(reroll.id)
        assert await book.panel_image(story.scenes[0]) == reroll_job.images[0]

        shown = await _say(service, "/story show")
        assert [name for name, _ in shown.attachments] == ["panel-1.png", "panel-2.png", "panel-3.png"]

        exported = await _say(service, "/story export")
        files = dict(exported.attachments)
        html = files["月亮的故事.html"].decode()
        assert len(re.findall(r"<img ", html)) == 3
        assert "她看见一只会说话的狐狸。" in html and "穿红斗篷的小女孩" in html
        if find_cjk_font() is not None:
            pdf = PdfReader(io.BytesIO(files["月亮的故事.pdf"]))
            assert len(pdf.pages) == 1 + 3 + 1

        assert "Only the person" in (await _say(service, "/story end", user="web:bob")).texts[0]
        forced = await _say(service, "/story end --force", user="web:bob", is_admin=False)
        assert "Only the person" in forced.texts[0]
        assert "finished" in (await _say(service, "/story end")).texts[0]
        assert (await book.active("web:room")) is None
    finally:
        await service.stop()


async def test_auto_mode_turns_messages_into_excerpts(tmp_path):
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        await _say(service, "/story new 日记")
        assert (await _say(service, "普通聊天")).texts == ()
        await _say(service, "/story auto on")
        assert (await _say(service, "莉莉在花园里浇花。", user="web:bob")).texts == ()
        story = await service.handler("story").active("web:room")
        assert story.excerpts == ("莉莉在花园里浇花。",)
        reply = await _say(service, "/illustrate", reply_to_text="月亮升起来了。")
        assert reply.jobs[0].source_text == "月亮升起来了。"
    finally:
        await service.stop()


async def test_blocked_excerpts_are_refused(tmp_path):
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        await _say(service, "/story new 测试")
        reply = await _say(service, "/story add 儿童色情")
        assert reply.jobs == () and "儿童色情" not in reply.texts[0]
        story = await service.handler("story").active("web:room")
        assert story.excerpts == ()
    finally:
        await service.stop()


@pytest.mark.slow
async def test_rerendering_a_panel_reproduces_it_exactly(tmp_path):
    service = await make_service(tmp_path, engine_name="tiny")
    try:
        await _say(service, "/story new 重画")
        await _say(service, "/story add 一只猫坐在月亮上。")
        first = (await _say(service, "/illustrate")).jobs[0]
        await _drain(service, [first])
        again = (await _say(service, "/story rerender 1")).jobs[0]
        await _drain(service, [again])
        first_done, again_done = await service.get_job(first.id), await service.get_job(again.id)
        assert again_done.request == first_done.request
        assert again_done.images == first_done.images  # content-addressed: identical pixels
    finally:
        await service.stop()


async def test_concurrent_passages_are_all_kept(tmp_path):
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        await _say(service, "/story new 接龙")
        texts = [f"第{i}段：莉莉走了{i}步。" for i in range(20)]
        await asyncio.gather(
            *(_say(service, f"/story add {text}", user=f"web:u{i}") for i, text in enumerate(texts))
        )
        story = await service.handler("story").active("web:room")
        assert sorted(story.excerpts) == sorted(texts)
    finally:
        await service.stop()
