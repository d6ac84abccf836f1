"""Stories through Telegram: the real Application and service against the fake Bot API server."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.support import NO_TELEGRAM

pytest.importorskip("telegram", reason=NO_TELEGRAM)

from bots.telegram import keyboards
from bots.telegram.delivery import META_REPLY, META_STATUS, chat_key, parse_chat_key
from core.service import Huahua, MessageContext, Reply
from core.story.book import StoryBook
from core.story.model import Story
from core.types import Action, JobKind
from tests.fake_telegram import FakeTelegram
from tests.support import PatternEngine, until
from tests.test_telegram_bot import button_data, buttons, running, sent_message

USER = 2001
OTHER = 2002
GROUP = -100777
CHAT = USER
"""The whole story runs in a private chat: Telegram's 20 messages a minute per group would slow it."""
CAST = "穿红斗篷的小女孩"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram()
    await server.start()
    yield server
    await server.stop()


def book_of(service: Huahua) -> StoryBook:
    book = service.handler("story")
    assert isinstance(book, StoryBook)
    return book


async def story_of(service: Huahua, chat_id: int) -> Story:
    story = await book_of(service).active(f"tg:{chat_id}")
    assert story is not None
    return story


async def say(fake: FakeTelegram, chat_id: int, text: str, **kwargs: Any) -> dict[str, Any]:
    """Send `text` and wait for the bot's one text answer; returns that answer's call params."""
    before = len(fake.calls_of("sendMessage", chat_id=chat_id))
    fake.send_text(chat_id, USER, text, **kwargs)
    return (await fake.wait_for("sendMessage", before + 1, chat_id=chat_id))[before].params


def job_id_of(call: Any, label: str = "🔄") -> str:
    press = keyboards.decode(button_data(call, label))
    assert press is not None
    return press.job_id


async def test_a_whole_story_told_to_the_bot(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake) as service:
        menu = (await fake.wait_for("setMyCommands"))[0].params["commands"]
        names = [c["command"] for c in menu]
        assert {"story", "cast", "illustrate"} <= set(names) and "" not in names

        assert (await say(fake, CHAT, "/story new 小红帽"))["text"].startswith("📖 Started “小红帽”")
        assert CAST in (await say(fake, CHAT, f"/cast add 莉莉: {CAST}"))["text"]
        assert "passage 1" in (await say(fake, CHAT, "/story add 莉莉走进森林"))["text"]
        assert "passage 2" in (await say(fake, CHAT, "/story@huahua_bot add 莉莉在河边看月亮"))["text"]

        sends = len(fake.calls_of("sendMessage", chat_id=CHAT))
        asked = fake.send_text(CHAT, USER, "/illustrate 2")
        [photo] = await fake.wait_for("sendPhoto", 1, chat_id=CHAT)  # the two panels, drawn as one batch
        [status] = fake.calls_of("sendMessage", chat_id=CHAT)[sends:]
        lines = status.params["text"].split("\n")
        assert [line.split(":")[0] for line in lines[:2]] == ["🖼 Panel 1", "🖼 Panel 2"]
        assert lines[2].startswith("Panels 1–2 are drawn together")
        assert status.params["reply_parameters"]["message_id"] == asked["message_id"]
        assert "❌ Cancel" in buttons(status)
        story = await story_of(service, CHAT)
        prompts = [scene.own_request.prompt for scene in story.scenes]
        assert len(story.scenes) == 2 and all(CAST in p for p in prompts)
        caption = photo.params["caption"]
        assert [caption.split(f"提示词 {i}: ")[1].split("\n")[0] for i in (1, 2)] == prompts
        assert buttons(photo) == ["🔄", "V1", "V2", "U1", "U2", "⭐1", "⭐2"]
        done = [e for e in fake.calls_of("editMessageText", chat_id=CHAT) if e.params["text"] == "✅ Done."]
        assert {int(e.params["message_id"]) for e in done} == {sent_message(fake, status)["message_id"]}

        batch_message = sent_message(fake, photo)
        fake.press(CHAT, USER, batch_message, button_data(photo, "V2"))  # panel 2 alone, varied
        variation = (await fake.wait_for("sendPhoto", 2, chat_id=CHAT))[1]
        assert variation.params["reply_parameters"]["message_id"] == batch_message["message_id"]
        assert buttons(variation)[-1] == "⭐1"
        variation_job = await service.get_job(job_id_of(variation))
        assert variation_job.kind == JobKind.VARIATION and variation_job.meta["story_scene"] == "2"
        assert variation_job.request.prompt == prompts[1] and not variation_job.request.panels
        variation_status = fake.calls_of("sendMessage", chat_id=CHAT)[-1]
        assert variation_job.meta[META_STATUS] == str(sent_message(fake, variation_status)["message_id"])
        assert variation_job.meta[META_REPLY] == str(batch_message["message_id"])
        assert "tg_job" not in variation_job.meta

        async def variation_is_a_variant() -> bool:
            return variation_job.id in (await story_of(service, CHAT)).scenes[1].job_ids

        await until(variation_is_a_variant)
        fake.press(CHAT, USER, sent_message(fake, variation), button_data(variation, "⭐1"))
        answer = (await fake.wait_for("answerCallbackQuery", 2))[1].params
        assert answer["text"] == "⭐ Panel 2 uses this picture." and not answer.get("show_alert")
        story = await story_of(service, CHAT)
        assert story.scenes[1].chosen == (variation_job.id, 0) and story.scenes[0].chosen is None
        fake.press(CHAT, USER, batch_message, button_data(photo, "⭐1"))  # ⭐1 of the batch: panel 1
        answer = (await fake.wait_for("answerCallbackQuery", 3))[2].params
        assert answer["text"] == "⭐ Panel 1 uses this picture."
        story = await story_of(service, CHAT)
        batch = await service.get_job(job_id_of(photo))
        assert story.scenes[0].chosen == (batch.id, 0) and story.scenes[1].chosen == (variation_job.id, 0)

        shown = await say(fake, CHAT, "/story show")
        assert shown["text"].startswith("📖 小红帽") and "Cast: 莉莉" in shown["text"]
        album = (await fake.wait_for("sendMediaGroup", chat_id=CHAT))[0]
        assert len(album.params["media"]) == 2 and all(m["type"] == "photo" for m in album.params["media"])
        assert sorted(album.files.values()) == sorted(
            [await service.image(batch.images[0]), variation.files["photo"]]
        )
        assert await service.image(batch.images[1]) not in album.files.values()

        exported = await say(fake, CHAT, "/story export")
        assert "2 panels" in exported["text"]
        html_call, pdf_call = await fake.wait_for("sendDocument", 2, chat_id=CHAT)
    html = html_call.files["document"]
    assert html.startswith(b"<!doctype html>") and html.count(b"<img") == 2
    assert "小红帽" in html.decode() and CAST in html.decode()
    assert pdf_call.files["document"].startswith(b"%PDF")
    assert (html_call.filenames["document"], pdf_call.filenames["document"]) == ("小红帽.html", "小红帽.pdf")


