"""The service end to end on a real SQLite file, with the deterministic test engine."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from core.moderation import BLOCKED_MESSAGE
from core.service import MessageContext
from core.settings import Settings
from core.types import Action, EventType, JobStatus
from tests.support import PatternEngine, make_service, until


async def _events(service, job_id):
    return [event async for event in service.subscribe(job_id)]


async def test_imagine_runs_to_done_with_prompt_and_params(tmp_path):
    service = await make_service(tmp_path, engine=PatternEngine(), engine_name="wukong")
    try:
        reply = await service.handle_message(
            "web:room", "web:ann", "/imagine 一只在月球上看书的猫 --ar 3:2 --seed 7"
        )
        assert reply.job is not None
        events = await _events(service, reply.job.id)
        assert events[-1].type == EventType.DONE
        progress = [e for e in events if e.type == EventType.PROGRESS]
        assert progress and progress[-1].step == progress[-1].total_steps
        job = await service.get_job(reply.job.id)
        assert job.status == JobStatus.DONE
        assert job.request.seed == 7
        assert "猫" in job.request.prompt and "月球" in job.request.prompt
        assert job.request.width > job.request.height
        assert job.request.width % 64 == 0 and job.request.height % 64 == 0
        assert abs(job.request.width / job.request.height - 1.5) < 0.2
        assert len(job.images) == 1
        png = await service.image(job.images[0])
        assert png.startswith(b"\x89PNG")
    finally:
        await service.stop()


async def test_english_text_is_translated_to_chinese(tmp_path):
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        reply = await service.handle_message(
            "web:room", "web:ann", "/imagine a cat reading a book on the moon"
        )
        assert reply.job is not None
        prompt = reply.job.request.prompt
        assert "猫" in prompt and "月" in prompt
        assert not any(word in prompt for word in ("cat", "moon"))
    finally:
        await service.stop()


@pytest.mark.parametrize(
    "text",
    [
        "/imagine",
        "/imagine    ",
        "/imagine a cat --n 9",
        "/imagine a cat --ar banana",
        "/imagine cat --bogus 3",
    ],
)
async def test_bad_options_answer_one_sentence_and_queue_nothing(tmp_path, text):
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        reply = await service.handle_message("web:room", "web:ann", text)
        assert reply.job is None
        assert len(reply.texts) == 1 and reply.texts[0].strip()
        assert await service.queue.size() == 0
    finally:
        await service.stop()


async def test_huge_message_is_refused_politely(tmp_path):
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        reply = await service.handle_message("web:room", "web:ann", "/imagine " + "猫" * 100_000)
        assert reply.job is None and "too long" in reply.texts[0]
    finally:
        await service.stop()


async def test_blocked_prompt_is_refused_and_counted(tmp_path):
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        blocked = _first_blocklist_term(service)
        reply = await service.handle_message("web:room", "web:ann", f"/imagine {blocked}")
        assert reply.job is None
        assert reply.texts == (BLOCKED_MESSAGE,) and blocked not in reply.texts[0]

        async def counted() -> bool:
            return (await service.store.counters()).get("blocked") == 1

        await until(counted)
    finally:
        await service.stop()


def _first_blocklist_term(service, *, chinese: bool = False) -> str:
    path = service.settings.prompts_dir / "blocklist.txt"
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and (not chinese or not line.isascii()):
            return line
    raise AssertionError("the blocklist is empty")


async def test_english_that_translates_into_a_blocked_term_is_refused(tmp_path):
    """The Chinese prompt is moderated too, not only the user's text: an English word that the glossary
    turns into a blocked Chinese term is refused, while the English text itself passes."""
    prompts = tmp_path / "prompts"
    shutil.copytree(Settings(_env_file=None).prompts_dir, prompts)  # type: ignore[call-arg]
    plain = await make_service(tmp_path / "plain", engine=PatternEngine())
    try:
        blocked = _first_blocklist_term(plain, chinese=True)
        accepted = await plain.handle_message("web:room", "web:ann", "/imagine a glorbish cat")
        assert accepted.job is not None  # "glorbish" is no word to the glossary or the blocklist
    finally:
        await plain.stop()
    with (prompts / "glossary.tsv").open("a", encoding="utf-8") as glossary:
        glossary.write(f"glorbish\t{blocked}\n")
    engine = PatternEngine()
    service = await make_service(tmp_path / "glossary", engine=engine, prompts_dir=prompts)
    try:
        reply = await service.handle_message("web:room", "web:ann", "/imagine a glorbish cat")
        assert reply.job is None and reply.texts == (BLOCKED_MESSAGE,)
        assert await service.queue.size() == 0 and not engine.requests
    finally:
        await service.stop()


async def test_daily_quota_counts_images(tmp_path):
    service = await make_service(tmp_path, engine=PatternEngine(), daily_image_quota=3)
    try:
        first = await service.handle_message("web:room", "web:ann", "/imagine 猫 --n 2")
        assert first.job is not None
        second = await service.handle_message("web:room", "web:ann", "/imagine 狗 --n 2")
        assert second.job is None and "quota" in second.texts[0].lower()
        other_user = await service.handle_message("web:room", "web:bob", "/imagine 狗 --n 2")
        assert other_user.job is not None
    finally:
        await service.stop()


async def test_cancel_queued_and_running_jobs(tmp_path):
    gate = asyncio.Event()
    service = await make_service(tmp_path, engine=PatternEngine(gate=gate))
    try:
        running = (await service.handle_message("web:room", "web:ann", "/imagine 猫")).job
        queued = (await service.handle_message("web:room", "web:bob", "/imagine 狗")).job

        async def started() -> bool:
            return (await service.get_job(running.id)).status == JobStatus.RUNNING

        await until(started)
        assert await service.position(queued.id) == 1
        cancelled = await service.act(queued.id, Action.CANCEL, 0, "web:bob")
        assert cancelled.status == JobStatus.CANCELLED
        with pytest.raises(Exception, match="Only the person"):
            await service.cancel(running.id, "web:bob")
        await service.cancel(running.id, "web:ann")
        gate.set()
        events = await _events(service, running.id)
        assert events[-1].type == EventType.CANCELLED
        assert (await service.get_job(running.id)).status == JobStatus.CANCELLED
    finally:
        gate.set()
        await service.stop()


async def test_jobs_queued_at_shutdown_run_after_restart(tmp_path):
    gate = asyncio.Event()
    service = await make_service(tmp_path, engine=PatternEngine(gate=gate))
    running = (await service.handle_message("web:room", "web:ann", "/imagine 猫")).job
    waiting = (await service.handle_message("web:room", "web:bob", "/imagine 狗")).job

    async def started() -> bool:
        return (await service.get_job(running.id)).status == JobStatus.RUNNING

    await until(started)
    await service.stop()

    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        for job in (running, waiting):
            events = await _events(service, job.id)
            assert events[-1].type == EventType.DONE
            assert (await service.get_job(job.id)).images
    finally:
        await service.stop()


async def test_reroll_variation_and_upscale(tmp_path):
    engine = PatternEngine()
    service = await make_service(tmp_path, engine=engine)
    try:
        parent = (await service.handle_message("web:room", "web:ann", "/imagine 猫 --n 2 --seed 5")).job
        await _events(service, parent.id)
        reroll = await service.act(parent.id, Action.REROLL, 0, "web:bob")
        variation = await service.act(parent.id, Action.VARIATION, 1, "web:bob")
        upscale = await service.act(parent.id, Action.UPSCALE, 0, "web:ann")
        for job in (reroll, variation, upscale):
            assert (await _events(service, job.id))[-1].type == EventType.DONE
        assert reroll.request.prompt == parent.request.prompt and reroll.request.seed != 5
        assert reroll.request.init_image is None
        done_parent = await service.get_job(parent.id)
        by_prompt = {id(r): r for r in engine.requests}
        variation_request = next(r for r in by_prompt.values() if r.strength == variation.request.strength)
        assert variation_request.init_image == await service.image(done_parent.images[1])
        assert 0 < variation.request.strength < 1 and variation.request.n == 1
        assert upscale.request.width == 2 * parent.request.width
        assert upscale.parent_id == parent.id and upscale.parent_index == 0
        with pytest.raises(Exception, match="from 1 to 2"):
            await service.act(parent.id, Action.UPSCALE, 5, "web:ann")
        with pytest.raises(Exception, match="reroll, variation, upscale"):
            await service.act(parent.id, "explode", 0, "web:ann")
    finally:
        await service.stop()


async def test_variation_and_upscale_strengths_reach_the_engine(tmp_path):
    """A variation redraws its picture at strength 0.6, an upscale at 0.35 (docs/architecture.md)."""
    engine = PatternEngine()
    service = await make_service(tmp_path, engine=engine)
    try:
        parent = (await service.handle_message("web:room", "web:ann", "/imagine 猫 --seed 5")).job
        await _events(service, parent.id)
        picture = await service.image((await service.get_job(parent.id)).images[0])
        for action, strength, scale in ((Action.VARIATION, 0.6, 1), (Action.UPSCALE, 0.35, 2)):
            child = await service.act(parent.id, action, 0, "web:ann")
            assert (await _events(service, child.id))[-1].type == EventType.DONE
            request = engine.requests[-1]
            assert request.init_image == picture and request.strength == strength, action
            assert (request.width, request.height) == (
                scale * parent.request.width,
                scale * parent.request.height,
            )
        assert [r.init_image is None for r in engine.requests] == [True, False, False]
    finally:
        await service.stop()


async def test_settings_command(tmp_path):
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        refused = await service.handle_message(
            "tg:-1", "tg:2", "/settings style 水墨画", MessageContext(is_admin=False)
        )
        assert "admins" in refused.texts[0]
        saved = await service.handle_message(
            "tg:-1", "tg:1", "/settings style 水墨画", MessageContext(is_admin=True)
        )
        assert "水墨画" in saved.texts[0]
        job = (await service.handle_message("tg:-1", "tg:2", "/imagine 山")).job
        assert job is not None and (await service.chat_settings("tg:-1")).style == "水墨画"
        unknown = await service.handle_message(
            "tg:-1", "tg:1", "/settings colour red", MessageContext(is_admin=True)
        )
        assert "Unknown setting" in unknown.texts[0]
    finally:
        await service.stop()


async def test_unknown_command_and_help(tmp_path):
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        assert "/imagine" in (await service.handle_message("web:r", "web:a", "/help")).texts[0]
        assert "/help" in (await service.handle_message("web:r", "web:a", "/frobnicate")).texts[0]
        assert (await service.handle_message("web:r", "web:a", "just chatting")).texts == ()
    finally:
        await service.stop()


async def test_without_weights_imagine_answers_with_the_fetch_command(tmp_path):
    service = await make_service(tmp_path, engine_name="wukong")
    try:
        reply = await service.handle_message("web:room", "web:ann", "/imagine 一只猫")
        assert reply.job is None
        assert "huahua model fetch" in reply.texts[0]
        assert await service.queue.size() == 0
    finally:
        await service.stop()
