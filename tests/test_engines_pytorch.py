"""HUAHUA_ENGINE=torch: the PyTorch pipeline behind LocalEngine (weights from a converted folder)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

from core.diffusion.config import WukongConfig
from core.engine import CancelToken
from core.engines.factory import build_engine
from core.engines.pytorch import weights_path
from core.errors import JobCancelled
from core.images import png_to_array
from core.settings import Settings
from core.types import GenerationRequest
from core.vocabulary import builtin_tokenizer, builtin_vocabulary_text

pytest.importorskip("torch", reason="needs the torch extra: pip install -e '.[torch]'")
pytest.importorskip("diffusers", reason="needs the torch extra: pip install -e '.[torch]'")

from core.torch_engine import TorchWukongPipeline


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A tiny model converted into `<model dir>/wukong-huahua-torch`, and a vocabulary file."""
    models = tmp_path_factory.mktemp("models")
    pipe = TorchWukongPipeline.random(WukongConfig.tiny(), builtin_tokenizer(), seed=3)
    pipe.save_converted(models / "wukong-huahua-torch")
    (models / "vocab_zh.txt").write_text(builtin_vocabulary_text(), encoding="utf-8")
    return Settings(engine="torch", device="auto", model_dir=models, _env_file=None)  # type: ignore[call-arg]


def _request(**values: object) -> GenerationRequest:
    base: dict[str, object] = {"prompt": "一只猫", "width": 64, "height": 64, "steps": 3, "seed": 7}
    return GenerationRequest(**{**base, **values})  # type: ignore[arg-type]


async def test_torch_engine_draws_with_progress_and_batches(settings: Settings) -> None:
    assert weights_path(settings) == settings.model_dir / "wukong-huahua-torch"  # no checkpoint file
    engine = build_engine(settings)
    await engine.start()
    health = await engine.health()
    assert health["ready"], health["error"]
    assert health["engine"] == "torch" and health["device"] == "cpu" and health["dtype"] == "float32"
    steps: list[tuple[int, int]] = []
    one, two = await asyncio.gather(
        engine.generate(_request(n=2), lambda s, t: steps.append((s, t)), CancelToken()),
        engine.generate(_request(seed=8), lambda s, t: None, CancelToken()),
    )
    assert [image.seed for image in one] == [7, 8] and steps[-1] == (3, 3)
    assert (await engine.health())["stats"]["batches"] == 1  # the two requests ran as one batch
    # image 1 of seed 7 is image 0 of seed 8, whichever request it came in
    assert np.array_equal(png_to_array(one[1].png), png_to_array(two[0].png))
    token = CancelToken()
    token.cancel()
    with pytest.raises(JobCancelled):
        await engine.generate(_request(), lambda s, t: None, token)
    await engine.close()


async def test_missing_torch_weights_say_how_to_fetch(tmp_path: Path) -> None:
    settings = Settings(engine="torch", device="cpu", model_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    engine = build_engine(settings)
    await engine.start()
    health = await engine.health()
    assert not health["ready"] and "huahua model fetch" in health["error"]
    await engine.close()


ROOT = Path(__file__).resolve().parents[1]
TINY_WITHOUT_MINDSPORE = """
import asyncio, sys
sys.modules["mindspore"] = None  # as on a machine with only the torch extra installed
from core.engine import CancelToken
from core.engines.factory import build_engine
from core.settings import Settings
from core.types import GenerationRequest

async def main() -> None:
    engine = build_engine(Settings(engine="tiny", device="auto", vocab_path=None, _env_file=None))
    await engine.start()
    health = await engine.health()
    request = GenerationRequest(prompt="一只猫", width=64, height=64, steps=3, seed=7)
    [image] = await engine.generate(request, lambda s, t: None, CancelToken())
    sys.stdout.buffer.write(health["label"].encode() + b"\\n" + image.png)
    await engine.close()

asyncio.run(main())
"""


async def test_the_tiny_engine_runs_on_pytorch_where_mindspore_is_not_installed(tmp_path: Path) -> None:
    """An NVIDIA user with only the torch extra can try the bot with no download: the tiny engine falls
    back to the PyTorch pipeline, whose random weights for a seed are MindSpore's, so it draws the same
    picture (within one level of rounding)."""
    pytest.importorskip("mindspore", reason="needs MindSpore for the picture to compare with")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        TINY_WITHOUT_MINDSPORE,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=300)
    assert process.returncode == 0, err.decode()[-2000:]
    label, _, png = out.partition(b"\n")
    assert label.decode() == "untrained test model, PyTorch"

    engine = build_engine(Settings(engine="tiny", vocab_path=None, _env_file=None))  # type: ignore[call-arg]
    await engine.start()
    try:
        assert (await engine.health())["label"] == "untrained test model"
        [image] = await engine.generate(_request(), lambda s, t: None, CancelToken())
    finally:
        await engine.close()
    difference = np.abs(png_to_array(png).astype(np.float64) - png_to_array(image.png).astype(np.float64))
    assert difference.max() <= 2 / 127.5 + 1e-6  # png_to_array is in [-1, 1]: at most one level apart