async def test_story_auto_makes_group_messages_passages(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake) as service:
        await say(fake, GROUP, "/story new 雪夜")
        fake.send_text(GROUP, OTHER, "这句不算")
        assert "every message" in (await say(fake, GROUP, "/story auto on"))["text"]
        assert (await service.chat_settings(f"tg:{GROUP}")).story_auto
        answered = len(fake.calls)
        fake.send_text(GROUP, OTHER, "莉莉在雪地里堆雪人")
        fake.send_text(GROUP, USER, "  狐狸从树后看着她  ")

        async def two_passages() -> bool:
            return len((await story_of(service, GROUP)).excerpts) == 2

        await until(two_passages)
        assert (await story_of(service, GROUP)).excerpts == ("莉莉在雪地里堆雪人", "狐狸从树后看着她")
        await asyncio.sleep(0.3)
        assert [c.method for c in fake.calls[answered:]] == []

        await say(fake, GROUP, "/story auto off")
        fake.send_text(GROUP, OTHER, "又不算了")
        await say(fake, GROUP, "/story show")
        assert len((await story_of(service, GROUP)).excerpts) == 2


async def test_illustrate_as_a_reply_draws_that_message(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake) as service:
        await say(fake, GROUP, "/story new 小红帽")
        await say(fake, GROUP, f"/cast add 莉莉: {CAST}")
        await say(fake, GROUP, "/story add 莉莉走进森林")
        quoted = fake.send_text(GROUP, OTHER, "莉莉在桥上遇到了一只狐狸")
        status = await say(fake, GROUP, "/illustrate", reply_to=quoted)
        assert status["text"].startswith("🖼 Panel 1")
        photo = (await fake.wait_for("sendPhoto", chat_id=GROUP))[0]
        story = await story_of(service, GROUP)
        assert story.excerpts[-1] == "莉莉在桥上遇到了一只狐狸"
        assert [s.excerpt for s in story.scenes] == ["莉莉在桥上遇到了一只狐狸"]
        job = await service.get_job(job_id_of(photo))
        assert job.source_text == "莉莉在桥上遇到了一只狐狸" and job.kind == JobKind.SCENE
        assert CAST in photo.params["caption"]


