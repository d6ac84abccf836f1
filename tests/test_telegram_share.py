"""Sharing to a gallery channel: the real Telegram Application and service against the fake Bot API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import NO_TELEGRAM

pytest.importorskip("telegram", reason=NO_TELEGRAM)

from bots.telegram import keyboards
from bots.telegram.delivery import META_RESULT
from bots.telegram.gallery import Sharer
from core.types import Action, JobStatus
from tests.fake_telegram import Call, FakeTelegram
from tests.support import until
from tests.test_telegram_bot import button_data, buttons, running, sent_message

USER = 3001
OTHER = 3002
ADMIN = 3003
GROUP = -100888
GALLERY = -100999
CHANNEL = "@my_gallery"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram()
    server.admins.add((GROUP, ADMIN))
    await server.start()
    yield server
    await server.stop()


async def say(fake: FakeTelegram, chat_id: int, user_id: int, text: str, **kwargs: Any) -> str:
    """`user_id` writes `text` in `chat_id`; returns the bot's next text message there."""
    before = len(fake.calls_of("sendMessage", chat_id=chat_id))
    fake.send_text(chat_id, user_id, text, **kwargs)
    return str((await fake.wait_for("sendMessage", before + 1, chat_id=chat_id))[before].params["text"])


async def draw(fake: FakeTelegram, chat_id: int, user_id: int, text: str) -> Call:
    """`user_id` asks for a picture; returns the bot's sendPhoto of the result."""
    before = len(fake.calls_of("sendPhoto", chat_id=chat_id))
    fake.send_text(chat_id, user_id, f"/imagine {text}")
    return (await fake.wait_for("sendPhoto", before + 1, chat_id=chat_id))[before]


def job_of(photo: Call) -> str:
    press = keyboards.decode(button_data(photo, "🔄"))
    assert press is not None
    return press.job_id


async def test_share_posts_the_senders_latest_result_with_caption_and_credit(
    tmp_path: Path, fake: FakeTelegram
) -> None:
    async with running(tmp_path, fake):
        menu = (await fake.wait_for("setMyCommands"))[0].params["commands"]
        assert "share" in [c["command"] for c in menu]
        assert "admins" in await say(fake, GROUP, USER, f"/settings gallery {GALLERY}")
        assert (await say(fake, GROUP, ADMIN, f"/settings gallery {GALLERY}")).startswith("Saved")

        mine = await draw(fake, GROUP, USER, "一只猫 --seed 7")
        theirs = await draw(fake, GROUP, OTHER, "一只狗 --seed 8")
        assert "↗️ Share" in buttons(mine) and "↗️ Share" in buttons(theirs)

        answer = await say(fake, GROUP, USER, "/share")
        assert answer == f"↗️ Shared to {GALLERY}."
        shared = (await fake.wait_for("sendPhoto", chat_id=GALLERY))[0]
    assert shared.files["photo"] == mine.files["photo"]
    caption = shared.params["caption"]
    assert caption.startswith(mine.params["caption"])
    assert "提示词: 一只猫" in caption and "seed 7" in caption
    assert caption.endswith("↗️ shared by Alice from Test group")
    assert "reply_markup" not in shared.params and "reply_parameters" not in shared.params
    assert len(fake.calls_of("sendPhoto", chat_id=GALLERY)) == 1


