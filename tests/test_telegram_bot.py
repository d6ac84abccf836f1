"""The Telegram adapter end to end: the real python-telegram-bot Application against a fake Bot API."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from tests.support import NO_TELEGRAM

pytest.importorskip("telegram", reason=NO_TELEGRAM)

from bots.telegram import keyboards, messages
from bots.telegram.bot import build_application, start_application, stop_application
from core.app import build_service
from core.engine import Engine
from core.errors import InvalidOption, ServiceUnavailable
from core.types import Action, GeneratedImage, GenerationRequest, JobStatus
from tests.fake_telegram import BOT_USER, FakeTelegram
from tests.support import PatternEngine, make_settings

USER = 1001
OTHER = 1002
GROUP = -100555


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram()
    await server.start()
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, fake: FakeTelegram, engine: Engine | None = None, **overrides: Any
) -> AsyncIterator[Any]:
    """A started service and Telegram application on the same data dir; stopped in order on exit."""
    settings = make_settings(tmp_path, telegram_token=fake.token, telegram_base_url=fake.root, **overrides)
    service = await build_service(settings, engine=engine or PatternEngine())
    app = build_application(service, settings)
    await service.start()
    await start_application(app, settings, poll_timeout=1)
    try:
        yield service
    finally:
        await stop_application(app)
        await service.stop()


def buttons(call: Any) -> list[str]:
    rows = call.params.get("reply_markup", {}).get("inline_keyboard", [])
    return [button["text"] for row in rows for button in row]


def button_data(call: Any, text: str) -> str:
    rows = call.params["reply_markup"]["inline_keyboard"]
    return next(b["callback_data"] for row in rows for b in row if b["text"] == text)


def sent_message(fake: FakeTelegram, call: Any) -> dict[str, Any]:
    """The message the fake created for a send* call (by chat and order)."""
    chat_id = int(call.params["chat_id"])
    sent = [m for (c, _), m in fake.messages.items() if c == chat_id and m["from"]["id"] == BOT_USER["id"]]
    calls = [c for c in fake.calls if c.method.startswith("send") and int(c.params["chat_id"]) == chat_id]
    return sent[calls.index(call)]


async def test_imagine_flow_status_progress_and_photo(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake, PatternEngine(step_delay=0.1)) as service:
        menu = (await fake.wait_for("setMyCommands"))[0].params["commands"]
        assert [c["command"] for c in menu][:4] == ["imagine", "settings", "help", "start"]

        asked = fake.send_text(USER, USER, "/imagine 一只猫 --seed 7 --steps 25")
        status = (await fake.wait_for("sendMessage", chat_id=USER))[0]
        assert status.params["reply_parameters"]["message_id"] == asked["message_id"]
        photo = (await fake.wait_for("sendPhoto", chat_id=USER, timeout=15))[0]

        assert not await service.store.unfinished_jobs()
        caption = photo.params["caption"]
        assert "提示词: 一只猫" in caption and "seed 7" in caption and "25 steps" in caption
        assert buttons(photo) == ["🔄", "V1", "U1"]
        assert photo.params["reply_parameters"]["message_id"] == asked["message_id"]
        with Image.open(io.BytesIO(photo.files["photo"])) as image:
            assert image.format == "PNG"

        edits = fake.calls_of("editMessageText", chat_id=USER)
        status_id = sent_message(fake, status)["message_id"]
        assert {int(e.params["message_id"]) for e in edits} == {status_id}
        assert any("Drawing" in e.params["text"] and "█" in e.params["text"] for e in edits)
        assert any("❌ Cancel" in buttons(e) for e in edits)
        assert edits[-1].params["text"] == "✅ Done." and not buttons(edits[-1])
        gaps = [b.at - a.at for a, b in itertools.pairwise(edits)]
        assert gaps and min(gaps) >= 0.8, gaps
        assert len(edits) <= 2.5 / 0.8 + 3


async def test_reroll_and_variation_buttons_make_new_jobs(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake) as service:
        fake.send_text(USER, USER, "/imagine 一只猫 --seed 7")
        photo = (await fake.wait_for("sendPhoto", chat_id=USER))[0]
        photo_message = sent_message(fake, photo)

        fake.press(USER, USER, photo_message, button_data(photo, "🔄"))
        second = (await fake.wait_for("sendPhoto", 2, chat_id=USER))[1]
        assert second.params["caption"] != photo.params["caption"]
        assert second.params["reply_parameters"]["message_id"] == photo_message["message_id"]
        assert fake.calls_of("answerCallbackQuery")[0].params["text"] == "Rerolling…"

        fake.press(USER, USER, photo_message, button_data(photo, "V1"))
        third = (await fake.wait_for("sendPhoto", 3, chat_id=USER))[2]
        assert "variation of image 1" in third.params["caption"]
        assert third.params["reply_parameters"]["message_id"] == photo_message["message_id"]
        assert third.files["photo"] != photo.files["photo"]
        statuses = [
            c
            for c in fake.calls_of("sendMessage", chat_id=USER)
            if c.params.get("reply_parameters", {}).get("message_id") == photo_message["message_id"]
        ]
        assert len(statuses) == 2
        reroll = await service.get_job(keyboards.decode(button_data(second, "🔄")).job_id)  # type: ignore[union-attr]
        variation = await service.get_job(keyboards.decode(button_data(third, "🔄")).job_id)  # type: ignore[union-attr]
        assert (reroll.kind, variation.kind) == ("reroll", "variation")
        assert reroll.user == variation.user == f"tg:{USER}"


async def test_cancel_button_stops_a_running_job(tmp_path: Path, fake: FakeTelegram) -> None:
    gate = asyncio.Event()
    async with running(tmp_path, fake, PatternEngine(gate=gate)) as service:
        fake.send_text(USER, USER, "/imagine 一只猫")
        status_call = (await fake.wait_for("sendMessage", chat_id=USER))[0]
        edit = (await fake.wait_for("editMessageText", chat_id=USER))[0]
        data = button_data(edit, "❌ Cancel")
        job_id = keyboards.decode(data).job_id  # type: ignore[union-attr]

        fake.press(USER, OTHER, sent_message(fake, status_call), data)
        refused = (await fake.wait_for("answerCallbackQuery"))[0]
        assert refused.params.get("show_alert") is True and "Only the person" in refused.params["text"]

        fake.press(USER, USER, sent_message(fake, status_call), data)
        await fake.wait_for("answerCallbackQuery", 2)
        gate.set()
        for _ in range(100):
            if (await service.get_job(job_id)).status.finished:
                break
            await asyncio.sleep(0.05)
        assert (await service.get_job(job_id)).status == JobStatus.CANCELLED
        await asyncio.sleep(1.2)
        assert fake.calls_of("editMessageText", chat_id=USER)[-1].params["text"] == "❌ Cancelled."
        assert not fake.calls_of("sendPhoto")
        [delivery] = await service.store.deliveries(job_id)  # the edited status message shows the end
        assert delivery.message_id == str(sent_message(fake, status_call)["message_id"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/imagine decapitation of a knight", "can't draw that"),
        ("/imagine 一只猫 --steps 999", "--steps must be a whole number"),
        ("/imagine 一只猫 --colour red", "Unknown option --colour"),
        ("/imagine", "describe the picture"),
    ],
)
async def test_refusals_are_one_sentence(
    tmp_path: Path, fake: FakeTelegram, text: str, expected: str
) -> None:
    async with running(tmp_path, fake):
        fake.send_text(USER, USER, text)
        edit = (await fake.wait_for("editMessageText", chat_id=USER))[0]
        sentence = edit.params["text"]
        assert expected.lower() in sentence.lower()
        assert "\n" not in sentence and "Traceback" not in sentence
        assert not buttons(edit)
        await asyncio.sleep(0.3)
        assert not fake.calls_of("sendPhoto")


async def test_group_mention_replies_and_chatter_is_ignored(tmp_path: Path, fake: FakeTelegram) -> None:
    async with running(tmp_path, fake):
        fake.send_text(GROUP, USER, "hello everyone, nice weather")
        fake.send_text(GROUP, USER, "/imagine@other_bot 一只狗")
        asked = fake.send_text(GROUP, OTHER, "@huahua_bot 一只猫")
        photo = (await fake.wait_for("sendPhoto", chat_id=GROUP))[0]
        assert photo.params["reply_parameters"]["message_id"] == asked["message_id"]
        assert "一只猫" in photo.params["caption"]
        status = fake.calls_of("sendMessage", chat_id=GROUP)
        assert len(status) == 1
        assert status[0].params["reply_parameters"]["message_id"] == asked["message_id"]
        assert len(fake.calls_of("sendPhoto")) == 1


async def test_settings_changes_need_a_group_admin(tmp_path: Path, fake: FakeTelegram) -> None:
    fake.admins.add((GROUP, OTHER))
    async with running(tmp_path, fake) as service:
        fake.send_text(GROUP, USER, "/settings quota 3")
        refused = (await fake.wait_for("sendMessage", chat_id=GROUP))[0]
        assert "admins" in refused.params["text"]
        fake.send_text(GROUP, OTHER, "/settings@huahua_bot quota 3")
        saved = (await fake.wait_for("sendMessage", 2, chat_id=GROUP))[1]
        assert saved.params["text"].startswith("Saved")
        assert (await service.chat_settings(f"tg:{GROUP}")).daily_quota == 3
        assert len(fake.calls_of("getChatMember")) == 2


async def test_job_queued_at_shutdown_is_delivered_after_restart(tmp_path: Path, fake: FakeTelegram) -> None:
    gate = asyncio.Event()
    async with running(tmp_path, fake, PatternEngine(gate=gate)) as service:
        first = fake.send_text(USER, USER, "/imagine 一只猫")
        second = fake.send_text(USER, USER, "/imagine 一只狗")
        await fake.wait_for("sendMessage", 2, chat_id=USER)
        for _ in range(100):
            if len(await service.store.unfinished_jobs()) == 2:
                break
            await asyncio.sleep(0.05)
    assert not fake.calls_of("sendPhoto")
    status_ids = {sent_message(fake, c)["message_id"] for c in fake.calls_of("sendMessage", chat_id=USER)}

    async with running(tmp_path, fake, PatternEngine()):
        photos = await fake.wait_for("sendPhoto", 2, chat_id=USER)
    replied = sorted(p.params["reply_parameters"]["message_id"] for p in photos)
    assert replied == sorted([first["message_id"], second["message_id"]])
    done = [e for e in fake.calls_of("editMessageText", chat_id=USER) if e.params["text"] == "✅ Done."]
    assert {int(e.params["message_id"]) for e in done} == status_ids


class HeavyPictureEngine(PatternEngine):
    """Draws seeded noise 1,900 px square: a PNG over Telegram's 10 MB photo limit."""

    @staticmethod
    def _draw(request: GenerationRequest, prompt: str, seed: int) -> GeneratedImage:
        pixels = np.random.default_rng(seed).integers(0, 256, (1900, 1900, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        return GeneratedImage(png=buffer.getvalue(), width=1900, height=1900, seed=seed)


async def test_large_pictures_go_as_documents(tmp_path: Path, fake: FakeTelegram) -> None:
    assert messages.fits_as_photo(1000, 1024, 1024)
    assert not messages.fits_as_photo(11 * 1024 * 1024, 512, 512)
    assert not messages.fits_as_photo(1000, 8000, 2001)
    async with running(tmp_path, fake, HeavyPictureEngine()) as service:
        fake.send_text(USER, USER, "/imagine 一只猫 --seed 5")
        (document,) = await fake.wait_for("sendDocument", chat_id=USER)
        press = keyboards.decode(button_data(document, "🔄"))
        assert press is not None
        job = await service.get_job(press.job_id)
        picture = await service.image(job.images[0])
    assert not fake.calls_of("sendPhoto")  # the fake refuses photos over 10 MB, as Telegram does
    assert len(picture) > messages.PHOTO_MAX_BYTES and document.files["document"] == picture
    assert "seed 5" in document.params["caption"]


def test_caption_truncation_counts_utf16() -> None:
    text = "提示词: " + "猫" * 2000 + "😀"
    cut = messages.truncate(text, messages.CAPTION_LIMIT)
    assert len(cut.encode("utf-16-le")) // 2 <= 1024 and cut.endswith("…")
    assert messages.truncate("short", 1024) == "short"
    chunks = messages.split("a" * 5000 + "\nbc")
    assert [len(c) for c in chunks] == [4096, 907]
    assert messages.split("x\n" * 3000)[0].count("x") == 2048


def test_callback_data_round_trip_and_rejects_garbage() -> None:
    data = keyboards.encode(Action.UPSCALE, 3, "0123456789abcdef")
    assert len(data.encode()) <= 64
    press = keyboards.decode(data)
    assert press == keyboards.ButtonPress(Action.UPSCALE, 3, "0123456789abcdef")
    for bad in (None, "", "hh:x:0:abc", "hh:r:-1:abc", "hh:r:0:", "hh:r:0:a/b", "zz:r:0:abc", "x" * 65, 7):
        assert keyboards.decode(bad) is None


async def test_missing_token_and_bad_token_are_friendly(tmp_path: Path, fake: FakeTelegram) -> None:
    settings = make_settings(tmp_path, telegram_base_url=fake.root)
    service = await build_service(settings, engine=PatternEngine())
    try:
        with pytest.raises(InvalidOption, match="HUAHUA_TELEGRAM_TOKEN"):
            build_application(service, settings)
        wrong = make_settings(tmp_path, telegram_token="999:wrong", telegram_base_url=fake.root)
        app = build_application(service, wrong)
        with pytest.raises(Exception, match="rejected the bot token"):
            await start_application(app, wrong)
    finally:
        await service.stop()


async def test_token_never_reaches_logs(
    tmp_path: Path, fake: FakeTelegram, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(tmp_path, fake):
        fake.send_text(USER, USER, "/imagine 一只猫")
        await fake.wait_for("sendPhoto", chat_id=USER)
    assert fake.token not in caplog.text


async def test_tiny_model_draws_through_telegram(tmp_path: Path, fake: FakeTelegram) -> None:
    from core.engines.factory import build_engine

    settings = make_settings(tmp_path, engine="tiny", default_steps=2, tiny_image_area=64 * 64)
    async with running(tmp_path, fake, build_engine(settings), default_steps=2, tiny_image_area=64 * 64):
        fake.send_text(USER, USER, "/imagine 一只猫 --seed 3")
        photo = (await fake.wait_for("sendPhoto", chat_id=USER, timeout=60))[0]
    with Image.open(io.BytesIO(photo.files["photo"])) as image:
        assert image.size[0] * image.size[1] == 64 * 64
    assert "seed 3" in photo.params["caption"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_webhook_mode_checks_the_secret_token(tmp_path: Path, fake: FakeTelegram) -> None:
    port = free_port()
    settings = make_settings(
        tmp_path,
        telegram_token=fake.token,
        telegram_base_url=fake.root,
        telegram_webhook_url="https://bot.example.org/tg/hook",
        telegram_webhook_secret="s3cret_Value-1",
        telegram_webhook_port=port,
    )
    service = await build_service(settings, engine=PatternEngine())
    app = build_application(service, settings)
    await service.start()
    await start_application(app, settings, webhook_listen="127.0.0.1")
    try:
        hook = (await fake.wait_for("setWebhook"))[0].params
        assert hook["url"] == "https://bot.example.org/tg/hook" and hook["secret_token"] == "s3cret_Value-1"
        update = {"update_id": 1, "message": fake.send_text(USER, USER, "/help")}
        url = f"http://127.0.0.1:{port}/tg/hook"
        async with aiohttp.ClientSession() as http:
            wrong = {"X-Telegram-Bot-Api-Secret-Token": "guess"}
            async with http.post(url, json=update, headers=wrong) as response:
                assert response.status == 403
            right = {"X-Telegram-Bot-Api-Secret-Token": "s3cret_Value-1"}
            async with http.post(url, json=update, headers=right) as response:
                assert response.status == 200
        answer = (await fake.wait_for("sendMessage", chat_id=USER))[0]
        assert answer.params["text"].startswith("Huahua turns your words")
        assert len(fake.calls_of("sendMessage")) == 1
    finally:
        await stop_application(app)
        await service.stop()


async def test_webhook_secret_with_bad_characters_is_refused(tmp_path: Path, fake: FakeTelegram) -> None:
    settings = make_settings(
        tmp_path,
        telegram_token=fake.token,
        telegram_base_url=fake.root,
        telegram_webhook_url="https://bot.example.org/hook",
        telegram_webhook_secret="no spaces allowed!",
    )
    service = await build_service(settings, engine=PatternEngine())
    try:
        with pytest.raises(InvalidOption, match="WEBHOOK_SECRET"):
            await start_application(build_application(service, settings), settings)
    finally:
        await service.stop()
    assert not fake.calls


async def test_a_webhook_port_in_use_is_one_sentence(tmp_path: Path, fake: FakeTelegram) -> None:
    """Webhook mode where the port is taken: one sentence naming the port and the setting, and the
    application is stopped again (the outbox released, the HTTP pool closed)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(
            tmp_path,
            telegram_token=fake.token,
            telegram_base_url=fake.root,
            telegram_webhook_url="https://bot.example/hook",
            telegram_webhook_port=port,
        )
        service = await build_service(settings, engine=PatternEngine())
        app = build_application(service, settings)
        await service.start()
        try:
            with pytest.raises(ServiceUnavailable) as caught:
                await start_application(app, settings, webhook_listen="127.0.0.1")
        finally:
            await service.stop()
    assert caught.value.message == (
        f"The Telegram webhook cannot listen: 127.0.0.1:{port} is already in use (is another huahua "
        "running?). Choose another with HUAHUA_TELEGRAM_WEBHOOK_PORT."
    )
    assert not app.running