async def test_choose_on_a_plain_picture_is_refused(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake) as service:
        fake.send_text(USER, USER, "一只猫")
        photo = (await fake.wait_for("sendPhoto", chat_id=USER))[0]
        assert "⭐1" not in buttons(photo)
        job_id = job_id_of(photo)
        fake.press(USER, USER, sent_message(fake, photo), keyboards.encode(Action.CHOOSE, 0, job_id))
        answer = (await fake.wait_for("answerCallbackQuery"))[0].params
        assert answer["show_alert"] is True and "story pictures" in answer["text"]
        assert (await service.get_job(job_id)).meta.get("story_id") is None


async def test_private_chat_plain_text_draws_unless_the_story_is_on_auto(
    tmp_path: Path, fake: FakeTelegram
) -> None:
    async with running(tmp_path, fake) as service:
        await say(fake, USER, "/story new 月亮")
        await say(fake, USER, "/story auto on")
        fake.send_text(USER, USER, "月亮升起来了")

        async def one_passage() -> bool:
            return (await story_of(service, USER)).excerpts == ("月亮升起来了",)

        await until(one_passage)
        await say(fake, USER, "/story auto off")
        fake.send_text(USER, USER, "一只猫")
        photo = (await fake.wait_for("sendPhoto", chat_id=USER))[0]
        assert "一只猫" in photo.params["caption"]
        assert (await story_of(service, USER)).excerpts == ("月亮升起来了",)


async def test_story_errors_are_one_sentence(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake):
        assert "no story" in (await say(fake, GROUP, "/illustrate"))["text"]
        await say(fake, GROUP, "/story new 小红帽")
        assert "Add a passage first" in (await say(fake, GROUP, "/illustrate"))["text"]
        assert "1 to 4" in (await say(fake, GROUP, "/illustrate 99"))["text"]
        assert "/cast add <name>" in (await say(fake, GROUP, "/cast add nobody"))["text"]
        assert "Story commands" in (await say(fake, GROUP, "/story"))["text"]
        await asyncio.sleep(0.2)
        assert not fake.calls_of("sendPhoto") and not fake.calls_of("sendDocument")


def test_star_buttons_only_on_story_results() -> None:
    plain = keyboards.result_keyboard("abc123", 2)
    story = keyboards.result_keyboard("abc123", 2, choose=True)
    assert [b.text for row in plain.inline_keyboard for b in row] == ["🔄", "V1", "V2", "U1", "U2"]
    labels = [b.text for row in story.inline_keyboard for b in row]
    assert labels[-2:] == ["⭐1", "⭐2"]
    star = story.inline_keyboard[-1][1].callback_data
    assert keyboards.decode(star) == keyboards.ButtonPress(Action.CHOOSE, 1, "abc123")


def test_album_pictures_are_pngs() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    from bots.telegram.bot import _is_photo

    assert _is_photo("panel-1.png", buffer.getvalue())
    assert not _is_photo("book.html", buffer.getvalue())
    assert not _is_photo("panel-2.png", b"not a png")


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


class Attachments:
    """A plug-in command family (registered like the StoryBook) whose reply carries many files."""

    commands = ("files",)

    async def handle(self, chat: str, user: str, command: str, args: str, context: MessageContext) -> Reply:
        pictures = [(f"p{i}.png", png((i, 0, 0))) for i in range(11)]
        others = [("notes.txt", b"hello"), ("broken.png", b"nope"), ("last.png", png((9, 9, 9)))]
        return Reply(texts=("Here are your files.",), attachments=(*pictures, *others))


async def test_attachments_go_as_albums_photos_and_documents_in_order(
    tmp_path: Path, fake: FakeTelegram
) -> None:
    async with running(tmp_path, fake) as service:
        service.register(Attachments())
        asked = fake.send_text(USER, USER, "/files")
        await fake.wait_for("sendPhoto", 2, chat_id=USER)
        sent = [c for c in fake.calls if c.method.startswith("send")]
    assert [c.method for c in sent] == [
        "sendMessage",
        "sendMediaGroup",
        "sendPhoto",
        "sendDocument",
        "sendDocument",
        "sendPhoto",
    ]
    assert all(c.params["reply_parameters"]["message_id"] == asked["message_id"] for c in sent)
    album = sent[1]
    assert len(album.params["media"]) == 10
    assert sorted(album.files.values()) == sorted(png((i, 0, 0)) for i in range(10))
    assert sent[2].files["photo"] == png((10, 0, 0))
    assert [sent[3].filenames["document"], sent[4].filenames["document"]] == ["notes.txt", "broken.png"]
    assert sent[3].files["document"] == b"hello" and sent[5].files["photo"] == png((9, 9, 9))


