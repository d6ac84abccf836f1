"""Consistent characters in a story: cast reference pictures, /cast show, /story consistency, the
references reaching the engine (and changing the tiny model's drawing), and their storage."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image

from core.codec import job_from_dict, job_from_json, job_to_dict, job_to_json
from core.engine import CancelToken
from core.engines.http import HttpEngine, request_from_wire, request_to_wire
from core.engines.local import LocalEngine
from core.errors import InvalidOption
from core.service import MessageContext
from core.settings import Settings
from core.story.model import CastMember, Story, story_from_dict, story_to_dict
from core.types import EventType, GenerationRequest, JobKind
from core.worker_server import create_app
from tests.support import PatternEngine, jpeg_picture, make_service, png_claiming

CHAT, ANN = "web:room", "web:ann"


async def _say(service, text: str, user: str = ANN):  # type: ignore[no-untyped-def]
    return await service.handle_message(CHAT, user, text, MessageContext())


@contextlib.asynccontextmanager
async def _tiny_engine(tmp_path: Path) -> AsyncIterator[LocalEngine]:
    """The tiny model's engine (the real model code, random weights), started; skips without MindSpore."""
    pytest.importorskip("mindspore")
    from core.engines.local import tiny_engine

    settings = Settings(model_dir=tmp_path / "models", vocab_path=None, engine="tiny", _env_file=None)  # type: ignore[call-arg]
    engine = tiny_engine(settings)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


@contextlib.asynccontextmanager
async def _worker(engine: LocalEngine) -> AsyncIterator[HttpEngine]:
    """`engine` served by a real worker (`huahua worker`'s app) on loopback, and an HTTP engine to it."""
    server = TestServer(create_app(engine, secret="s3cret"), host="127.0.0.1")
    await server.start_server()
    remote = HttpEngine(str(server.make_url("/")), secret="s3cret", timeout_s=60)
    await remote.start()
    try:
        yield remote
    finally:
        await remote.close()
        await server.close()


async def _drain(service, jobs) -> None:  # type: ignore[no-untyped-def]
    for job in jobs:
        events = [event async for event in service.subscribe(job.id)]
        assert events[-1].type == EventType.DONE


async def test_a_cast_picture_becomes_the_reference_every_panel_with_them_follows(tmp_path: Path) -> None:
    engine = PatternEngine()
    service = await make_service(tmp_path, engine=engine)
    try:
        book = service.handler("story")
        await _say(service, "/story new 小红帽")
        reply = await book.cast_add_with_picture(CHAT, ANN, "莉莉: 穿红斗篷的小女孩", jpeg_picture())
        assert "莉莉" in reply.texts[0] and "reference picture is set" in reply.texts[-1]
        await _say(service, "/cast add Wolf: 大灰狼")
        story = await book.active(CHAT)
        lily = story.member("莉莉")
        assert lily.reference is not None and lily.reference_from == "picture"
        stored = await service.image(lily.reference)
        assert Image.open(io.BytesIO(stored)).format == "PNG"

        shown = await _say(service, "/cast show 莉莉")
        assert "the picture you gave" in shown.texts[0]
        assert shown.attachments == (("莉莉-reference.png", stored),)
        assert "No reference picture yet" in (await _say(service, "/cast show Wolf")).texts[0]

        await _say(service, "/story add 清晨，莉莉走进了森林。")
        panel = (await _say(service, "/illustrate")).jobs[0]
        assert panel.request.references == (lily.reference,) and panel.request.consistency == 1.0
        await _drain(service, [panel])
        # the runner loaded the picture's bytes for the engine, as for an init image
        assert engine.requests[-1].reference_images == (stored,)

        await _say(service, "/story add 夜里，Wolf 在城堡外面哭了。")
        alone = (await _say(service, "/illustrate")).jobs[0]
        assert alone.request.references == () and alone.request.consistency == 0.0

        # a new picture for a member already in the cast replaces their reference
        await book.cast_add_with_picture(CHAT, ANN, "莉莉", jpeg_picture((20, 20, 220)))
        replaced = (await book.active(CHAT)).member("莉莉").reference
        assert replaced not in (None, lily.reference)
    finally:
        await service.stop()