async def test_share_as_a_reply_posts_that_picture(tmp_path: Path, fake: FakeTelegram) -> None:
    fake.channels[CHANNEL] = GALLERY
    async with running(tmp_path, fake) as service:
        await say(fake, GROUP, ADMIN, f"/settings gallery {CHANNEL}")
        first = await draw(fake, GROUP, USER, "一只猫")
        second = await draw(fake, GROUP, USER, "一只狗")
        first_message, second_message = sent_message(fake, first), sent_message(fake, second)

        assert await say(fake, GROUP, USER, "/share", reply_to=first_message) == f"↗️ Shared to {CHANNEL}."
        by_buttons = (await fake.wait_for("sendPhoto", chat_id=CHANNEL))[0]
        assert by_buttons.files["photo"] == first.files["photo"] != second.files["photo"]

        async def result_id_kept() -> bool:
            job = await service.get_job(job_of(second))
            return job.meta.get(META_RESULT) == str(second_message["message_id"])

        await until(result_id_kept)
        bare = {k: v for k, v in second_message.items() if k != "reply_markup"}
        await say(fake, GROUP, USER, "/share", reply_to=bare)
        by_meta = (await fake.wait_for("sendPhoto", 2, chat_id=CHANNEL))[1]
        assert by_meta.files["photo"] == second.files["photo"]

        chatter = fake.send_text(GROUP, OTHER, "nice pictures")
        assert "Reply with /share to one of my pictures" in await say(
            fake, GROUP, USER, "/share", reply_to=chatter
        )
        assert "Only the person" in await say(fake, GROUP, OTHER, "/share", reply_to=first_message)
        assert "Shared" in await say(fake, GROUP, ADMIN, "/share", reply_to=first_message)
        await fake.wait_for("sendPhoto", 3, chat_id=CHANNEL)


async def test_share_button_posts_the_picture(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake):
        await say(fake, GROUP, ADMIN, f"/settings gallery {GALLERY}")
        photo = await draw(fake, GROUP, USER, "一只猫")
        message = sent_message(fake, photo)
        share = button_data(photo, "↗️ Share")
        assert keyboards.decode(share) == keyboards.ButtonPress(keyboards.SHARE, 0, job_of(photo))

        fake.press(GROUP, OTHER, message, share)
        refused = (await fake.wait_for("answerCallbackQuery"))[0].params
        assert refused["show_alert"] is True and "Only the person who asked" in refused["text"]
        assert not fake.calls_of("sendPhoto", chat_id=GALLERY)

        fake.press(GROUP, USER, message, share)
        answer = (await fake.wait_for("answerCallbackQuery", 2))[1].params
        assert answer["text"] == f"↗️ Shared to {GALLERY}." and not answer.get("show_alert")
        shared = (await fake.wait_for("sendPhoto", chat_id=GALLERY))[0]
    assert shared.files["photo"] == photo.files["photo"]
    assert shared.params["caption"].endswith("shared by Alice from Test group")


async def test_share_story_posts_the_album_then_html_and_pdf(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake) as service:
        await say(fake, USER, USER, f"/settings gallery {GALLERY}")
        await say(fake, USER, USER, "/story new 小红帽")
        await say(fake, USER, USER, "/story add 莉莉走进森林")
        await say(fake, USER, USER, "/story add 莉莉在河边看月亮")
        fake.send_text(USER, USER, "/illustrate 2")
        [photo] = await fake.wait_for("sendPhoto", 1, chat_id=USER)  # the two panels, drawn as one batch
        assert "↗️ Share" in buttons(photo)

        answer = await say(fake, USER, USER, "/share story")
        assert answer == f"📚 Shared “小红帽” to {GALLERY}: 2 panels, HTML and PDF."
        album = (await fake.wait_for("sendMediaGroup", chat_id=GALLERY))[0]
        html_call, pdf_call = await fake.wait_for("sendDocument", 2, chat_id=GALLERY)
        story = await service.handler("story").active(f"tg:{USER}")  # type: ignore[union-attr]
        assert story is not None and story.active
        batch = await service.get_job(story.scenes[0].job_ids[0])
        panels = [await service.image(digest) for digest in batch.images]
    media = album.params["media"]
    assert len(media) == 2 and all(m["type"] == "photo" for m in media)
    assert media[0]["caption"] == "📚 “小红帽” — 2 panels, shared by Alice from a private chat"
    assert "caption" not in media[1]
    assert sorted(album.files.values()) == sorted(panels)  # each panel, not the chat's grid of both
    sent = [c.method for c in fake.calls if str(c.params.get("chat_id")) == str(GALLERY)]
    assert sent == ["sendMediaGroup", "sendDocument", "sendDocument"]
    html = html_call.files["document"]
    assert html.count(b"<img") == 2 and "小红帽" in html.decode()
    assert pdf_call.files["document"].startswith(b"%PDF")
    assert (html_call.filenames["document"], pdf_call.filenames["document"]) == ("小红帽.html", "小红帽.pdf")


