"""Discord results through the outbox: real discord.py and service against the fake Discord REST server,
which counts every message it makes per job and scripts rate limits, outages and closed channels."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.outbox import POLL_S
from core.service import Huahua
from core.types import Delivery, DeliveryState, EventType, JobEvent, JobStatus
from tests.fake_discord import APP_ID, LOST_ANSWER, Call, FakeDiscord
from tests.support import PatternEngine, until
from tests.test_discord_bot import (
    ADMIN,
    ALICE,
    BOB,
    CHANNEL,
    Env,
    channel_posts,
    edits,
    followups,
    job_id_in,
    slash,
    start_bot,
    stop_bot,
)

pytestmark = [pytest.mark.timeout(90)]

FOLLOW_UPS = rf"/webhooks/{APP_ID}/[^/]+"
CHANNEL_MESSAGES = rf"/channels/{CHANNEL}/messages"
EXPIRED = datetime.timedelta(minutes=16)
"""An interaction this old has no live token: its result goes to the channel."""


@pytest.fixture
async def env(tmp_path: Path, api: FakeDiscord) -> AsyncIterator[Env]:
    env = await start_bot(tmp_path, api, PatternEngine())
    yield env
    await stop_bot(env)


def made_for(api: FakeDiscord, job_id: str) -> list[Call]:
    """The messages the fake made that carry this job's buttons (its results)."""
    return [c for c in api.messages_made() if c.custom_ids() and job_id_in(c) == job_id]


async def deliveries(service: Huahua, job_id: str) -> list[Delivery]:
    return await service.store.deliveries(job_id)


async def settled(service: Huahua, job_id: str, state: DeliveryState) -> Delivery:
    """The job's delivery once it reached `state`."""

    async def reached() -> bool:
        found = await deliveries(service, job_id)
        return bool(found) and found[0].state == state

    await until(reached, 15)
    [delivery] = await deliveries(service, job_id)
    return delivery


async def job_of(api: FakeDiscord, sent: dict[str, object]) -> str:
    """The job a slash command started, from the cancel button of its first status edit."""
    await api.wait_for(lambda: edits(api, sent))
    return job_id_in(edits(api, sent)[0])


async def test_each_done_job_is_posted_exactly_once(env: Env) -> None:
    users = [ALICE, BOB, ADMIN, ALICE + 10]
    sent = [slash(env, "imagine", prompt=f"a lantern number {n}", user=user) for n, user in enumerate(users)]
    results = [(await env.api.wait_for(lambda s=s: followups(env.api, s)))[0] for s in sent]
    for result in results:
        job_id = job_id_in(result)
        assert (await env.service.get_job(job_id)).status == JobStatus.DONE
        delivery = await settled(env.service, job_id, DeliveryState.SENT)
        assert made_for(env.api, job_id) == [result]
        assert result.made is not None and delivery.message_id == result.made["id"]
        assert delivery.attempts == 1
    await asyncio.sleep(POLL_S + 0.5)
    assert len(env.api.messages_made()) == len(users)


@pytest.mark.parametrize("via", [True, False], ids=["discord-rate-limit", "cloudflare-429"])
async def test_a_rate_limited_result_waits_then_is_posted_once(env: Env, via: bool) -> None:
    """Discord's own 429 (with `Via`) is waited out by discord.py; a bare one goes back to the outbox
    with its Retry-After."""
    env.api.fail_next("POST", FOLLOW_UPS, 429, retry_after=1.0, via=via)
    sent = slash(env, "imagine", prompt="a busy harbour")
    job_id = await job_of(env.api, sent)
    delivery = await settled(env.service, job_id, DeliveryState.SENT)
    refused, accepted = followups(env.api, sent)
    assert refused.status == 429 and accepted.status == 200
    assert accepted.at - refused.at >= 1.0
    assert made_for(env.api, job_id) == [accepted]
    assert delivery.attempts == (1 if via else 2)
    if not via:
        assert "rate limit" in (delivery.error or "")


