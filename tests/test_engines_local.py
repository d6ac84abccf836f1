import asyncio
import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.engine import CancelToken, EngineLimits
from core.engines.factory import build_engine
from core.engines.local import (
    MINDSPORE_GPU_UNAVAILABLE,
    LocalEngine,
    initial_noise,
    resolve_dtype,
    tiny_engine,
    wukong_engine,
)
from core.errors import EngineUnavailable, InvalidOption, JobCancelled
from core.images import png_to_array
from core.options import size_for_ratio
from core.settings import Settings
from core.types import GenerationRequest
from core.vocabulary import builtin_vocabulary_text


def _settings(tmp_path: Path, **values: object) -> Settings:
    """No vocab_zh.txt in the model dir: the tiny engine uses the built-in vocabulary."""
    base: dict[str, object] = {"model_dir": tmp_path / "models", "vocab_path": None, "_env_file": None}
    return Settings(**{**base, **values})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return _settings(tmp_path_factory.mktemp("tiny"), engine="tiny")


@pytest.fixture
async def tiny(tiny_settings: Settings) -> AsyncIterator[LocalEngine]:
    engine = tiny_engine(tiny_settings)
    await engine.start()
    assert engine.ready, (await engine.health())["error"]
    yield engine
    await engine.close()


def _request(**values: object) -> GenerationRequest:
    base: dict[str, object] = {"prompt": "一只猫", "width": 64, "height": 64, "steps": 2, "seed": 7}
    return GenerationRequest(**{**base, **values})  # type: ignore[arg-type]


def _pixels(png: bytes) -> np.ndarray:
    return png_to_array(png)[0]


def _ignore(step: int, total: int) -> None:
    pass


def test_dtype_auto_follows_the_device() -> None:
    assert resolve_dtype("CPU", "auto") == "float32"
    assert resolve_dtype("GPU", "auto") == "float16"
    assert resolve_dtype("Ascend", "auto") == "float16"
    assert resolve_dtype("GPU", "float32") == "float32"


def test_noise_per_seed_is_reproducible() -> None:
    both = initial_noise([3, 4], (4, 2, 2))
    assert np.array_equal(both[1], initial_noise([4], (4, 2, 2))[0])
    assert not np.array_equal(both[0], both[1])


def test_factory_picks_the_configured_engine(tmp_path: Path) -> None:
    assert build_engine(_settings(tmp_path, engine="tiny")).name == "tiny"
    assert build_engine(_settings(tmp_path, engine="wukong")).name == "wukong"
    assert build_engine(_settings(tmp_path, engine="http")).name == "http"


async def test_wukong_without_weights_starts_and_says_how_to_fetch(tmp_path: Path) -> None:
    engine = wukong_engine(_settings(tmp_path, engine="wukong"))
    await engine.start()
    health = await engine.health()
    assert health["ready"] is False
    assert health["dtype"] == "float32" and health["device"] == "CPU"
    with pytest.raises(EngineUnavailable, match="huahua model fetch"):
        await engine.generate(_request(), _ignore, CancelToken())
    await engine.close()


async def test_wukong_loads_again_only_when_its_files_change(tmp_path: Path) -> None:
    settings = _settings(tmp_path, engine="wukong")
    engine = wukong_engine(settings)
    await engine.start()
    with pytest.raises(EngineUnavailable, match="not installed"):
        await engine.generate(_request(), _ignore, CancelToken())
    assert engine.stats.loads == 1
    settings.model_dir.mkdir()
    settings.resolved_vocab_path.write_text(builtin_vocabulary_text(), encoding="utf-8")  # a file appears
    for _ in range(2):
        with pytest.raises(EngineUnavailable, match=r"model weights .*not installed"):
            await engine.generate(_request(), _ignore, CancelToken())
    assert engine.stats.loads == 2
    settings.resolved_vocab_path.unlink()
    settings.checkpoint_path.write_bytes(b"\x00garbage" * 100)  # a (bad) checkpoint appears
    with pytest.raises(EngineUnavailable) as missing_vocab:
        await engine.generate(_request(), _ignore, CancelToken())
    assert missing_vocab.value.message == (
        f"The tokenizer vocabulary is not installed ({settings.resolved_vocab_path}); "
        "download it with `huahua model fetch`."
    )
    settings.resolved_vocab_path.write_text(builtin_vocabulary_text(), encoding="utf-8")
    for _ in range(2):
        with pytest.raises(EngineUnavailable, match=r"corrupt.*huahua model fetch"):
            await engine.generate(_request(), _ignore, CancelToken())
    assert engine.stats.loads == 4
    await engine.close()


