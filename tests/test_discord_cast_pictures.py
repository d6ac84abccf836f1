"""Cast reference pictures through Discord: `/cast add` with an attachment option, read by discord.py
from the fake server's CDN; `/cast show` answers with the reference."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from core.images import MAX_UPLOAD_BYTES
from core.story.model import Story
from tests.fake_discord import FakeDiscord
from tests.support import PatternEngine, jpeg_picture, png_claiming
from tests.test_discord_bot import (
    CHANNEL,
    Env,
    _interaction,
    answer_text,
    dispatch,
    followups,
    slash,
    start_bot,
    stop_bot,
)

pytestmark = [pytest.mark.timeout(60)]


@pytest.fixture
async def env(tmp_path: Path, api: FakeDiscord) -> AsyncIterator[Env]:
    env = await start_bot(tmp_path, api, PatternEngine())
    yield env
    await stop_bot(env)


def cast_add(env: Env, attachment: dict[str, Any] | None, **options: str) -> dict[str, Any]:
    """`/cast add` with string options and, when given, `attachment` as its picture option."""
    given: list[dict[str, Any]] = [{"name": k, "type": 3, "value": v} for k, v in options.items()]
    data: dict[str, Any] = {"id": "4300000000000000009", "name": "cast", "type": 1}
    if attachment is not None:
        given.append({"name": "picture", "type": 11, "value": attachment["id"]})
        data["resolved"] = {"attachments": {attachment["id"]: attachment}}
    data["options"] = [{"name": "add", "type": 1, "options": given}]
    return dispatch(env, _interaction(2, data))


async def active_story(env: Env) -> Story:
    book = env.service.handler("story")
    story = await book.active(f"dc:{CHANNEL}")  # type: ignore[union-attr]
    assert story is not None
    return story


async def test_a_picture_option_becomes_the_reference_and_cast_show_shows_it(env: Env) -> None:
    await answer_text(env.api, slash(env, "story", sub="new", title="狐狸与月亮"))
    photo = jpeg_picture((20, 40, 220), (300, 200))
    upload = env.api.attachment("lili.jpg", photo, "image/jpeg")
    added = cast_add(env, upload, name="莉莉", description="穿红斗篷的小女孩")
    answer = await answer_text(env.api, added)
    assert "Cast: 莉莉 — 穿红斗篷的小女孩" in answer and "莉莉's reference picture is set" in answer
    assert env.api.cdn_reads == [upload["url"].split("/cdn/")[1]]
    member = (await active_story(env)).member("莉莉")
    assert member is not None and member.reference is not None and member.reference_from == "picture"
    reference = await env.service.image(member.reference)
    with Image.open(io.BytesIO(reference)) as image:
        assert image.size == (300, 200) and image.convert("RGB").getpixel((150, 100))[2] > 180

    shown = slash(env, "cast", sub="show", name="莉莉")
    assert "Reference: the picture you gave" in await answer_text(env.api, shown)
    (files,) = await env.api.wait_for(lambda: followups(env.api, shown))
    assert [part.data for part in files.files] == [reference]

    again = env.api.attachment("lili2.png", jpeg_picture((200, 200, 20)), None)
    replaced = await answer_text(env.api, cast_add(env, again, name="莉莉"))
    assert replaced.startswith("📌 莉莉's reference picture is set")
    assert (await active_story(env)).member("莉莉").reference != member.reference  # type: ignore[union-attr]


async def test_too_large_bomb_and_non_image_are_refused_in_one_sentence(env: Env) -> None:
    await answer_text(env.api, slash(env, "story", sub="new", title="炸弹"))
    huge = env.api.attachment("huge.jpg", jpeg_picture(), "image/jpeg", size=MAX_UPLOAD_BYTES + 1)
    answer = await answer_text(env.api, cast_add(env, huge, name="莉莉", description="小女孩"))
    assert answer == "The image is too large: at most 20 MB, please."
    assert env.api.cdn_reads == []  # refused from the size Discord reports, never downloaded

    bomb = env.api.attachment("bomb.png", png_claiming(9_400, 9_400), "image/png")
    answer = await answer_text(env.api, cast_add(env, bomb, name="莉莉", description="小女孩"))
    assert answer == "The image is too large: at most 4096×4096 pixels, please."

    text = env.api.attachment("notes.txt", b"just some words", "text/plain")
    answer = await answer_text(env.api, cast_add(env, text, name="莉莉", description="小女孩"))
    assert "not a picture" in answer

    disguised = env.api.attachment("fake.png", b"<html>not a picture</html>", "image/png")
    answer = await answer_text(env.api, cast_add(env, disguised, name="莉莉", description="小女孩"))
    assert "not an image" in answer
    assert (await active_story(env)).cast == ()


async def test_without_a_picture_the_description_is_still_needed(env: Env) -> None:
    await answer_text(env.api, slash(env, "story", sub="new", title="月亮"))
    answer = await answer_text(env.api, cast_add(env, None, name="莉莉"))
    assert "/cast add <name>: <description>" in answer
    assert env.api.cdn_reads == []