@pytest.mark.parametrize("failure", [500, 0], ids=["server-error", "dropped-connection"])
async def test_a_network_failure_is_retried_and_posted_once(env: Env, failure: int) -> None:
    env.api.fail_next("POST", FOLLOW_UPS, failure)
    sent = slash(env, "imagine", prompt="a foggy bridge")
    job_id = await job_of(env.api, sent)
    delivery = await settled(env.service, job_id, DeliveryState.SENT)
    failed, accepted = followups(env.api, sent)
    assert failed.status == failure and accepted.status == 200
    assert made_for(env.api, job_id) == [accepted]
    assert accepted.made is not None and delivery.message_id == accepted.made["id"]


async def test_a_result_finished_while_the_bot_was_down_is_posted_once_after_restart(
    tmp_path: Path, api: FakeDiscord
) -> None:
    gate = asyncio.Event()
    first = await start_bot(tmp_path, api, PatternEngine(gate=gate))
    try:
        sent = slash(first, "imagine", prompt="a patient heron")
        job_id = await job_of(api, sent)
        await first.client.close()  # the adapter stops; the service (and its worker) go on
        gate.set()

        async def finished() -> bool:
            return (await first.service.get_job(job_id)).status.finished

        await until(finished)
        await asyncio.sleep(POLL_S + 0.5)
        assert (await deliveries(first.service, job_id))[0].state == DeliveryState.PENDING
        assert not followups(api, sent)
    finally:
        gate.set()
        await first.service.stop()

    second = await start_bot(tmp_path, api, PatternEngine())
    try:
        delivery = await settled(second.service, job_id, DeliveryState.SENT)
    finally:
        await stop_bot(second)
    [result] = followups(api, sent)
    assert made_for(api, job_id) == [result] and result.files
    assert result.made is not None and delivery.message_id == result.made["id"]
    assert edits(api, sent)[-1].json["content"] == "✅ Done."

    third = await start_bot(tmp_path, api, PatternEngine())
    try:
        await asyncio.sleep(POLL_S + 1.0)
        assert (await deliveries(third.service, job_id))[0].attempts == 1
    finally:
        await stop_bot(third)
    assert len(followups(api, sent)) == 1


async def test_a_sent_result_is_not_posted_again_when_its_final_event_comes_again(env: Env) -> None:
    sent = slash(env, "imagine", prompt="a paper lantern")
    job_id = await job_of(env.api, sent)
    await settled(env.service, job_id, DeliveryState.SENT)
    job = await env.service.get_job(job_id)
    for _ in range(2):  # as a relay would hand another process's final event to this one
        env.service.events.deliver(job, JobEvent(job.id, EventType.DONE, progress=1.0))
    await env.service.events.drain()
    await asyncio.sleep(POLL_S + 0.5)
    assert len(made_for(env.api, job_id)) == 1 and len(followups(env.api, sent)) == 1
    assert (await deliveries(env.service, job_id))[0].attempts == 1


async def test_a_channel_closed_to_the_bot_is_given_up_without_retries(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="core.outbox")
    env.api.forbidden_channels.add(CHANNEL)  # the bot lost access to the channel
    slash(env, "imagine", prompt="a locked door", age=EXPIRED)
    (refused,) = await env.api.wait_for(lambda: channel_posts(env.api))
    job_id = job_id_in(refused)
    delivery = await settled(env.service, job_id, DeliveryState.DEAD)
    assert refused.status == 403 and delivery.attempts == 1 and "403" in (delivery.error or "")
    calls = len(env.api.calls)
    await asyncio.sleep(POLL_S + 1.0)
    assert len(env.api.calls) == calls and not env.api.messages_made()
    assert "gave up delivering" in caplog.text


async def test_a_channel_post_whose_answer_was_lost_is_not_posted_twice(env: Env) -> None:
    """Discord made the message but its answer never arrived: the retry carries the same nonce, and
    Discord answers it with the message it already made."""
    env.api.fail_next("POST", CHANNEL_MESSAGES, LOST_ANSWER)
    slash(env, "imagine", prompt="a lost letter", age=EXPIRED)
    first, again = await env.api.wait_for(lambda: len(channel_posts(env.api)) >= 2 and channel_posts(env.api))
    job_id = job_id_in(first)
    delivery = await settled(env.service, job_id, DeliveryState.SENT)
    assert first.status == LOST_ANSWER and again.status == 200
    assert first.json["nonce"] == again.json["nonce"] and first.json["enforce_nonce"] is True
    assert made_for(env.api, job_id) == [first]
    assert first.made is not None and delivery.message_id == first.made["id"]
    assert delivery.attempts == 2