async def test_only_the_storys_creator_or_an_admin_may_share_it(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake):
        await say(fake, GROUP, ADMIN, f"/settings gallery {GALLERY}")
        assert "no story" in await say(fake, GROUP, USER, "/share story")
        await say(fake, GROUP, USER, "/story new 雪夜")
        await say(fake, GROUP, USER, "/story add 莉莉在雪地里堆雪人")
        refused = await say(fake, GROUP, OTHER, "/share story")
        assert refused == "Only the person who started the story, or an admin, can share it."
        assert "no finished panels" in await say(fake, GROUP, ADMIN, "/share story")
        assert "no finished panels" in await say(fake, GROUP, USER, "/share@huahua_bot story")
        await asyncio.sleep(0.2)
    assert not [c for c in fake.calls if str(c.params.get("chat_id")) == str(GALLERY)]


async def test_without_a_gallery_share_says_how_to_set_one(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake):
        photo = await draw(fake, GROUP, USER, "一只猫")
        assert "↗️ Share" not in buttons(photo)
        for text in ("/share", "/share story"):
            answer = await say(fake, GROUP, USER, text)
            assert answer == (
                "This chat has no gallery channel yet. An admin can set one with /settings gallery @channel."
            )
        await say(fake, GROUP, ADMIN, "/settings gallery my gallery")
        assert "chat id like -1001234567890 or a @channelusername" in await say(fake, GROUP, USER, "/share")
        await say(fake, GROUP, ADMIN, f"/settings gallery {GALLERY}")
        assert "nothing to share yet" in await say(fake, GROUP, OTHER, "/share")
        assert "Use /share alone" in await say(fake, GROUP, USER, "/share ../etc/passwd")
    assert len(fake.calls_of("sendPhoto")) == 1


async def test_a_gallery_the_bot_cannot_post_in_is_one_sentence_and_nothing_is_lost(
    tmp_path: Path, fake: FakeTelegram
) -> None:
    fake.forbidden.add(GALLERY)
    async with running(tmp_path, fake) as service:
        await say(fake, GROUP, ADMIN, f"/settings gallery {GALLERY}")
        photo = await draw(fake, GROUP, USER, "一只猫")
        answer = await say(fake, GROUP, USER, "/share")
        assert answer == (
            f"I can't post in {GALLERY}: add me to that channel as an admin who can post messages, "
            "then share again."
        )
        assert len(fake.calls_of("sendPhoto", chat_id=GALLERY)) == 1  # tried, answered 403

        await say(fake, GROUP, ADMIN, "/settings gallery @nowhere_channel")
        assert "add me to that channel" in await say(fake, GROUP, USER, "/share")

        job = await service.get_job(job_of(photo))
        assert job.status == JobStatus.DONE and job.images
        fake.forbidden.clear()
        await say(fake, GROUP, ADMIN, f"/settings gallery {GALLERY}")
        assert await say(fake, GROUP, USER, "/share") == f"↗️ Shared to {GALLERY}."
        calls = fake.calls_of("sendPhoto", chat_id=GALLERY)
    assert len(calls) == 2 and calls[1].files["photo"] == photo.files["photo"]


def test_credit_line_is_bounded_and_the_share_button_round_trips() -> None:
    sharer = Sharer(user="tg:1", name="x" * 500, chat="tg:-1", chat_title="Group " * 100)
    credit = sharer.credit
    assert credit.startswith("shared by xxx") and len(credit) < 160
    assert Sharer("tg:1", "  ", "tg:1", "a private chat").credit == "shared by someone from a private chat"
    data = keyboards.encode(keyboards.SHARE, 0, "0123456789abcdef")
    assert keyboards.decode(data) == keyboards.ButtonPress(keyboards.SHARE, 0, "0123456789abcdef")
    assert keyboards.decode(keyboards.encode(Action.REROLL, 0, "abc")).action == Action.REROLL  # type: ignore[union-attr]
    labels = [b.text for row in keyboards.result_keyboard("abc", 1, share=True).inline_keyboard for b in row]
    assert labels == ["🔄", "V1", "U1", "↗️ Share"]