async def test_story_consistency_off_on_and_strength(tmp_path: Path) -> None:
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        book = service.handler("story")
        await _say(service, "/story new 设置")
        await book.cast_add_with_picture(CHAT, ANN, "莉莉: 小女孩", jpeg_picture())
        await _say(service, "/story add 莉莉在花园里。")
        assert "off" in (await _say(service, "/story consistency off")).texts[0]
        off = (await _say(service, "/illustrate")).jobs[0]
        assert off.request.references == () and off.request.consistency == 0.0
        assert "0.5" in (await _say(service, "/story consistency strength 0.5")).texts[0]
        half = (await _say(service, "/illustrate")).jobs[0]
        assert half.request.consistency == 0.5 and len(half.request.references) == 1
        await _say(service, "/story consistency on")
        assert (await book.active(CHAT)).consistency == 1.0
        for bad in (
            "/story consistency strength 9",
            "/story consistency strength nan",
            "/story consistency maybe",
        ):
            reply = await _say(service, bad)
            assert reply.jobs == () and "consistency" in reply.texts[0].lower(), bad
    finally:
        await service.stop()


async def test_without_a_picture_the_first_chosen_solo_panel_becomes_the_reference(tmp_path: Path) -> None:
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        book = service.handler("story")
        await _say(service, "/story new 选图")
        await _say(service, "/cast add 莉莉: 穿红斗篷的小女孩")
        await _say(service, "/cast add Wolf: 大灰狼")
        await _say(service, "/story add 莉莉和Wolf在海边跳舞。")  # two characters: no reference from it
        await _say(service, "/story add 清晨，莉莉走进了森林。")
        await _say(service, "/story add 莉莉在河边洗手。")
        jobs = (await _say(service, "/illustrate 3")).jobs
        await _drain(service, jobs)
        await service.events.drain()
        await _say(service, "/story choose 1 1")
        story = await book.active(CHAT)
        assert all(m.reference is None for m in story.cast)
        await _say(service, "/story choose 2 1")
        await _say(service, "/story choose 3 1")  # a later choice does not replace the first
        story = await book.active(CHAT)
        panel_two = (await service.get_job(jobs[0].id)).images[1]  # the three were drawn as one batch
        lily = story.member("莉莉")
        assert (lily.reference, lily.reference_from) == (panel_two, "panel 2")
        assert story.member("Wolf").reference is None
        assert "panel 2" in (await _say(service, "/cast show 莉莉")).texts[0]
    finally:
        await service.stop()


async def test_several_characters_in_one_scene_each_apply(tmp_path: Path) -> None:
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        book = service.handler("story")
        await _say(service, "/story new 两人")
        await book.cast_add_with_picture(CHAT, ANN, "莉莉: 小女孩", jpeg_picture((200, 0, 0)))
        await book.cast_add_with_picture(CHAT, ANN, "Wolf: 大灰狼", jpeg_picture((90, 90, 90)))
        await _say(service, "/story add 莉莉和Wolf在海边跳舞。")
        job = (await _say(service, "/illustrate")).jobs[0]
        story = await book.active(CHAT)
        assert job.request.references == (story.member("莉莉").reference, story.member("Wolf").reference)
        await _drain(service, [job])
    finally:
        await service.stop()


async def test_bad_pictures_are_refused_before_decoding_and_add_nobody(tmp_path: Path) -> None:
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        book = service.handler("story")
        await _say(service, "/story new 炸弹")
        for picture, words in (
            (png_claiming(60_000, 60_000), "too large"),
            (b"not a picture", "not an image"),
        ):
            with pytest.raises(Exception, match=words) as caught:
                await book.cast_add_with_picture(CHAT, ANN, "莉莉: 小女孩", picture)
            assert type(caught.value).__name__ == "InvalidOption"
        assert (await book.active(CHAT)).cast == ()
    finally:
        await service.stop()


def test_references_survive_the_job_codec_and_the_story_document() -> None:
    from core.types import Job, JobKind

    request = GenerationRequest(
        prompt="猫", references=("a" * 64,), consistency=0.7, reference_images=(b"bytes never stored",)
    )
    job = Job(id="j1", user="web:a", chat="web:r", kind=JobKind.SCENE, source_text="猫", request=request)
    again = job_from_json(job_to_json(job))
    assert again.request.references == ("a" * 64,) and again.request.consistency == 0.7
    assert again.request.reference_images == ()
    older = job_to_dict(job)
    del older["request"]["references"], older["request"]["consistency"]
    assert job_from_dict(older).request.consistency == 0.0

    story = Story(
        id="s",
        chat=CHAT,
        title="t",
        style=None,
        base_seed=1,
        created_by=ANN,
        created_at=0.0,
        cast=(CastMember("莉莉", "小女孩", 1, reference="b" * 64, reference_from="picture"),),
        consistency=0.4,
    )
    assert story_from_dict(story_to_dict(story)) == story
    legacy = story_to_dict(story)
    del legacy["consistency"]
    for member in legacy["cast"]:
        del member["reference"], member["reference_from"]
    old = story_from_dict(legacy)
    assert old.consistency == 1.0 and old.cast[0].reference is None