async def test_tiny_makes_pngs_quickly_with_progress_on_the_loop(tiny: LocalEngine) -> None:
    steps: list[tuple[int, int]] = []
    threads: set[int] = set()

    def on_progress(step: int, total: int) -> None:
        steps.append((step, total))
        threads.add(threading.get_ident())

    request = _request(width=128, height=128, steps=4)
    await tiny.generate(_request(steps=1), _ignore, CancelToken())  # warm up
    started = time.perf_counter()
    images = await tiny.generate(request, on_progress, CancelToken())
    elapsed = time.perf_counter() - started
    print(f"tiny 128x128, 4 steps: {elapsed:.2f} s")
    assert elapsed < 10.0  # see the report for the figure on an idle machine; generous for a loaded one
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert threads == {threading.get_ident()}
    [image] = images
    assert (image.width, image.height, image.seed) == (128, 128, 7)
    assert Image.open(io.BytesIO(image.png)).size == (128, 128)
    assert tiny.label == "untrained test model"


async def test_seeds_are_reproducible_and_image_i_uses_seed_plus_i(tiny: LocalEngine) -> None:
    pair = await tiny.generate(_request(n=2, seed=10), _ignore, CancelToken())
    assert [i.seed for i in pair] == [10, 11]
    again = await tiny.generate(_request(seed=10), _ignore, CancelToken())
    alone = await tiny.generate(_request(seed=11), _ignore, CancelToken())
    assert np.abs(_pixels(pair[0].png) - _pixels(again[0].png)).max() <= 2 / 127.5
    assert np.abs(_pixels(pair[1].png) - _pixels(alone[0].png)).max() <= 2 / 127.5
    assert np.abs(_pixels(pair[0].png) - _pixels(pair[1].png)).max() > 0.1


async def test_negative_prompt_changes_the_picture(tiny: LocalEngine) -> None:
    plain = await tiny.generate(_request(), _ignore, CancelToken())
    negative = await tiny.generate(_request(negative_prompt="模糊"), _ignore, CancelToken())
    assert np.abs(_pixels(plain[0].png) - _pixels(negative[0].png)).max() > 0.01


