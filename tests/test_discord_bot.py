"""The Discord adapter end to end: real discord.py and service, a fake Discord REST server on loopback.

There is no gateway: interactions are built from raw payloads and dispatched through the client's
connection state, exactly as a gateway INTERACTION_CREATE would be.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import itertools
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
from PIL import Image

from bots.discord import HuahuaBot, build_client, run_discord
from bots.discord.files import fit_image
from bots.discord.target import Target
from bots.discord.views import custom_id
from core.errors import HuahuaError
from core.moderation import BLOCKED_MESSAGE
from core.options import AR_RULE
from core.service import Huahua
from core.types import Action, JobKind, JobStatus
from tests.fake_discord import APP_ID, VALID_TOKEN, Call, FakeDiscord, message_payload, user_payload
from tests.support import NO_MINDSPORE, PatternEngine, make_service, make_settings

pytestmark = [pytest.mark.timeout(60)]

GUILD = 4100000000000000001
CHANNEL = 4100000000000000002
GALLERY = 4100000000000000003
ALICE = 4200000000000000001
BOB = 4200000000000000002
ADMIN = 4200000000000000003
MANAGE_GUILD = 1 << 5
MEMBER_PERMS = (1 << 10) | (1 << 11) | (1 << 15) | (1 << 31)  # view, send, attach, use app commands
BIG_LIMIT = 10 * 1024 * 1024
_tokens = itertools.count(1)


# fixtures -------------------------------------------------------------------------------------


@dataclass
class Env:
    api: FakeDiscord
    service: Huahua
    client: HuahuaBot
    engine: PatternEngine


async def start_bot(
    tmp_path: Path, api: FakeDiscord, engine: PatternEngine, *, edit_interval: float = 0.0, **overrides: Any
) -> Env:
    service = await make_service(tmp_path, engine, **overrides)
    settings = make_settings(tmp_path, discord_guild_id=GUILD, **overrides)
    client = build_client(service, settings, edit_interval=edit_interval)
    await client.login(VALID_TOKEN)
    return Env(api, service, client, engine)


async def stop_bot(env: Env) -> None:
    await env.client.close()
    await env.service.stop()


@pytest.fixture
async def env(tmp_path: Path, api: FakeDiscord) -> AsyncIterator[Env]:
    env = await start_bot(tmp_path, api, PatternEngine())
    yield env
    await stop_bot(env)


# payloads -------------------------------------------------------------------------------------


def _member(user_id: int, permissions: int) -> dict[str, Any]:
    return {
        "user": user_payload(user_id, f"user{user_id % 1000}"),
        "roles": [],
        "joined_at": "2024-01-01T00:00:00+00:00",
        "deaf": False,
        "mute": False,
        "flags": 0,
        "permissions": str(permissions),
    }


def _interaction(
    kind: int,
    data: dict[str, Any],
    *,
    user: int = ALICE,
    permissions: int = MEMBER_PERMS,
    age: datetime.timedelta = datetime.timedelta(0),
    size_limit: int = BIG_LIMIT,
    message: dict[str, Any] | None = None,
) -> dict[str, Any]:
    created = discord.utils.utcnow() - age
    payload: dict[str, Any] = {
        "id": str(discord.utils.time_snowflake(created) + next(_tokens)),
        "application_id": str(APP_ID),
        "type": kind,
        "token": f"interaction-token-{next(_tokens)}",
        "version": 1,
        "guild_id": str(GUILD),
        "channel_id": str(CHANNEL),
        "channel": {"id": str(CHANNEL), "type": 0, "guild_id": str(GUILD), "name": "general", "position": 0},
        "member": _member(user, permissions),
        "data": data,
        "locale": "en-US",
        "guild_locale": "en-US",
        "app_permissions": str(MEMBER_PERMS),
        "entitlements": [],
        "authorizing_integration_owners": {"0": str(GUILD)},
        "context": 0,
        "attachment_size_limit": size_limit,
    }
    if message is not None:
        payload["message"] = message
    return payload


def command(
    name: str, resolved: dict[str, Any] | None = None, /, *, sub: str | None = None, **options: Any
) -> dict[str, Any]:
    """A slash command's data; `sub` nests the options under that subcommand."""
    types = {str: 3, int: 4, bool: 5}
    given = [
        {"name": key, "type": 7 if key == "gallery" else types[type(value)], "value": value}
        for key, value in options.items()
    ]
    data: dict[str, Any] = {
        "id": "4300000000000000001",
        "name": name,
        "type": 1,
        "options": given if sub is None else [{"name": sub, "type": 1, "options": given}],
    }
    if resolved:
        data["resolved"] = resolved
    return data