async def test_the_tiny_engine_draws_differently_with_a_reference(tmp_path: Path) -> None:
    """The real model code at the tiny size: strength 0 draws exactly the plain picture, a reference not."""
    async with _tiny_engine(tmp_path) as engine:
        base = GenerationRequest(prompt="一只猫", width=64, height=64, steps=3, seed=7)
        ref = jpeg_picture(size=(96, 48))

        async def draw(**changes: object) -> bytes:
            images = await engine.generate(replace(base, **changes), lambda s, t: None, CancelToken())
            return images[0].png

        plain = await draw()
        assert await draw(references=("c" * 64,), reference_images=(ref,), consistency=0.0) == plain
        followed = await draw(references=("c" * 64,), reference_images=(ref,), consistency=1.0)
        assert followed != plain
        with pytest.raises(Exception, match="could not be loaded"):
            await draw(references=("c" * 64,), consistency=1.0)

        # the same drawing through a real worker over HTTP: the references travel with the request
        async with _worker(engine) as remote:
            request = replace(base, references=("c" * 64,), reference_images=(ref,), consistency=1.0)
            [far] = await remote.generate(request, lambda s, t: None, CancelToken())
            assert far.png == followed


def test_references_cross_the_worker_wire() -> None:
    request = GenerationRequest(
        prompt="猫",
        references=("d" * 64, "e" * 64),
        consistency=0.5,
        reference_images=(b"\x89PNG1", b"\x89PNG2"),
    )
    assert request_from_wire(json.loads(json.dumps(request_to_wire(request)))) == request
    plain = GenerationRequest(prompt="猫")
    assert "references" not in request_to_wire(plain)  # an older worker still takes plain requests
    with pytest.raises(InvalidOption, match="reference_images"):
        request_from_wire({"prompt": "猫", "reference_images": ["not base64!"]})
    with pytest.raises(InvalidOption, match="references"):
        request_from_wire({"prompt": "猫", "references": ["x"] * 5})