def _flat_png(color: tuple[int, int, int], size: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


async def test_image_to_image_depends_on_the_init_image_and_runs_part_of_the_schedule(
    tiny: LocalEngine,
) -> None:
    totals: list[int] = []
    red = await tiny.generate(
        _request(init_image=_flat_png((255, 0, 0)), strength=0.5, steps=8),
        lambda s, t: totals.append(t),
        CancelToken(),
    )
    blue = await tiny.generate(
        _request(init_image=_flat_png((0, 0, 255)), strength=0.5, steps=8), _ignore, CancelToken()
    )
    assert totals and totals[0] < 8  # partial noising runs only the last part of the schedule
    assert np.abs(_pixels(red[0].png) - _pixels(blue[0].png)).mean() > 0.01


async def test_upscale_is_image_to_image_at_twice_the_size(tiny: LocalEngine) -> None:
    # a landscape picture of the engine's own, then twice its size in each direction from it
    [small] = await tiny.generate(_request(width=96, height=64), _ignore, CancelToken())
    assert Image.open(io.BytesIO(small.png)).size == (96, 64)
    totals: list[int] = []
    [big] = await tiny.generate(
        _request(init_image=small.png, strength=0.35, width=192, height=128, steps=20),
        lambda step, total: totals.append(total),
        CancelToken(),
    )
    assert (big.width, big.height) == (192, 128)
    assert Image.open(io.BytesIO(big.png)).size == (192, 128)  # what the PNG holds, not what we asked
    assert totals and totals[0] == 7  # strength 0.35 of 20 steps: only the end of the schedule runs
    [other] = await tiny.generate(
        _request(init_image=_flat_png((10, 200, 30)), strength=0.35, width=192, height=128, steps=20),
        _ignore,
        CancelToken(),
    )
    assert np.abs(_pixels(big.png) - _pixels(other.png)).mean() > 0.01  # it starts from the picture


async def test_cancel_stops_sampling_early(tiny: LocalEngine) -> None:
    cancel = CancelToken()
    seen: list[int] = []

    def on_progress(step: int, total: int) -> None:
        seen.append(step)
        if step == 2:
            cancel.cancel()

    before = tiny.stats.steps
    with pytest.raises(JobCancelled):
        await tiny.generate(_request(steps=40, width=64, height=64), on_progress, cancel)
    assert tiny.stats.steps - before < 40
    assert tiny.stats.cancelled >= 1


async def test_waiting_requests_of_one_size_share_a_batch(tiny: LocalEngine) -> None:
    a, b = _request(prompt="山水", seed=1), _request(prompt="花鸟", seed=2, n=2)
    batches = tiny.stats.batches
    together = await asyncio.gather(*(tiny.generate(r, _ignore, CancelToken()) for r in (a, b)))
    assert tiny.stats.batches == batches + 1
    assert [len(r) for r in together] == [1, 2]
    alone = await tiny.generate(b, _ignore, CancelToken())
    assert np.abs(_pixels(together[1][1].png) - _pixels(alone[1].png)).max() <= 2 / 127.5
    different = await asyncio.gather(
        *(tiny.generate(r, _ignore, CancelToken()) for r in (a, _request(width=128, height=128)))
    )
    assert tiny.stats.batches == batches + 4
    assert [r[0].width for r in different] == [64, 128]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"width": 72}, "multiples of 16"),
        ({"steps": 0}, "Steps"),
        ({"steps": 10_000}, "Steps"),
        ({"n": 0}, "images"),
        ({"sampler": "euler"}, "sampler"),
        ({"guidance_scale": float("nan")}, "Guidance"),
        ({"width": 4096, "height": 4096}, "too large"),
        ({"init_image": b"not a png", "strength": 0.5}, "image"),
        ({"init_image": b"\x89PNG", "strength": 0.0}, "Strength"),
        # a whole header and a cut body: the size passes, decoding (on the engine thread) fails
        ({"init_image": _flat_png((1, 2, 3))[:-40], "strength": 0.5}, "not an image I can read"),
    ],
)
async def test_bad_requests_are_invalid_option(tiny: LocalEngine, values: dict, message: str) -> None:
    with pytest.raises(InvalidOption, match=message):
        await tiny.generate(_request(**values), _ignore, CancelToken())


async def test_a_caller_that_stops_waiting_stops_the_run(tiny: LocalEngine) -> None:
    started = asyncio.Event()
    before = tiny.stats.steps
    task = asyncio.create_task(tiny.generate(_request(steps=40), lambda s, t: started.set(), CancelToken()))
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if not (await tiny.health())["load"]["busy"]:
            break
        await asyncio.sleep(0.05)
    assert tiny.stats.steps - before < 40


def test_each_local_engine_takes_its_limits_from_the_settings(tmp_path: Path) -> None:
    settings = _settings(tmp_path, image_area=384 * 384, tiny_image_area=192 * 192, max_steps=12)
    assert wukong_engine(settings).limits == EngineLimits.for_area(384 * 384, max_steps=12)
    assert tiny_engine(settings).limits == EngineLimits.for_area(192 * 192, max_steps=12)


