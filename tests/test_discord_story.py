"""The story feature on Discord, end to end: real discord.py, command tree and service (PatternEngine),
a fake Discord REST server on loopback."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bots.discord import build_client
from bots.discord.replies import attachment_files
from bots.discord.target import Target
from bots.discord.views import custom_id
from core.service import Huahua, MessageContext, Reply
from core.story.book import StoryBook
from core.types import Action, ImagineOptions, JobKind, JobStatus
from tests.fake_discord import APP_ID, VALID_TOKEN, FakeDiscord, message_payload
from tests.support import PatternEngine, make_service, make_settings
from tests.test_discord_bot import (
    ALICE,
    BOB,
    CHANNEL,
    GALLERY,
    GUILD,
    MANAGE_GUILD,
    MEMBER_PERMS,
    Env,
    _interaction,
    answer_text,
    callbacks,
    channel_posts,
    dispatch,
    edits,
    followups,
    job_id_in,
    press,
    slash,
    start_bot,
    stop_bot,
)

pytestmark = [pytest.mark.timeout(60)]

CHAT = f"dc:{CHANNEL}"
EXCERPTS = (
    "莉莉 walks through the snowy forest at night.",
    "莉莉 finds a small red fox under the full moon.",
)


@pytest.fixture
async def env(tmp_path: Path, api: FakeDiscord) -> AsyncIterator[Env]:
    env = await start_bot(tmp_path, api, PatternEngine())
    yield env
    await stop_bot(env)


def book_of(env: Env) -> StoryBook:
    book = env.service.handler("story")
    assert isinstance(book, StoryBook)
    return book


async def set_gallery(env: Env) -> None:
    resolved = {
        "channels": {str(GALLERY): {"id": str(GALLERY), "type": 0, "name": "gallery", "permissions": "0"}}
    }
    setup = slash(
        env, "settings", permissions=MEMBER_PERMS | MANAGE_GUILD, gallery=str(GALLERY), resolved=resolved
    )
    assert "Saved" in await answer_text(env.api, setup)


async def start_story(env: Env) -> None:
    started = slash(env, "story", sub="new", title="狐狸与月亮")
    assert "狐狸与月亮" in await answer_text(env.api, started)
    cast = slash(env, "cast", sub="add", name="莉莉", description="a little girl in a red cloak")
    assert "莉莉" in await answer_text(env.api, cast)
    for excerpt in EXCERPTS:
        added = slash(env, "story", sub="add", excerpt=excerpt)
        assert "Added passage" in await answer_text(env.api, added)


def files_by_suffix(call: Any) -> dict[str, bytes]:
    return {part.filename.rsplit(".", 1)[1]: part.data for part in call.files}


# tests ----------------------------------------------------------------------------------------


async def test_a_whole_story_through_discord(env: Env) -> None:
    await set_gallery(env)
    await start_story(env)
    (story,) = [await book_of(env).active(CHAT)]
    assert story is not None and [m.name for m in story.cast] == ["莉莉"] and story.excerpts == EXCERPTS

    drawn = slash(env, "illustrate", count=2)
    (result,) = await env.api.wait_for(lambda: followups(env.api, drawn))  # two panels, one batch
    assert "flags" not in (callbacks(env.api, drawn)[0].json.get("data") or {})  # a public answer
    answer = edits(env.api, drawn)
    assert "Panel 1" in answer[0].json["content"] and "Panel 2" in answer[0].json["content"]
    assert answer[0].at <= result.at  # the answer first, then the pictures
    batch = await env.service.get_job(job_id_in(result))
    assert batch.kind == JobKind.SCENE and batch.status == JobStatus.DONE
    assert batch.meta["story_scene"] == "1" and len(batch.request.panels) == 2
    assert [f.data for f in result.files] == [await env.service.image(d) for d in batch.images]
    assert {custom_id(Action.CHOOSE, i, batch.id) for i in (0, 1)} <= set(result.custom_ids())

    reroll = press(env, custom_id(Action.REROLL, 0, batch.id), source=result, user=BOB)
    (rerolled,) = await env.api.wait_for(lambda: followups(env.api, reroll))
    variant = await env.service.get_job(job_id_in(rerolled))
    assert variant.kind == JobKind.REROLL and variant.meta["story_scene"] == "1"
    assert variant.request.panels == batch.request.panels  # the batch again, with a new seed
    assert Target.from_meta(variant.meta) is not None  # routed from creation, so it survives a restart
    assert custom_id(Action.CHOOSE, 1, variant.id) in rerolled.custom_ids()
    before = await env.service.image(variant.images[0])
    assert before != result.files[0].data  # another seed, another picture

    star = press(env, custom_id(Action.CHOOSE, 0, variant.id), source=rerolled, user=BOB)
    assert "⭐ Panel 1 now uses this picture." in await answer_text(env.api, star)
    assert callbacks(env.api, star)[0].json["data"]["flags"] == 64  # ephemeral
    story = await book_of(env).active(CHAT)
    assert story is not None and story.scene(1) is not None
    assert story.scene(1).chosen == (variant.id, 0)  # type: ignore[union-attr]
    assert story.scene(2).chosen is None  # type: ignore[union-attr]

    shown = slash(env, "story", sub="show")
    (panels,) = await env.api.wait_for(lambda: followups(env.api, shown))
    assert [p.filename for p in panels.files] == ["panel-1.png", "panel-2.png"]
    assert panels.files[0].data == before

    exported = slash(env, "story", sub="export")
    (book,) = await env.api.wait_for(lambda: followups(env.api, exported))
    files = files_by_suffix(book)
    assert set(files) == {"html", "pdf"} and len(book.files) == 2
    html = files["html"].decode("utf-8")
    assert html.count("<img") == 2 and base64.b64encode(before).decode() in html
    assert files["pdf"].startswith(b"%PDF")

    stranger = slash(env, "share", sub="story", user=BOB)
    assert "Only the person who started" in await answer_text(env.api, stranger)
    shared = slash(env, "share", sub="story")
    assert f"<#{GALLERY}>" in await answer_text(env.api, shared)
    (post,) = channel_posts(env.api, GALLERY)
    names = [p.filename for p in post.files]
    assert names[0].endswith(".html") and names[1].endswith(".pdf")
    assert names[2:] == ["panel-1.png", "panel-2.png"] and post.files[2].data == before
    assert "狐狸与月亮" in post.json["content"] and f"<@{ALICE}>" in post.json["content"]


async def test_typed_story_commands_are_synced(env: Env) -> None:
    (sync,) = env.api.find("PUT", rf"/applications/{APP_ID}/guilds/\d+/commands")
    commands = {c["name"]: c for c in sync.json}
    story = {o["name"]: o for o in commands["story"]["options"]}
    assert set(story) >= {"new", "add", "show", "style", "auto", "choose", "export", "end"}
    assert all(o["type"] == 1 for o in story.values())
    new = {o["name"]: o for o in story["new"]["options"]}
    assert new["title"]["required"] and not new["style"]["required"] and new["style"]["autocomplete"]
    assert [c["value"] for c in story["auto"]["options"][0]["choices"]] == ["on", "off"]
    assert [o["type"] for o in story["choose"]["options"]] == [4, 4]
    cast = {o["name"]: o for o in commands["cast"]["options"]}
    assert set(cast) == {"add", "list", "remove", "show"}
    add = cast["add"]["options"]
    assert [(o["name"], o["type"], o.get("required", False)) for o in add] == [
        ("name", 3, True),
        ("description", 3, False),
        ("picture", 11, False),
    ]
    (count,) = commands["illustrate"]["options"]
    assert (count["name"], count["type"], count["min_value"], count["max_value"]) == ("count", 4, 1, 4)
    assert {o["name"] for o in commands["share"]["options"]} == {"picture", "story"}
    assert commands["Illustrate"]["type"] == 3  # the message menu


async def test_illustrate_a_message_from_its_menu(env: Env) -> None:
    started = slash(env, "story", sub="new", title="The Night Walk")
    await answer_text(env.api, started)
    text = "A lantern swings in the wind on an empty bridge."
    message = message_payload({"content": text}, channel_id=CHANNEL, parts=())
    data = {
        "id": "4300000000000000002",
        "name": "Illustrate",
        "type": 3,
        "target_id": message["id"],
        "resolved": {"messages": {message["id"]: message}},
    }
    sent = dispatch(env, _interaction(2, data))
    (result,) = await env.api.wait_for(lambda: followups(env.api, sent))
    job = await env.service.get_job(job_id_in(result))
    assert job.kind == JobKind.SCENE and job.source_text == text
    story = await book_of(env).active(CHAT)
    assert story is not None and story.excerpts == (text,)


async def test_story_mistakes_get_one_sentence(env: Env) -> None:
    none_yet = slash(env, "story", sub="add", excerpt="Once upon a time")
    assert "no story" in (await answer_text(env.api, none_yet)).lower()
    colon = slash(env, "cast", sub="add", name="A: B", description="someone")
    assert "colon" in await answer_text(env.api, colon)
    assert callbacks(env.api, colon)[0].json["data"]["flags"] == 64

    started = slash(env, "story", sub="new", title="Mine")
    await answer_text(env.api, started)
    empty = slash(env, "illustrate")
    assert "passage first" in await answer_text(env.api, empty)
    forced = slash(env, "story", sub="end", force=True, user=BOB)
    assert "Manage Server" in await answer_text(env.api, forced)
    not_mine = slash(env, "story", sub="end", user=BOB)
    assert "Only the person" in await answer_text(env.api, not_mine)
    admin = slash(env, "story", sub="end", force=True, user=BOB, permissions=MEMBER_PERMS | MANAGE_GUILD)
    assert "finished" in await answer_text(env.api, admin)
    assert await book_of(env).active(CHAT) is None
    assert not env.engine.requests


async def test_share_story_needs_panels_and_a_gallery(env: Env) -> None:
    no_story = slash(env, "share", sub="story")
    assert "no story" in (await answer_text(env.api, no_story)).lower()
    await start_story(env)
    no_panels = slash(env, "share", sub="story")
    assert "no finished panels" in await answer_text(env.api, no_panels)
    drawn = slash(env, "illustrate")
    await env.api.wait_for(lambda: followups(env.api, drawn))
    no_gallery = slash(env, "share", sub="story")
    assert "no gallery channel" in await answer_text(env.api, no_gallery)
    await set_gallery(env)
    env.api.forbidden_channels.add(GALLERY)
    refused = slash(env, "share", sub="story")
    assert "may not post" in await answer_text(env.api, refused)


def test_attachments_over_the_limit_become_notes() -> None:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 80).convert("RGB").save(buffer, format="PNG")
    png = buffer.getvalue()
    files, notes = attachment_files([("book.html", b"x" * 5000), ("panel-1.png", png)], 4000)
    assert [f.filename for f in files] == ["panel-1.jpg"] and len(files[0].fp.read()) <= 4000
    assert len(notes) == 1 and "book.html is too large" in notes[0]
    files, notes = attachment_files([("panel-1.png", png)], 10)
    assert not files and "panel-1.png is too large" in notes[0]


async def test_pictures_wait_for_the_commands_answer(env: Env) -> None:
    """After a deferred response Discord turns the first follow-up into the answer, so while a command
    answers, the results of the jobs it started are held back."""
    sent = slash(env, "help")
    await answer_text(env.api, sent)
    token = "held-interaction-token"
    target = Target(channel_id=CHANNEL, application_id=APP_ID, token=token, expires_at=time.time() + 600)
    target = dataclasses.replace(target, edit_status=False)
    options = ImagineOptions(text="a held kite")
    async with env.client.delivery.answering(token):
        job = await env.service.imagine(CHAT, f"dc:{ALICE}", options, meta=target.to_meta())
        await wait_until_done(env, job.id)
        await asyncio.sleep(0.2)
        assert not env.api.find("POST", rf"/webhooks/{APP_ID}/{token}")
    (result,) = await env.api.wait_for(lambda: env.api.find("POST", rf"/webhooks/{APP_ID}/{token}"))
    assert job_id_in(result) == job.id


async def wait_until_done(env: Env, job_id: str) -> None:
    async for event in env.service.subscribe(job_id):
        if event.type.final:
            return


class Doodle:
    """A plug-in command that, unlike the story book, ignores MessageContext.meta for its jobs."""

    commands = ("doodle",)
    description = "Doodle something"

    def __init__(self, service: Huahua) -> None:
        self.service = service

    async def handle(self, chat: str, user: str, command: str, args: str, context: MessageContext) -> Reply:
        job = await self.service.imagine(chat, user, ImagineOptions(text=args or "a doodle"))
        return Reply(texts=("doodling",), jobs=(job,), attachments=(("notes.txt", b"hello"),))


async def test_a_plugin_reply_is_delivered_even_without_our_meta(tmp_path: Path, api: FakeDiscord) -> None:
    service = await make_service(tmp_path, PatternEngine())
    service.register(Doodle(service))
    client = build_client(service, make_settings(tmp_path, discord_guild_id=GUILD), edit_interval=0.0)
    await client.login(VALID_TOKEN)
    env = Env(api, service, client, PatternEngine())
    try:
        sent = slash(env, "doodle", text="a spiral")
        assert await answer_text(api, sent) == "doodling"
        calls = await api.wait_for(lambda: len(followups(api, sent)) == 2 and followups(api, sent))
        notes, result = sorted(calls, key=lambda c: bool(c.custom_ids()))
        assert [p.data for p in notes.files] == [b"hello"]
        job = await service.get_job(job_id_in(result))
        assert result.files[0].data == await service.image(job.images[0])
        assert Target.from_meta(job.meta) is not None  # kept on the job for a restart
    finally:
        await stop_bot(env)
