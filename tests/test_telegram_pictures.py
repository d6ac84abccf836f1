"""Cast reference pictures through Telegram: a photo or image document captioned `/cast add`, downloaded
by the real Application from the fake Bot API server (getFile, then the file URL)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from tests.support import NO_TELEGRAM, jpeg_picture, png_claiming

pytest.importorskip("telegram", reason=NO_TELEGRAM)

from bots.telegram.pictures import cast_add_args
from core.images import MAX_UPLOAD_BYTES
from tests.fake_telegram import FakeTelegram
from tests.test_telegram_bot import running
from tests.test_telegram_story import USER, say, story_of

CHAT = USER
GROUP = -100888


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram()
    await server.start()
    yield server
    await server.stop()


async def picture_answer(
    fake: FakeTelegram, chat_id: int, data: bytes, caption: str, *, count: int = 1, **kwargs: object
) -> str:
    """Send a picture and wait for the bot's `count` text answers; returns them, one a line."""
    before = len(fake.calls_of("sendMessage", chat_id=chat_id))
    fake.send_picture(chat_id, USER, data, caption, **kwargs)  # type: ignore[arg-type]
    sent = (await fake.wait_for("sendMessage", before + count, chat_id=chat_id))[before:]
    return "\n".join(str(call.params["text"]) for call in sent)


async def test_a_captioned_photo_becomes_the_reference_and_cast_show_shows_it(
    tmp_path: Path, fake: FakeTelegram
) -> None:
    photo = jpeg_picture((20, 40, 220), (300, 200))
    async with running(tmp_path, fake) as service:
        await say(fake, CHAT, "/story new 小红帽")
        answer = await picture_answer(fake, CHAT, photo, "/cast add 莉莉: 穿红斗篷的小女孩", count=2)
        assert answer.startswith("Cast: 莉莉 — 穿红斗篷的小女孩\n📌 莉莉's reference picture is set")
        (get_file,) = fake.calls_of("getFile")
        assert fake.files[get_file.params["file_id"]] == photo  # the largest size, not the thumbnail
        member = (await story_of(service, CHAT)).member("莉莉")
        assert member is not None and member.reference is not None and member.reference_from == "picture"
        reference = await service.image(member.reference)
        with Image.open(io.BytesIO(reference)) as image:
            assert image.size == (300, 200)
            assert image.convert("RGB").getpixel((150, 100))[2] > 180  # the blue of the photo

        shown = await say(fake, CHAT, "/cast show 莉莉")
        assert "Reference: the picture you gave" in shown["text"]
        (sent,) = await fake.wait_for("sendPhoto", chat_id=CHAT)
        assert sent.files["photo"] == reference


async def test_an_image_document_in_a_group_with_the_bot_named(tmp_path: Path, fake: FakeTelegram) -> None:
    picture = jpeg_picture((200, 200, 20))
    async with running(tmp_path, fake) as service:
        await say(fake, GROUP, "/story new 雪夜")
        await say(fake, GROUP, "/cast add 狼: 大灰狼")
        answer = await picture_answer(
            fake, GROUP, picture, "/cast@huahua_bot add 狼", as_document="image/jpeg"
        )
        assert "狼's reference picture is set" in answer
        story = await story_of(service, GROUP)
        assert [m.name for m in story.cast] == ["狼"] and story.cast[0].reference is not None


async def test_a_picture_over_the_limit_is_refused_before_downloading(
    tmp_path: Path, fake: FakeTelegram
) -> None:
    async with running(tmp_path, fake) as service:
        await say(fake, CHAT, "/story new 小红帽")
        answer = await picture_answer(
            fake, CHAT, jpeg_picture(), "/cast add 莉莉: 小女孩", reported_size=MAX_UPLOAD_BYTES + 1
        )
        assert answer == "The image is too large: at most 20 MB, please."
        assert fake.calls_of("getFile") == []
        assert (await story_of(service, CHAT)).cast == ()


async def test_a_bomb_and_a_non_image_are_refused_in_one_sentence(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake) as service:
        await say(fake, CHAT, "/story new 炸弹")
        bomb = await picture_answer(
            fake, CHAT, png_claiming(9_400, 9_400), "/cast add 莉莉: 小女孩", as_document="image/png"
        )
        assert bomb == "The image is too large: at most 4096×4096 pixels, please."
        fake_png = await picture_answer(
            fake, CHAT, b"<html>not a picture</html>", "/cast add 莉莉: 小女孩", as_document="image/png"
        )
        assert "not an image" in fake_png
        assert (await story_of(service, CHAT)).cast == ()


async def test_other_captions_and_plain_files_are_left_alone(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake):
        await say(fake, CHAT, "/story new 小红帽")
        answered = len(fake.calls)
        fake.send_picture(CHAT, USER, jpeg_picture(), "看我的猫")
        fake.send_picture(CHAT, USER, b"%PDF-1.4", "/cast add 莉莉: 小女孩", as_document="application/pdf")
        fake.send_picture(CHAT, USER, jpeg_picture(), "/cast@other_bot add 莉莉: 小女孩")
        await asyncio.sleep(0.5)
        assert [c.method for c in fake.calls[answered:]] == []


@pytest.mark.parametrize(
    ("caption", "args"),
    [
        ("/cast add 莉莉: 小女孩", "莉莉: 小女孩"),
        ("  /CAST@Huahua_Bot add 莉莉 ", "莉莉"),
        ("/cast add", ""),
        ("/cast show 莉莉", None),
        ("/story add 莉莉", None),
        ("/cast@someone_else add 莉莉: 小女孩", None),
        ("cast add 莉莉", None),
    ],
)
def test_cast_add_captions(caption: str, args: str | None) -> None:
    assert cast_add_args(caption, "huahua_bot") == args