async def test_the_torch_engine_follows_references() -> None:
    """The PyTorch engine has reference attention too: strength 0 draws the plain picture, a reference
    draws another one, the same one each time."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from core.diffusion.config import WukongConfig
    from core.engine import EngineLimits
    from core.engines.local import LocalEngine
    from core.torch_engine.pipeline import TorchWukongPipeline
    from core.vocabulary import builtin_tokenizer

    engine = LocalEngine(
        lambda: TorchWukongPipeline.random(WukongConfig.tiny(), builtin_tokenizer(), seed=0),
        name="torch",
        limits=EngineLimits.for_area(64 * 64),
    )
    await engine.start()
    try:
        base = GenerationRequest(prompt="一只猫", width=64, height=64, steps=2, seed=7)
        with_reference = replace(
            base, references=("c" * 64,), reference_images=(jpeg_picture(),), consistency=1.0
        )
        [plain] = await engine.generate(base, lambda s, t: None, CancelToken())
        [off] = await engine.generate(
            replace(with_reference, consistency=0.0), lambda s, t: None, CancelToken()
        )
        assert off.png == plain.png
        [first] = await engine.generate(with_reference, lambda s, t: None, CancelToken())
        [again] = await engine.generate(with_reference, lambda s, t: None, CancelToken())
        assert first.png != plain.png and again.png == first.png
    finally:
        await engine.close()


# panels drawn together (/illustrate N) -----------------------------------------------------------


async def test_illustrate_n_draws_its_panels_as_one_batch_that_shares_their_looks(tmp_path: Path) -> None:
    engine = PatternEngine()
    service = await make_service(tmp_path, engine=engine)
    try:
        book = service.handler("story")
        await _say(service, "/story new 一起画")
        await book.cast_add_with_picture(CHAT, ANN, "莉莉: 穿红斗篷的小女孩", jpeg_picture((200, 0, 0)))
        await book.cast_add_with_picture(CHAT, ANN, "Wolf: 大灰狼", jpeg_picture((90, 90, 90)))
        for excerpt in ("清晨，莉莉走进了森林。", "Wolf 在树后看着。", "莉莉和Wolf一起跳舞。"):
            await _say(service, f"/story add {excerpt}")
        reply = await _say(service, "/illustrate 3")
        [job] = reply.jobs
        story = await book.active(CHAT)
        lily, wolf = story.member("莉莉"), story.member("Wolf")
        request = job.request
        assert request.n == 3 and request.panels == tuple(s.own_request.prompt for s in story.scenes)
        assert request.prompt == request.panels[0] and request.panel_rate == 0.5
        # every character present in any panel, each once, with the words that name them
        assert request.references == (lily.reference, wolf.reference)
        assert request.reference_words == ("穿红斗篷的小女孩", "大灰狼")
        assert request.consistency == 1.0
        assert [(s.index, s.panel, s.first_of_batch) for s in story.scenes] == [
            (1, 0, 1),
            (2, 1, 1),
            (3, 2, 1),
        ]
        await _drain(service, [job])
        drawn = engine.requests[-1]
        assert drawn.panels == request.panels and len(drawn.reference_images) == 2

        # re-rendering one of them draws the whole batch again, exactly
        again = await _say(service, "/story rerender 2")
        assert "panels 1–3 exactly as before" in again.texts[0]
        [redo] = again.jobs
        assert redo.request == request and redo.meta["story_scene"] == "1"
        await _drain(service, [redo])
        done, redone = await service.get_job(job.id), await service.get_job(redo.id)
        assert redone.images == done.images

        # with consistency off the panels are still one batch, but share nothing
        await _say(service, "/story consistency off")
        await _say(service, "/story add 晚上，莉莉回家了。")
        await _say(service, "/story add Wolf 睡着了。")
        [plain] = (await _say(service, "/illustrate 2")).jobs
        assert plain.request.panels and plain.request.n == 2
        assert (plain.request.panel_rate, plain.request.consistency, plain.request.references) == (
            0.0,
            0.0,
            (),
        )
    finally:
        await service.stop()


def test_a_story_saved_before_panels_were_drawn_together_loads() -> None:
    from core.story.model import Scene, ScenePlan

    request = GenerationRequest(prompt="猫", seed=5)
    scene = Scene(
        index=1,
        excerpt="猫",
        plan=ScenePlan(characters=(), action="猫"),
        request=request,
        model="m",
        job_ids=("j",),
    )
    story = Story(
        id="s", chat=CHAT, title="t", style=None, base_seed=1, created_by=ANN, created_at=0.0, scenes=(scene,)
    )
    legacy = story_to_dict(story)
    del legacy["scenes"][0]["panel"]
    for name in ("panels", "panel_rate", "reference_words"):
        del legacy["scenes"][0]["request"][name]
    old = story_from_dict(legacy)
    assert old == story and old.scenes[0].own_request == request and old.scenes[0].first_of_batch == 1

    together = replace(request, panels=("猫", "狗"), n=2, panel_rate=0.5)
    second = replace(scene, index=2, request=together, panel=1)
    assert story_from_dict(story_to_dict(replace(story, scenes=(second,)))).scenes[0] == second
    assert (second.own_request.prompt, second.own_request.seed, second.own_request.n) == ("狗", 6, 1)
    assert second.own_request.panels == () and second.first_of_batch == 1


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"panels": ("猫", "狗"), "n": 3}, "two or more prompts"),
        ({"panels": ("猫",), "n": 1}, "two or more prompts"),
        ({"panels": ("狗", "猫"), "n": 2}, "two or more prompts"),
        ({"panels": ("猫", "狗"), "n": 2, "init_image": b"png", "strength": 0.5}, "start from noise"),
        ({"panels": ("猫", "狗"), "n": 2, "panel_rate": 1.5}, "between 0 and 1"),
        ({"panels": ("猫", "狗"), "n": 2, "panel_rate": True}, "must be a number"),
        ({"panel_rate": 0.5}, "needs panels"),
        ({"panels": ("猫", 3), "n": 2}, "must be text"),
        ({"references": ("a" * 64,), "reference_words": ("猫", "狗")}, "words of each reference"),
    ],
)
def test_malformed_panel_requests_are_refused_in_one_sentence(changes: dict[str, object], words: str) -> None:
    from core.engine import validate_request
    from tests.support import engine_limits

    with pytest.raises(InvalidOption, match=words):
        validate_request(
            replace(GenerationRequest(prompt="猫", width=64, height=64), **changes), engine_limits("tiny")
        )


def test_panels_cross_the_worker_wire_and_the_job_codec() -> None:
    from core.types import Job, JobKind

    request = GenerationRequest(
        prompt="猫",
        panels=("猫", "狗"),
        n=2,
        panel_rate=0.5,
        references=("d" * 64,),
        reference_words=("小猫",),
        consistency=1.0,
    )
    assert request_from_wire(json.loads(json.dumps(request_to_wire(request)))) == request
    assert "panels" not in request_to_wire(
        GenerationRequest(prompt="猫")
    )  # older workers take plain requests
    with pytest.raises(InvalidOption, match="panels"):
        request_from_wire({"prompt": "猫", "panels": ["猫"] * 9})
    job = Job(id="j1", user="web:a", chat="web:r", kind=JobKind.SCENE, source_text="猫", request=request)
    assert job_from_json(job_to_json(job)) == job
    older = job_to_dict(job)
    for name in ("panels", "panel_rate", "reference_words"):
        del older["request"][name]
    assert job_from_dict(older).request == replace(request, panels=(), panel_rate=0.0, reference_words=())


async def test_the_tiny_engine_draws_panels_together(tmp_path: Path) -> None:
    """The real model code at the tiny size: without sharing, each panel of a batch is the picture its
    prompt and seed draw alone (up to one level of rounding: the batch sums in another order); sharing
    changes them; a worker over HTTP draws the same batch."""
    async with _tiny_engine(tmp_path) as engine:
        base = GenerationRequest(prompt="一只猫", width=64, height=64, steps=3, seed=7)
        together = replace(base, panels=("一只猫", "一只狗在跑"), n=2)

        async def draw(request: GenerationRequest) -> list[np.ndarray]:
            images = await engine.generate(request, lambda s, t: None, CancelToken())
            return [np.asarray(Image.open(io.BytesIO(image.png)), dtype=np.int16) for image in images]

        unshared = await draw(together)
        alone = [(await draw(base))[0], (await draw(replace(base, prompt="一只狗在跑", seed=8)))[0]]
        assert all(np.abs(a - b).max() <= 1 for a, b in zip(unshared, alone, strict=True))
        assert np.abs(unshared[0] - unshared[1]).max() > 10  # two prompts, two pictures

        shared_request = replace(together, consistency=1.0, panel_rate=0.5)
        shared = await draw(shared_request)
        assert all(np.abs(a - b).mean() > 2 for a, b in zip(shared, unshared, strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(await draw(shared_request), shared, strict=True))

        async with _worker(engine) as remote:
            far = await remote.generate(shared_request, lambda s, t: None, CancelToken())
            far_pixels = [np.asarray(Image.open(io.BytesIO(image.png)), dtype=np.int16) for image in far]
            assert all(np.array_equal(a, b) for a, b in zip(far_pixels, shared, strict=True))


async def test_the_tiny_engine_places_each_reference_by_its_characters_words(tmp_path: Path) -> None:
    """Two references with the words that name their characters: the engine finds those words in the
    prompt and reads each reference mostly where they draw the cross-attention, so the picture differs
    from the one where both apply everywhere; words the prompt does not contain change nothing."""
    async with _tiny_engine(tmp_path) as engine:
        base = GenerationRequest(
            prompt="红衣女孩和灰狼在海边跳舞",
            width=64,
            height=64,
            steps=3,
            seed=11,
            references=("a" * 64, "b" * 64),
            reference_images=(jpeg_picture((200, 0, 0)), jpeg_picture((90, 90, 90))),
            consistency=1.0,
        )

        async def draw(**changes: object) -> bytes:
            images = await engine.generate(replace(base, **changes), lambda s, t: None, CancelToken())
            return images[0].png

        everywhere = await draw()
        placed = await draw(reference_words=("红衣女孩", "灰狼"))
        assert placed != everywhere
        assert await draw(reference_words=("红衣女孩", "灰狼")) == placed
        assert await draw(reference_words=("蓝色的鲸鱼", "")) == everywhere  # words not in the prompt


async def test_every_panel_of_a_batch_is_moderated(tmp_path: Path) -> None:
    service = await make_service(tmp_path, engine=PatternEngine())
    try:
        request = GenerationRequest(prompt="小猫", panels=("小猫", "儿童色情"), n=2, width=64, height=64)
        with pytest.raises(Exception, match="can't draw") as caught:
            await service.submit_request(ANN, CHAT, JobKind.SCENE, "小猫", request)
        assert type(caught.value).__name__ == "BlockedPrompt"
        assert await service.store.unfinished_jobs() == []
    finally:
        await service.stop()
