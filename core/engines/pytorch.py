"""The PyTorch engine (`HUAHUA_ENGINE=torch`): TorchWukongPipeline in LocalEngine's worker thread.

The same engine as `wukong` (one model run at a time on its own thread, waiting same-size jobs batched,
progress and cancel per sampling step); only the pipeline differs. Weights: the converted folder that
`huahua model convert --to torch` wrote (`<model dir>/wukong-huahua-torch`) while it still matches
the checkpoint it came from, else the official checkpoint itself (mapped at each start).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from core.engine import TILE, EngineLimits
from core.engines.local import FETCH_COMMAND, LocalEngine
from core.errors import CheckpointError, EngineUnavailable
from core.settings import Settings

logger = logging.getLogger(__name__)

CONVERTED_DIR = "wukong-huahua-torch"
INSTALL = "PyTorch is not installed here; install the torch extra (pip install 'huahua[torch]')."


def converted_dir(settings: Settings) -> Path:
    """Where `huahua model convert --to torch` writes the converted weights by default."""
    return settings.model_dir / CONVERTED_DIR


def weights_path(settings: Settings) -> Path:
    """The weights the torch engine loads: HUAHUA_CHECKPOINT when it names a converted folder; else
    the default converted folder when it was made from the current checkpoint (or that is absent);
    else the checkpoint file."""
    from core.torch_engine import files

    checkpoint, folder = settings.checkpoint_path, converted_dir(settings)
    if files.is_converted(checkpoint):
        return checkpoint
    if files.is_converted(folder):
        try:
            source = files.read_marker(folder).get("source")
        except CheckpointError:
            return checkpoint
        if not checkpoint.is_file() or source == files.source_state(checkpoint):
            return folder
        logger.info("%s was converted from another checkpoint; mapping %s instead", folder, checkpoint.name)
    return checkpoint


def warm_up_side(settings: Settings) -> int:
    """The side of the square picture nearest HUAHUA_IMAGE_AREA, in tiles: the size compiled at start."""
    return max(TILE, round(math.sqrt(settings.image_area) / TILE) * TILE)


def torch_engine(settings: Settings) -> LocalEngine:
    """The official model on PyTorch, loaded at `start()` (compiled and warmed up when configured)."""
    vocab = settings.resolved_vocab_path
    holder: list[LocalEngine] = []
    tried: list[tuple[object, ...]] = []

    def state() -> tuple[object, ...]:
        paths = (settings.checkpoint_path, vocab, converted_dir(settings) / "wukong.json")
        return tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in paths)

    def load() -> Any:
        tried[:] = [state()]
        try:
            from core.torch_engine.pipeline import TorchWukongPipeline, resolve_device, resolve_dtype
        except ImportError as exc:
            logger.info("torch engine: %s", exc)
            raise EngineUnavailable(INSTALL) from exc
        weights = weights_path(settings)
        if not weights.exists():
            raise EngineUnavailable(
                f"The model weights are not installed ({weights}); download them with `{FETCH_COMMAND}`."
            )
        if not vocab.is_file():
            raise EngineUnavailable(
                f"The tokenizer vocabulary is not installed ({vocab}); download it with `{FETCH_COMMAND}`."
            )
        device = resolve_device(settings.device)
        dtype = resolve_dtype(device, settings.dtype)
        try:
            pipe = TorchWukongPipeline.load(
                weights, vocab, device=device, dtype=dtype, compile=settings.torch_compile
            )
        except CheckpointError as exc:
            raise EngineUnavailable(f"{exc.message} Download a fresh copy with `{FETCH_COMMAND}`.") from exc
        engine = holder[0]
        engine.device, engine.dtype = pipe.device, pipe.dtype
        if settings.torch_compile:
            side = warm_up_side(settings)
            logger.info("torch engine: compiling the UNet for %dx%d pictures (torch.compile)", side, side)
            pipe.warm_up(side, side)
        return pipe

    engine = LocalEngine(
        load,
        name="torch",
        model="wukong-huahua",
        device=settings.device,
        dtype=settings.dtype,
        limits=EngineLimits.for_area(settings.image_area, max_steps=settings.max_steps),
        reload_if=lambda: bool(tried) and state() != tried[0],
    )
    holder.append(engine)
    return engine


def convert_to_torch(settings: Settings, source: Path | None = None, out: Path | None = None) -> Path:
    """`huahua model convert --to torch`: map the official checkpoint once and write the PyTorch
    weights and configs (diffusers' folder layout plus `wukong.json`), so later starts skip the mapping."""
    try:
        from core.torch_engine.pipeline import TorchWukongPipeline
    except ImportError as exc:
        raise EngineUnavailable(INSTALL) from exc
    source = source or settings.checkpoint_path
    out = out or converted_dir(settings)
    pipe = TorchWukongPipeline.load(source, None, device="cpu", dtype="float32")
    pipe.save_converted(out, source=source if source.is_file() else None)
    logger.info("converted %s into %s", source, out)
    return out