def dispatch(env: Env, payload: dict[str, Any]) -> dict[str, Any]:
    env.client._connection.parse_interaction_create(payload)  # type: ignore[arg-type]
    return payload


def slash(
    env: Env,
    name: str,
    /,
    *,
    resolved: dict[str, Any] | None = None,
    sub: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    interaction_args = {k: kwargs.pop(k) for k in ("user", "permissions", "age", "size_limit") if k in kwargs}
    return dispatch(env, _interaction(2, command(name, resolved, sub=sub, **kwargs), **interaction_args))


def press(env: Env, cid: str, *, source: Call | None = None, user: int = ALICE) -> dict[str, Any]:
    """Click a button on `source` (a message we sent), or on a message holding just that button."""
    if source is not None:
        assert cid in source.custom_ids()
        components = source.json["components"]
    else:
        components = [{"type": 1, "components": [{"type": 2, "style": 2, "label": "?", "custom_id": cid}]}]
    message = message_payload({"content": "result", "components": components}, channel_id=CHANNEL, parts=())
    data = {"custom_id": cid, "component_type": 2}
    return dispatch(env, _interaction(3, data, user=user, message=message))


# queries on the fake's log ---------------------------------------------------------------------


def callbacks(api: FakeDiscord, payload: dict[str, Any]) -> list[Call]:
    return api.find("POST", rf"/interactions/{payload['id']}/{payload['token']}/callback")


def edits(api: FakeDiscord, payload: dict[str, Any]) -> list[Call]:
    return api.find("PATCH", rf"/webhooks/{APP_ID}/{payload['token']}/messages/@original")


def followups(api: FakeDiscord, payload: dict[str, Any]) -> list[Call]:
    return api.find("POST", rf"/webhooks/{APP_ID}/{payload['token']}")


def channel_posts(api: FakeDiscord, channel: int = CHANNEL) -> list[Call]:
    return api.find("POST", rf"/channels/{channel}/messages")


def job_id_in(call: Call) -> str:
    ids = {cid.rsplit(":", 1)[1] for cid in call.custom_ids()}
    assert len(ids) == 1, call.custom_ids()
    return ids.pop()


async def answer_text(api: FakeDiscord, payload: dict[str, Any]) -> str:
    """The text of the (deferred) response: the last edit of @original, or a type-4 callback."""
    await api.wait_for(
        lambda: edits(api, payload) or [c for c in callbacks(api, payload) if c.json["type"] == 4]
    )
    done = edits(api, payload)
    if done:
        return str(done[-1].json["content"])
    return str(callbacks(api, payload)[-1].json["data"]["content"])


def blocked_term() -> str:
    for line in (
        (Path(__file__).resolve().parents[1] / "prompts" / "blocklist.txt").read_text("utf-8").splitlines()
    ):
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            return line
    raise AssertionError("the blocklist has no terms")


# tests ----------------------------------------------------------------------------------------


async def test_commands_are_synced_to_the_guild_with_typed_options(env: Env) -> None:
    (sync,) = env.api.find("PUT", rf"/applications/{APP_ID}/guilds/{GUILD}/commands")
    commands = {c["name"]: c for c in sync.json}
    assert {"imagine", "settings", "share", "help"} <= set(commands)
    for name in env.service.commands():
        if name and name not in ("help", "start"):
            assert name in commands
    options = {o["name"]: o for o in commands["imagine"]["options"]}
    assert list(options) == ["prompt", "ar", "seed", "steps", "n", "negative", "style"]
    assert options["prompt"]["required"] is True and options["prompt"]["type"] == 3
    assert options["n"]["type"] == 4 and (options["n"]["min_value"], options["n"]["max_value"]) == (1, 4)
    assert options["style"]["autocomplete"] is True
    settings = {o["name"]: o for o in commands["settings"]["options"]}
    assert settings["gallery"]["type"] == 7 and settings["enabled"]["type"] == 5


async def test_imagine_defers_edits_progress_and_follows_up_with_images_and_buttons(env: Env) -> None:
    created = time.monotonic()
    sent = slash(env, "imagine", prompt="a red cat", n=2)
    result = (await env.api.wait_for(lambda: followups(env.api, sent)))[0]

    (defer,) = callbacks(env.api, sent)
    assert defer.json["type"] == 5 and defer.json["data"]["flags"] == 64
    assert defer.at - created < 3  # within Discord's 3-second window for the first response
    assert all(defer.at <= c.at for c in edits(env.api, sent) + followups(env.api, sent))
    job_id = job_id_in(result)
    job = await env.service.get_job(job_id)
    assert job.status == JobStatus.DONE and job.chat == f"dc:{CHANNEL}" and job.user == f"dc:{ALICE}"
    assert job.request.n == 2 and len(job.images) == 2
    assert [p.data for p in result.files] == [await env.service.image(d) for d in job.images]
    assert [p.filename for p in result.files] == [f"huahua-{job_id}-1.png", f"huahua-{job_id}-2.png"]
    expected = {custom_id(a, i, job_id) for a in (Action.VARIATION, Action.UPSCALE) for i in (0, 1)}
    assert set(result.custom_ids()) == expected | {custom_id(Action.REROLL, 0, job_id)}
    assert (
        job.request.prompt in result.json["content"] and f"seed {job.request.seed}" in result.json["content"]
    )

    changes = [c.json["content"] for c in edits(env.api, sent)]
    assert any("Queued" in text or "Drawing" in text for text in changes)
    assert custom_id(Action.CANCEL, 0, job_id) in edits(env.api, sent)[0].custom_ids()
    await env.api.wait_for(lambda: "Done" in edits(env.api, sent)[-1].json["content"])
    assert edits(env.api, sent)[-1].json["components"] == []


async def test_progress_edits_are_throttled(tmp_path: Path, api: FakeDiscord) -> None:
    env = await start_bot(tmp_path, api, PatternEngine(step_delay=0.04), edit_interval=0.25)
    try:
        sent = slash(env, "imagine", prompt="a lighthouse", steps=20)
        await api.wait_for(lambda: followups(api, sent))
        progress = [c for c in edits(api, sent) if "Drawing" in c.json["content"]]
        assert 1 <= len(progress) < 20, [c.json["content"] for c in progress]  # 20 steps
        gaps = [b.at - a.at for a, b in itertools.pairwise(progress)]
        assert all(gap >= 0.15 for gap in gaps), gaps  # sent >= 0.25 s apart
    finally:
        await stop_bot(env)


async def test_reroll_and_variation_buttons_deliver_new_jobs(env: Env) -> None:
    sent = slash(env, "imagine", prompt="a quiet lake", seed=5)
    parent = (await env.api.wait_for(lambda: followups(env.api, sent)))[0]
    parent_id = job_id_in(parent)

    reroll = press(env, custom_id(Action.REROLL, 0, parent_id), source=parent, user=BOB)
    rerolled = (await env.api.wait_for(lambda: followups(env.api, reroll)))[0]
    assert callbacks(env.api, reroll)[0].json["type"] == 5
    child = await env.service.get_job(job_id_in(rerolled))
    assert child.kind == JobKind.REROLL and child.parent_id == parent_id and child.user == f"dc:{BOB}"
    assert rerolled.files and rerolled.files[0].data == await env.service.image(child.images[0])

    variation = press(env, custom_id(Action.VARIATION, 0, parent_id), source=parent)
    varied = (await env.api.wait_for(lambda: followups(env.api, variation)))[0]
    child = await env.service.get_job(job_id_in(varied))
    assert child.kind == JobKind.VARIATION and child.parent_index == 0
    assert env.engine.requests[-1].init_image == await env.service.image(
        (await env.service.get_job(parent_id)).images[0]
    )


async def test_button_on_a_missing_job_answers_with_one_sentence(env: Env) -> None:
    sent = press(env, custom_id(Action.UPSCALE, 0, "0123456789abcdef"))
    assert "can't find" in await answer_text(env.api, sent)


async def test_cancel_button_stops_a_running_job_and_only_for_its_owner(
    tmp_path: Path, api: FakeDiscord
) -> None:
    gate = asyncio.Event()
    env = await start_bot(tmp_path, api, PatternEngine(gate=gate))
    try:
        sent = slash(env, "imagine", prompt="a slow dragon")
        await api.wait_for(lambda: any("Drawing" in c.json["content"] for c in edits(api, sent)))
        job_id = job_id_in(edits(api, sent)[0])

        status = edits(api, sent)[0]
        other = press(env, custom_id(Action.CANCEL, 0, job_id), source=status, user=BOB)
        assert "Only the person" in await answer_text(api, other)
        assert callbacks(api, other)[0].json["data"]["flags"] == 64

        mine = press(env, custom_id(Action.CANCEL, 0, job_id), source=status)
        await answer_text(api, mine)
        gate.set()
        await api.wait_for(lambda: "Cancelled" in edits(api, sent)[-1].json["content"])
        assert (await env.service.get_job(job_id)).status == JobStatus.CANCELLED
        assert not followups(api, sent)
    finally:
        gate.set()
        await stop_bot(env)


async def test_blocked_prompt_gets_an_ephemeral_sentence_and_no_job(env: Env) -> None:
    sent = slash(env, "imagine", prompt=f"draw {blocked_term()}")
    text = await answer_text(env.api, sent)
    assert callbacks(env.api, sent)[0].json["data"]["flags"] == 64
    assert text == BLOCKED_MESSAGE
    await asyncio.sleep(0.1)
    assert not followups(env.api, sent) and not env.engine.requests


async def test_an_unexpected_error_still_answers_one_sentence(env: Env) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk on fire")

    env.service.imagine = broken  # type: ignore[method-assign]
    sent = slash(env, "imagine", prompt="a cat")
    text = await answer_text(env.api, sent)
    assert "went wrong" in text and "disk" not in text


async def test_invalid_option_is_one_sentence(env: Env) -> None:
    sent = slash(env, "imagine", prompt="a cat", ar="banana")
    text = await answer_text(env.api, sent)
    assert text == AR_RULE
    assert not env.engine.requests


async def test_settings_show_and_admin_only_changes(env: Env) -> None:
    shown = slash(env, "settings")
    assert "Settings for this chat" in await answer_text(env.api, shown)

    refused = slash(env, "settings", quota=3)
    assert "Manage Server" in await answer_text(env.api, refused)
    assert (await env.service.chat_settings(f"dc:{CHANNEL}")).daily_quota is None

    style = env.service.styles.names[0]
    saved = slash(
        env, "settings", permissions=MEMBER_PERMS | MANAGE_GUILD, quota=3, style=style, enabled=True
    )
    assert "Saved" in await answer_text(env.api, saved)
    current = await env.service.chat_settings(f"dc:{CHANNEL}")
    assert (current.daily_quota, current.style, current.enabled) == (3, style, True)


async def test_style_autocomplete_offers_the_service_styles(env: Env) -> None:
    name = env.service.styles.names[0]
    data = command("imagine", prompt="x", style=name[:1])
    data["options"][-1]["focused"] = True
    sent = dispatch(env, _interaction(4, data))
    (answer,) = await env.api.wait_for(lambda: callbacks(env.api, sent))
    assert answer.json["type"] == 8
    assert name in [c["value"] for c in answer.json["data"]["choices"]]


async def test_share_posts_the_last_result_to_the_gallery_channel(env: Env) -> None:
    resolved = {
        "channels": {str(GALLERY): {"id": str(GALLERY), "type": 0, "name": "gallery", "permissions": "0"}}
    }
    no_gallery = slash(env, "share", sub="picture")
    assert "nothing to share" in (await answer_text(env.api, no_gallery)).lower()

    setup = slash(
        env, "settings", permissions=MEMBER_PERMS | MANAGE_GUILD, gallery=str(GALLERY), resolved=resolved
    )
    assert "Saved" in await answer_text(env.api, setup)
    assert (await env.service.chat_settings(f"dc:guild:{GUILD}")).gallery == str(GALLERY)

    sent = slash(env, "imagine", prompt="a paper boat")
    job_id = job_id_in((await env.api.wait_for(lambda: followups(env.api, sent)))[0])

    stranger = slash(env, "share", sub="picture", user=BOB, job=job_id)
    assert "Only the person" in await answer_text(env.api, stranger)

    shared = slash(env, "share", sub="picture")
    assert f"<#{GALLERY}>" in await answer_text(env.api, shared)
    (post,) = channel_posts(env.api, GALLERY)
    job = await env.service.get_job(job_id)
    assert post.files[0].data == await env.service.image(job.images[0])
    assert f"<@{ALICE}>" in post.json["content"] and job.request.prompt in post.json["content"]


async def test_expired_interaction_falls_back_to_a_channel_message(env: Env) -> None:
    sent = slash(env, "imagine", prompt="an old clock", age=datetime.timedelta(minutes=16))
    (post,) = await env.api.wait_for(lambda: channel_posts(env.api))
    job_id = job_id_in(post)
    assert post.files and post.files[0].data == await env.service.image(
        (await env.service.get_job(job_id)).images[0]
    )
    assert f"<@{ALICE}>" in post.json["content"]
    assert not followups(env.api, sent) and not edits(env.api, sent)


async def test_revoked_token_falls_back_to_a_channel_message(tmp_path: Path, api: FakeDiscord) -> None:
    gate = asyncio.Event()
    env = await start_bot(tmp_path, api, PatternEngine(gate=gate))
    try:
        sent = slash(env, "imagine", prompt="a windmill")
        await api.wait_for(lambda: edits(api, sent))
        api.expired_tokens.add(sent["token"])  # Discord now answers 401 for this token
        gate.set()
        (post,) = await api.wait_for(lambda: channel_posts(api))
        job = await env.service.get_job(job_id_in(post))
        assert post.files[0].data == await env.service.image(job.images[0])
        assert f"<@{ALICE}>" in post.json["content"]
        (refused,) = followups(api, sent)  # tried first, answered 401
        assert refused.at <= post.at
    finally:
        gate.set()
        await stop_bot(env)


async def test_too_large_images_become_links(tmp_path: Path, api: FakeDiscord) -> None:
    env = await start_bot(tmp_path, api, PatternEngine(), public_url="https://huahua.example")
    try:
        sent = slash(env, "imagine", prompt="a tiny limit", size_limit=50)
        (result,) = await api.wait_for(lambda: followups(api, sent))
        job = await env.service.get_job(job_id_in(result))
        assert not result.files
        assert f"https://huahua.example/images/{job.images[0]}.png" in result.json["content"]
    finally:
        await stop_bot(env)


def test_fit_image_shrinks_to_jpeg_or_gives_up() -> None:
    noise = Image.effect_noise((256, 256), 80).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    png = buffer.getvalue()
    assert fit_image(png, len(png), "a") == ("a.png", png)
    name, data = fit_image(png, len(png) // 3, "a") or ("", b"")
    assert name == "a.jpg" and len(data) <= len(png) // 3 and Image.open(io.BytesIO(data)).format == "JPEG"
    assert fit_image(png, 40, "a") is None


async def test_results_are_delivered_after_a_restart(tmp_path: Path, api: FakeDiscord) -> None:
    gate = asyncio.Event()
    first = await start_bot(tmp_path, api, PatternEngine(gate=gate))
    sent = slash(first, "imagine", prompt="a patient heron")
    await api.wait_for(lambda: any("Drawing" in c.json["content"] for c in edits(api, sent)))
    job_id = job_id_in(edits(api, sent)[0])
    await stop_bot(first)
    gate.set()
    assert not followups(api, sent)

    second = await start_bot(tmp_path, api, PatternEngine())
    try:
        (result,) = await api.wait_for(lambda: followups(api, sent))
        assert job_id_in(result) == job_id and result.files
        assert (await second.service.get_job(job_id)).status == JobStatus.DONE
    finally:
        await stop_bot(second)


async def test_old_buttons_work_after_a_restart(tmp_path: Path, api: FakeDiscord) -> None:
    first = await start_bot(tmp_path, api, PatternEngine())
    sent = slash(first, "imagine", prompt="a red kite")
    source = (await api.wait_for(lambda: followups(api, sent)))[0]
    parent_id = job_id_in(source)
    await stop_bot(first)

    second = await start_bot(tmp_path, api, PatternEngine())
    try:
        upscale = press(second, custom_id(Action.UPSCALE, 0, parent_id), source=source)
        (result,) = await api.wait_for(lambda: followups(api, upscale))
        child = await second.service.get_job(job_id_in(result))
        parent = await second.service.get_job(parent_id)
        assert child.kind == JobKind.UPSCALE and child.request.width == 2 * parent.request.width
        assert result.files[0].data == await second.service.image(child.images[0])
    finally:
        await stop_bot(second)


def test_custom_ids_round_trip_through_the_template() -> None:
    from bots.discord.views import CUSTOM_ID

    cid = custom_id(Action.VARIATION, 3, "abcdef0123456789")
    match = CUSTOM_ID.fullmatch(cid)
    assert match and (match["action"], match["index"], match["job"]) == ("variation", "3", "abcdef0123456789")
    assert len(cid) <= 100
    assert not re.fullmatch(CUSTOM_ID, "hh:delete:0:abc")


async def test_story_commands_reply_and_their_pictures_are_delivered(env: Env) -> None:
    started = slash(env, "story", sub="new", title="The Fox and the Moon")
    assert "The Fox and the Moon" in await answer_text(env.api, started)
    assert callbacks(env.api, started)[0].json["type"] == 5
    assert "flags" not in (callbacks(env.api, started)[0].json.get("data") or {})  # public reply

    added = slash(env, "story", sub="add", excerpt="A red fox looks at the full moon over a snowy forest.")
    await answer_text(env.api, added)
    drawn = slash(env, "illustrate")
    (result,) = await env.api.wait_for(lambda: followups(env.api, drawn))
    job = await env.service.get_job(job_id_in(result))
    assert job.kind == JobKind.SCENE and job.chat == f"dc:{CHANNEL}"
    assert result.files[0].data == await env.service.image(job.images[0])
    assert custom_id(Action.CHOOSE, 0, job.id) in result.custom_ids()
    assert Target.from_meta(job.meta) is not None  # stored on the job: delivered after a restart too
    assert all("Drawing" not in c.json["content"] for c in edits(env.api, drawn))  # the reply stays


async def test_the_tiny_model_draws_through_discord(tmp_path: Path, api: FakeDiscord) -> None:
    pytest.importorskip("mindspore", reason=NO_MINDSPORE)
    settings = make_settings(tmp_path, discord_guild_id=GUILD)
    service = await make_service(tmp_path)  # engine "tiny": the real model code at a tiny size
    client = build_client(service, settings, edit_interval=0.0)
    await client.login(VALID_TOKEN)
    env = Env(api, service, client, PatternEngine())
    try:
        sent = slash(env, "imagine", prompt="一只猫", steps=2, seed=3)
        (result,) = await api.wait_for(lambda: followups(api, sent), limit_s=50)
        image = Image.open(io.BytesIO(result.files[0].data))
        job = await service.get_job(job_id_in(result))
        assert image.format == "PNG" and image.size == (job.request.width, job.request.height)
    finally:
        await stop_bot(env)


async def test_run_discord_refuses_a_missing_or_wrong_token(tmp_path: Path, api: FakeDiscord) -> None:
    service = await make_service(tmp_path, PatternEngine())
    try:
        with pytest.raises(HuahuaError, match="HUAHUA_DISCORD_TOKEN"):
            await run_discord(service, make_settings(tmp_path))
        with pytest.raises(HuahuaError, match="refused the bot token"):
            await run_discord(service, make_settings(tmp_path, discord_token="not-the-token"))
        assert api.find("GET", "/users/@me")
    finally:
        await service.stop()


def test_targets_round_trip_through_job_meta() -> None:
    target = Target(channel_id=5, guild_id=6, application_id=7, token="t", expires_at=1e9, size_limit=99)
    meta = {"story_id": "x", **target.to_meta()}
    assert Target.from_meta(meta) == target
    assert Target.from_meta({}) is None
    assert Target.from_meta({"discord_channel": "not a number"}) is None
    assert not target.token_alive(now=1e9) and target.token_alive(now=1e9 - 60)


async def test_share_finds_the_last_result_after_a_restart(tmp_path: Path, api: FakeDiscord) -> None:
    first = await start_bot(tmp_path, api, PatternEngine())
    resolved = {
        "channels": {str(GALLERY): {"id": str(GALLERY), "type": 0, "name": "gallery", "permissions": "0"}}
    }
    setup = slash(
        first, "settings", permissions=MEMBER_PERMS | MANAGE_GUILD, gallery=str(GALLERY), resolved=resolved
    )
    await answer_text(api, setup)
    sent = slash(first, "imagine", prompt="a folded crane")
    job_id = job_id_in((await api.wait_for(lambda: followups(api, sent)))[0])
    other = slash(first, "imagine", prompt="someone else's crane", user=BOB)
    await api.wait_for(lambda: followups(api, other))
    await stop_bot(first)

    second = await start_bot(tmp_path, api, PatternEngine())
    try:
        shared = slash(second, "share", sub="picture")
        assert f"<#{GALLERY}>" in await answer_text(api, shared)
        (post,) = channel_posts(api, GALLERY)
        job = await second.service.get_job(job_id)
        assert post.files[0].data == await second.service.image(job.images[0])
    finally:
        await stop_bot(second)