async def test_the_tiny_engine_upscales_its_largest_new_picture_and_no_more(tiny: LocalEngine) -> None:
    width, height = size_for_ratio("3:2", tiny.limits)
    [small] = await tiny.generate(_request(width=width, height=height), _ignore, CancelToken())
    [big] = await tiny.generate(
        _request(init_image=small.png, strength=0.35, width=2 * width, height=2 * height),
        _ignore,
        CancelToken(),
    )
    assert Image.open(io.BytesIO(big.png)).size == (2 * width, 2 * height)
    assert (await tiny.health())["limits"] == tiny.limits.to_dict()
    with pytest.raises(InvalidOption, match="too large for this engine"):
        await tiny.generate(
            _request(init_image=big.png, strength=0.35, width=4 * width, height=4 * height),
            _ignore,
            CancelToken(),
        )


async def test_a_compiled_engine_warms_up_its_default_size_in_the_background(
    tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """start() returns once the model is loaded; health says "warming up" while the default size
    compiles; a request that comes meanwhile waits for it and then runs the shape it compiled."""
    caplog.set_level(logging.INFO, logger="core.engines.local")
    engine = tiny_engine(tiny_settings, graph=True)
    await engine.start()
    health = await engine.health()
    assert health["ready"] is True and health["state"] == "warming up"
    width, height = size_for_ratio("1:1", engine.limits)
    assert f"engine tiny: compiling {width}x{height} pictures in the background" in caplog.text
    images = await engine.generate(_request(width=width, height=height), _ignore, CancelToken())
    assert len(images) == 1 and (images[0].width, images[0].height) == (width, height)
    assert (await engine.health())["state"] == "ready"
    assert re.search(rf"engine tiny: warmed up for {width}x{height} in [0-9.]+ s", caplog.text)
    # the request ran the very shape the warm-up compiled: no second compiled shape
    assert len(engine._pipe._compiled_shapes) == 1
    await engine.close()


async def test_an_eager_engine_is_ready_at_once(tiny: LocalEngine, caplog: pytest.LogCaptureFixture) -> None:
    assert (await tiny.health())["state"] == "ready"
    assert "warming up" not in caplog.text


_GPU_START = """
import asyncio, json, logging, sys
from pathlib import Path
from core.engines.local import wukong_engine, tiny_engine
from core.settings import Settings

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
out = []
for make, device in ((wukong_engine, "GPU"), (tiny_engine, "cuda")):
    settings = Settings(_env_file=None, model_dir=Path(sys.argv[1]), device=device)
    engine = make(settings)
    asyncio.run(engine.start())
    health = asyncio.run(engine.health())
    out.append({"device": health["device"], "state": health["state"], "error": health["error"]})
print(json.dumps(out))
"""


def test_mindspore_on_a_gpu_whose_plugin_cannot_load_points_to_the_torch_engine(tmp_path: Path) -> None:
    """HUAHUA_DEVICE=GPU or cuda with a MindSpore engine, where its GPU plugin cannot load (no CUDA 11
    userland here): one sentence at start, in the log and the engine's health, before any file check.
    Its own process, since a MindSpore process keeps the device target it first got."""
    done = subprocess.run(
        [sys.executable, "-c", _GPU_START, str(tmp_path / "models")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    if any("not installed" in (r["error"] or "") for r in results):  # it got as far as the files
        pytest.skip(f"MindSpore's GPU plugin loads here: {results}")
    assert [r["error"] for r in results] == [MINDSPORE_GPU_UNAVAILABLE] * 2
    assert [r["device"] for r in results] == ["GPU", "GPU"]
    assert all(r["state"] == "unavailable" for r in results)
    assert "HUAHUA_ENGINE=torch" in MINDSPORE_GPU_UNAVAILABLE
    for name in ("wukong", "tiny"):
        assert f"engine {name} unavailable: {MINDSPORE_GPU_UNAVAILABLE}" in done.stderr