async def test_story_pictures_queued_at_shutdown_are_delivered_after_restart(
    tmp_path: Path, fake: FakeTelegram
) -> None:
    gate = asyncio.Event()
    async with running(tmp_path, fake, PatternEngine(gate=gate)) as service:
        await say(fake, CHAT, "/story new 小红帽")
        await say(fake, CHAT, "/story add 莉莉走进森林")
        await say(fake, CHAT, "/story add 莉莉在河边看月亮")
        sends = len(fake.calls_of("sendMessage", chat_id=CHAT))
        asked = fake.send_text(CHAT, USER, "/illustrate 2")
        statuses = (await fake.wait_for("sendMessage", sends + 1, chat_id=CHAT))[sends:]

        async def ids_kept() -> bool:
            jobs = await service.store.unfinished_jobs()
            return len(jobs) == 1 and all(META_STATUS in job.meta for job in jobs)

        await until(ids_kept)  # the two panels: one job, drawn as one batch
    assert not fake.calls_of("sendPhoto")
    status_ids = {sent_message(fake, s)["message_id"] for s in statuses}

    async with running(tmp_path, fake, PatternEngine()) as service:
        photos = await fake.wait_for("sendPhoto", 1, chat_id=CHAT)
        assert all(p.params["reply_parameters"]["message_id"] == asked["message_id"] for p in photos)
        assert all(buttons(p)[-2:] == ["⭐1", "⭐2"] for p in photos)

        async def done_edited() -> bool:
            edits = fake.calls_of("editMessageText", chat_id=CHAT)
            done = {int(e.params["message_id"]) for e in edits if e.params["text"] == "✅ Done."}
            return done == status_ids

        await until(done_edited)


FORUM = -100888
"""A supergroup with topics: each topic keeps its own story."""


async def test_each_forum_topic_keeps_its_own_story(tmp_path: Path, fake: FakeTelegram) -> None:
    fake.forums.add(FORUM)
    async with running(tmp_path, fake) as service:
        assert (await say(fake, FORUM, "/story new A", thread_id=11))["text"].startswith("📖 Started “A”")
        assert (await say(fake, FORUM, "/story new B", thread_id=22))["text"].startswith("📖 Started “B”")
        assert (await story_of_key(service, f"tg:{FORUM}:11")).title == "A"
        assert (await story_of_key(service, f"tg:{FORUM}:22")).title == "B"
        assert await book_of(service).active(f"tg:{FORUM}") is None

        await say(fake, FORUM, "/story add 莉莉走进森林", thread_id=22)
        asked = fake.send_text(FORUM, USER, "/illustrate", thread_id=22)
        photo = (await fake.wait_for("sendPhoto", chat_id=FORUM))[0]
        status = fake.calls_of("sendMessage", chat_id=FORUM)[-1]
        assert status.params["text"].startswith("🖼 Panel 1")
        assert status.params["message_thread_id"] == 22
        assert status.params["reply_parameters"]["message_id"] == asked["message_id"]
        assert photo.params["message_thread_id"] == 22
        job = await service.get_job(job_id_of(photo))
        assert job.chat == f"tg:{FORUM}:22"
        assert len((await story_of_key(service, f"tg:{FORUM}:22")).scenes) == 1
        assert (await story_of_key(service, f"tg:{FORUM}:11")).scenes == ()


async def test_a_topic_job_queued_at_shutdown_is_delivered_into_its_topic(
    tmp_path: Path, fake: FakeTelegram
) -> None:
    fake.forums.add(FORUM)
    gate = asyncio.Event()
    async with running(tmp_path, fake, PatternEngine(gate=gate)) as service:
        await say(fake, FORUM, "/story new C", thread_id=33)
        await say(fake, FORUM, "/story add 狐狸在雪地里", thread_id=33)
        asked = fake.send_text(FORUM, USER, "/illustrate", thread_id=33)

        async def ids_kept() -> bool:
            jobs = await service.store.unfinished_jobs()
            return len(jobs) == 1 and META_STATUS in jobs[0].meta

        await until(ids_kept)
    assert not fake.calls_of("sendPhoto")

    async with running(tmp_path, fake, PatternEngine()):
        photo = (await fake.wait_for("sendPhoto", chat_id=FORUM))[0]
        assert photo.params["message_thread_id"] == 33
        assert photo.params["reply_parameters"]["message_id"] == asked["message_id"]


async def story_of_key(service: Huahua, chat: str) -> Story:
    story = await book_of(service).active(chat)
    assert story is not None
    return story


@pytest.mark.parametrize(
    ("chat", "parsed"),
    [
        ("tg:-100123", (-100123, None)),
        ("tg:-100123:11", (-100123, 11)),
        ("tg:42", (42, None)),
        ("dc:42", None),
        ("tg:abc", None),
        ("tg:-100123:x", None),
        ("tg:", None),
    ],
)
def test_chat_keys_parse_back(chat: str, parsed: tuple[int, int | None] | None) -> None:
    assert parse_chat_key(chat) == parsed
    if parsed is not None:
        assert chat_key(*parsed) == chat
