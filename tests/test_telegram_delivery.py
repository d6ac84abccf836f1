"""Telegram results through the outbox: the real Application and service against the fake Bot API, which
counts every picture it is sent per job and scripts flood control, outages and a bot removed from a chat."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import NO_TELEGRAM

pytest.importorskip("telegram", reason=NO_TELEGRAM)

from bots.telegram import keyboards
from bots.telegram.bot import build_application, start_application, stop_application
from core.app import build_service
from core.outbox import POLL_S
from core.service import Huahua
from core.types import Delivery, DeliveryState, EventType, JobEvent, JobStatus
from tests.fake_telegram import Call, FakeTelegram
from tests.support import PatternEngine, make_settings, until
from tests.test_telegram_bot import running

USER = 5001
OTHER = 5002
GROUP = -100777
RESULTS = ("sendPhoto", "sendDocument")


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram()
    await server.start()
    yield server
    await server.stop()


def job_of(call: Call) -> str:
    """The job a result message belongs to, read from its buttons."""
    rows = call.params["reply_markup"]["inline_keyboard"]
    presses = {keyboards.decode(button["callback_data"]) for row in rows for button in row}
    ids = {press.job_id for press in presses if press is not None}
    assert len(ids) == 1, ids
    return ids.pop()


def pictures_posted(fake: FakeTelegram, job_id: str) -> list[Call]:
    """The pictures of one job that the fake accepted (sendPhoto or sendDocument answered 200)."""
    return [c for method in RESULTS for c in fake.posted(method) if job_of(c) == job_id]


async def delivery_of(service: Huahua, job_id: str) -> Delivery:
    [delivery] = await service.store.deliveries(job_id)
    return delivery


async def sent_delivery(service: Huahua, job_id: str, timeout: float = 15.0) -> Delivery:  # noqa: ASYNC109
    async def sent() -> bool:
        deliveries = await service.store.deliveries(job_id)
        return bool(deliveries) and deliveries[0].state == DeliveryState.SENT

    await until(sent, timeout)
    return await delivery_of(service, job_id)


async def only_job(service: Huahua, chat: str) -> str:
    """The one job of a chat, once the service has made it."""

    async def made() -> bool:
        return bool(await service.store.recent_jobs(chat, 5))

    await until(made)
    [job] = await service.store.recent_jobs(chat, 5)
    return job.id


def message_id(call: Call) -> str:
    """The id of the message the fake made for an accepted send* call."""
    assert call.status == 200 and call.result is not None
    return str(call.result["message_id"])


async def test_each_done_job_picture_is_posted_exactly_once(tmp_path: Path, fake: FakeTelegram) -> None:
    users = [USER + n for n in range(5)]
    async with running(tmp_path, fake, PatternEngine(step_delay=0.02), workers=2) as service:
        for user in users:
            fake.send_text(user, user, f"/imagine 一只猫 --seed {user}")
        fake.send_text(GROUP, OTHER, "@huahua_bot 一只狗")
        chats = [f"tg:{user}" for user in users] + [f"tg:{GROUP}"]

        async def all_done() -> bool:
            jobs = [job for chat in chats for job in await service.store.recent_jobs(chat, 5)]
            return len(jobs) == len(chats) and all(job.status == JobStatus.DONE for job in jobs)

        await until(all_done, 20)
        for chat in chats:
            job_id = await only_job(service, chat)
            delivery = await sent_delivery(service, job_id)
            [picture] = pictures_posted(fake, job_id)
            assert message_id(picture) == delivery.message_id
            assert delivery.attempts == 1 and delivery.error is None
        await asyncio.sleep(POLL_S + 0.5)  # another turn of the outbox finds nothing left to post
        assert sum(len(fake.posted(method)) for method in RESULTS) == len(chats)


async def test_flood_control_waits_retry_after_then_posts_once(tmp_path: Path, fake: FakeTelegram) -> None:
    fake.fail_next("sendPhoto", 429, retry_after=1)
    async with running(tmp_path, fake) as service:
        fake.send_text(USER, USER, "/imagine 一只猫")
        refused, accepted = await fake.wait_for("sendPhoto", 2, chat_id=USER, timeout=15)
        job_id = await only_job(service, f"tg:{USER}")
        delivery = await sent_delivery(service, job_id)
        assert refused.status == 429 and accepted.status == 200
        assert accepted.at - refused.at >= 1.0
        assert pictures_posted(fake, job_id) == [accepted]
        assert delivery.attempts == 2 and delivery.error == "Telegram flood control"
        await asyncio.sleep(POLL_S + 0.5)
        assert len(fake.calls_of("sendPhoto")) == 2
        done = [e for e in fake.calls_of("editMessageText") if e.params["text"] == "✅ Done."]
        assert done and {e.params["message_id"] for e in done} == {done[0].params["message_id"]}


@pytest.mark.parametrize("failure", [500, 0], ids=["server-error", "dropped-connection"])
async def test_a_network_failure_is_retried_and_posted_once(
    tmp_path: Path, fake: FakeTelegram, failure: int
) -> None:
    fake.fail_next("sendPhoto", failure)
    async with running(tmp_path, fake) as service:
        fake.send_text(USER, USER, "/imagine 一只猫")
        failed, accepted = await fake.wait_for("sendPhoto", 2, chat_id=USER, timeout=15)
        job_id = await only_job(service, f"tg:{USER}")
        delivery = await sent_delivery(service, job_id)
        assert failed.status == failure and accepted.status == 200
        assert pictures_posted(fake, job_id) == [accepted]
        assert delivery.attempts == 2 and delivery.error == "NetworkError"
        assert delivery.message_id == message_id(accepted)


async def test_a_result_finished_while_the_bot_was_down_is_posted_once_after_restart(
    tmp_path: Path, fake: FakeTelegram
) -> None:
    gate = asyncio.Event()
    settings = make_settings(tmp_path, telegram_token=fake.token, telegram_base_url=fake.root)
    service = await build_service(settings, engine=PatternEngine(gate=gate))
    app = build_application(service, settings)
    await service.start()
    await start_application(app, settings, poll_timeout=1)
    try:
        asked = fake.send_text(USER, USER, "/imagine 一只猫")
        status = (await fake.wait_for("sendMessage", chat_id=USER))[0]
        job_id = await only_job(service, f"tg:{USER}")
        await stop_application(app)  # the adapter stops; the service (and its worker) go on
        gate.set()
        await until(lambda: _finished(service, job_id))
        await asyncio.sleep(POLL_S + 0.5)
        assert (await delivery_of(service, job_id)).state == DeliveryState.PENDING
        assert not fake.calls_of("sendPhoto")
    finally:
        gate.set()
        await service.stop()

    async with running(tmp_path, fake) as restarted:
        delivery = await sent_delivery(restarted, job_id)
    [picture] = pictures_posted(fake, job_id)
    assert picture.params["reply_parameters"]["message_id"] == asked["message_id"]
    assert delivery.message_id == message_id(picture)
    status_id = int(message_id(status))
    assert fake.calls_of("editMessageText")[-1].params == {
        "chat_id": USER,
        "message_id": status_id,
        "text": "✅ Done.",
    }

    async with running(tmp_path, fake) as again:
        await asyncio.sleep(POLL_S + 1.0)
        assert (await delivery_of(again, job_id)).attempts == 1
    assert len(fake.calls_of("sendPhoto")) == 1


async def _finished(service: Huahua, job_id: str) -> bool:
    return (await service.get_job(job_id)).status.finished


async def test_a_sent_result_is_not_posted_again_when_its_final_event_comes_again(
    tmp_path: Path, fake: FakeTelegram
) -> None:
    async with running(tmp_path, fake) as service:
        fake.send_text(USER, USER, "/imagine 一只猫")
        await fake.wait_for("sendPhoto", chat_id=USER)
        job_id = await only_job(service, f"tg:{USER}")
        await sent_delivery(service, job_id)
        job = await service.get_job(job_id)
        for _ in range(2):  # as a relay would hand another process's final event to this one
            service.events.deliver(job, JobEvent(job.id, EventType.DONE, progress=1.0))
        await service.events.drain()
        await asyncio.sleep(POLL_S + 0.5)
        assert len(pictures_posted(fake, job_id)) == 1
        assert (await delivery_of(service, job_id)).attempts == 1


async def test_a_chat_that_removed_the_bot_is_given_up_without_retries(
    tmp_path: Path, fake: FakeTelegram, caplog: pytest.LogCaptureFixture
) -> None:
    gate = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="core.outbox")
    async with running(tmp_path, fake, PatternEngine(gate=gate)) as service:
        fake.send_text(GROUP, USER, "@huahua_bot 一只猫")
        await fake.wait_for("sendMessage", chat_id=GROUP)
        job_id = await only_job(service, f"tg:{GROUP}")
        fake.forbidden.add(GROUP)  # the bot is removed from the group while it draws
        gate.set()

        async def dead() -> bool:
            deliveries = await service.store.deliveries(job_id)
            return bool(deliveries) and deliveries[0].state == DeliveryState.DEAD

        await until(dead, 10)
        calls = len(fake.calls)
        await asyncio.sleep(POLL_S + 1.0)
        delivery = await delivery_of(service, job_id)
        assert delivery.attempts == 1 and "kicked" in (delivery.error or "")
        assert len(fake.calls) == calls and not fake.calls_of("sendPhoto")
    assert "gave up delivering" in caplog.text
