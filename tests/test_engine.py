"""The engine port's limits (core/engine.py): the one source of truth for sizes, read by the /imagine
size rule, by every engine's own check and by the upscale button."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from PIL import Image

from core.engine import EngineLimits, area_band, validate_request
from core.errors import InvalidOption
from core.types import Action, EventType, GenerationRequest, JobStatus
from tests.support import PatternEngine, engine_limits, make_service

RATIOS = ["1:1", "3:2", "2:3", "16:9", "9:16", "2:1", "4:1", "1:4"]


def test_limits_leave_room_for_one_upscale_of_the_largest_new_picture() -> None:
    limits = EngineLimits.for_area(512 * 512, max_steps=30)
    assert limits.image_area == 512 * 512 and limits.max_steps == 30 and limits.multiple == 64
    assert limits.max_area == 4 * area_band(512 * 512)[1] and limits.max_side == 2048
    assert limits.fits(2048, 512) and limits.fits(1280, 1024)
    assert not limits.fits(2112, 64) and not limits.fits(1344, 1024)


def test_the_settings_give_each_local_engine_its_area() -> None:
    assert engine_limits("wukong").image_area == 512 * 512
    assert engine_limits("tiny").image_area == 128 * 128
    assert engine_limits("wukong", image_area=256 * 256, max_steps=12) == EngineLimits.for_area(
        256 * 256, max_steps=12
    )


def test_limits_travel_as_json() -> None:
    limits = EngineLimits.for_area(128 * 128, max_steps=9, multiple=16)
    assert EngineLimits.from_dict(json.loads(json.dumps(limits.to_dict()))) == limits


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "limits",
        {},
        {"image_area": 4096},
        {**EngineLimits.for_area(4096).to_dict(), "max_side": "2048"},
        {**EngineLimits.for_area(4096).to_dict(), "max_area": 0},
        {**EngineLimits.for_area(4096).to_dict(), "multiple": True},
        {**EngineLimits.for_area(4096).to_dict(), "max_steps": -1},
    ],
)
def test_malformed_limits_are_ignored(data: object) -> None:
    assert EngineLimits.from_dict(data) is None


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((2112, 64), "at most 2048 pixels a side"),
        ((1344, 1024), "too large for this engine"),
        ((96, 64), "multiples of 64"),
        ((0, 64), "multiples of 64"),
    ],
)
def test_requests_outside_the_limits_are_refused(size: tuple[int, int], message: str) -> None:
    width, height = size
    with pytest.raises(InvalidOption, match=message):
        validate_request(GenerationRequest("猫", width=width, height=height), engine_limits("wukong"))
    validate_request(GenerationRequest("猫", width=1280, height=1024), engine_limits("wukong"))


def test_steps_beyond_the_engines_limit_are_refused() -> None:
    limits = replace(engine_limits("tiny"), max_steps=8)
    with pytest.raises(InvalidOption, match="between 1 and 8"):
        validate_request(GenerationRequest("猫", width=64, height=64, steps=9), limits)


async def _finished(service, job_id):  # type: ignore[no-untyped-def]
    events = [event async for event in service.subscribe(job_id)]
    return events[-1], await service.get_job(job_id)


@pytest.mark.parametrize("engine_name", ["wukong", "tiny"])
@pytest.mark.parametrize("ratio", RATIOS)
async def test_every_new_picture_can_be_upscaled_once(tmp_path, engine_name: str, ratio: str) -> None:  # type: ignore[no-untyped-def]
    """The test engine refuses what the real one would (same limits, same check), so a size the engine
    refuses fails here as it would in production."""
    engine = PatternEngine(limits=engine_limits(engine_name))
    service = await make_service(tmp_path, engine=engine, engine_name=engine_name)
    try:
        reply = await service.handle_message("web:room", "web:ann", f"/imagine 一只猫 --ar {ratio}")
        assert reply.job is not None
        last, parent = await _finished(service, reply.job.id)
        assert last.type == EventType.DONE, last.error
        upscale = await service.act(parent.id, Action.UPSCALE, 0, "web:ann")
        last, done = await _finished(service, upscale.id)
        assert last.type == EventType.DONE, last.error
        assert done.status == JobStatus.DONE
        assert (done.request.width, done.request.height) == (
            2 * parent.request.width,
            2 * parent.request.height,
        )
        picture = Image.open(io.BytesIO(await service.image(done.images[0])))
        assert picture.size == (done.request.width, done.request.height)
        with pytest.raises(InvalidOption, match="already as large as this engine can upscale"):
            await service.act(done.id, Action.UPSCALE, 0, "web:ann")
    finally:
        await service.stop()
