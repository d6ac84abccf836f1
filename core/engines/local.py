"""The in-process engine: runs WukongPipeline (official or tiny) in one worker thread.

Batches: a request for n images is one batch of n; image i starts from the noise drawn with seed
`seed + i`, so image i of seed s equals image 0 of seed s + i (a reroll of one picture is exact). A
request of panels drawn together (`request.panels`) is one batch of its own, picture i from panel i's
prompt, the panels sharing attention (see `core.diffusion.consistency`).
Several waiting requests with the same size and sampling parameters (submitted before the engine
takes its next batch) are run together as one batch, each keeping its own seeds, prompt and progress
callback.

Warm-up: an engine given `warm_up` (the MindSpore engines when their UNet is compiled) runs it once,
right after the model loads, for the default picture (the 1:1 size of the configured area), on the
engine's own thread: the ~10 s compile of that size is paid at start-up instead of by the first user.
`start()` does not wait for it; `health()` says "warming up" meanwhile, and requests that arrive
then wait for it to finish (they run on the same thread, in order).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from core.engine import (
    MAX_IMAGES_PER_REQUEST,
    CancelToken,
    Engine,
    EngineLimits,
    ProgressCallback,
    validate_request,
)
from core.errors import CheckpointError, EngineUnavailable, HuahuaError, JobCancelled
from core.images import array_to_pngs, open_image, png_to_array, resize_png
from core.options import size_for_ratio
from core.settings import Settings
from core.types import GeneratedImage, GenerationRequest
from core.vocabulary import tiny_vocabulary

logger = logging.getLogger(__name__)

FETCH_COMMAND = "huahua model fetch"
MAX_BATCH = MAX_IMAGES_PER_REQUEST
PipelineLoader = Callable[[], Any]
WarmUp = Callable[[Any, int, int], None]
"""Runs one model call at (width, height) on a loaded pipeline, so that size is compiled."""
MINDSPORE_GPU_UNAVAILABLE = (
    "MindSpore's GPU plugin cannot load here (the MindSpore 2.8 wheel ships GPU plugins for CUDA 11.1 and"
    " 11.6 only, which predate Ada and Hopper cards); for an NVIDIA GPU use the PyTorch engine instead:"
    " HUAHUA_ENGINE=torch (pip install 'huahua[torch]')."
)


def mindspore_device(device: str) -> str:
    """MindSpore's name for HUAHUA_DEVICE: cuda is GPU, cpu is CPU; the rest as given."""
    return {"cuda": "GPU", "cpu": "CPU"}.get(device, device)


def resolve_dtype(device: str, dtype: str) -> str:
    """ "auto" means float16 on Ascend and GPU, float32 on the CPU."""
    if dtype != "auto":
        return dtype
    return "float32" if device == "CPU" else "float16"


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """One standard-normal latent per seed, stacked: (len(seeds), *shape) float32."""
    return np.stack([np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) for seed in seeds])


def _batch_key(request: GenerationRequest) -> tuple[Any, ...] | None:
    """Requests with equal keys can share one batch; image-to-image requests, requests that follow
    reference pictures and panels drawn together (their batch is their own) never do."""
    if request.init_image is not None or request.reference_images or request.panels:
        return None
    return (request.width, request.height, request.steps, request.guidance_scale, request.sampler)


@dataclass
class _Pending:
    request: GenerationRequest
    on_progress: ProgressCallback
    cancel: CancelToken
    future: asyncio.Future[list[GeneratedImage]] = field(repr=False)


@dataclass
class EngineStats:
    """Counters shown by `health()` (and read by tests)."""

    batches: int = 0
    images: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0
    loads: int = 0


class LocalEngine(Engine):
    """Runs a pipeline built by `loader` on a single dedicated thread: one model run at a time."""

    def __init__(
        self,
        loader: PipelineLoader,
        *,
        name: str,
        label: str = "",
        model: str = "",
        device: str = "CPU",
        dtype: str = "float32",
        limits: EngineLimits,
        reload_if: Callable[[], bool] | None = None,
        warm_up: WarmUp | None = None,
    ) -> None:
        """`reload_if`, when given, is asked before a request while unloaded: True loads again.
        `warm_up`, when given, runs after each load for the default size (see the module docstring)."""
        self.name = name
        self.label = label
        self.model = model
        self.device = device
        self.dtype = dtype
        self.limits = limits
        self.stats = EngineStats()
        self._loader = loader
        self._reload_if = reload_if
        self._warm_up = warm_up
        self._warming: Future[None] | None = None
        self._pipe: Any = None
        self._error: str | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"huahua-{name}")
        self._loading: asyncio.Future[None] | None = None
        self._pending: list[_Pending] = []
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()

    # lifecycle

    async def start(self) -> None:
        if self._loading is None:
            self._loading = asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        await self._loading

    def _load(self) -> None:
        self.stats.loads += 1
        try:
            self._pipe = self._loader()
            self._error = None
            self.limits = replace(self.limits, multiple=self.image_multiple)
            logger.info("engine %s ready (%s, %s)", self.name, self.device, self.dtype)
            if self._warm_up is not None:
                # queued on this engine's own thread, so requests that come meanwhile run after it
                width, height = size_for_ratio("1:1", self.limits)
                logger.info(
                    "engine %s: compiling %dx%d pictures in the background (warming up)",
                    self.name,
                    width,
                    height,
                )
                self._warming = self._executor.submit(self._warm, self._pipe, width, height)
        except HuahuaError as exc:
            self._error = exc.message
            logger.warning("engine %s unavailable: %s", self.name, exc.message)
        except Exception:
            logger.exception("engine %s failed to load", self.name)
            self._error = "The image model failed to load; see the server log."

    def _warm(self, pipe: Any, width: int, height: int) -> None:
        assert self._warm_up is not None
        started = time.perf_counter()
        try:
            self._warm_up(pipe, width, height)
        except Exception:  # the engine still serves; that size compiles on its first request instead
            logger.exception("engine %s: warming up failed", self.name)
            return
        logger.info(
            "engine %s: warmed up for %dx%d in %.1f s",
            self.name,
            width,
            height,
            time.perf_counter() - started,
        )

    @property
    def warming_up(self) -> bool:
        """Whether the start-up compile of the default size is still queued or running."""
        return self._warming is not None and not self._warming.done()

    @property
    def state(self) -> str:
        """ "loading", "unavailable", "warming up" or "ready"."""
        if self._pipe is None:
            return "unavailable" if self._error else "loading"
        return "warming up" if self.warming_up else "ready"

    async def close(self) -> None:
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(EngineUnavailable("The image engine is shutting down."))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self._pipe is not None

    @property
    def config(self) -> Any:
        """The pipeline's WukongConfig (None until loaded)."""
        return getattr(self._pipe, "config", None)

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this (64 for the official model)."""
        return int(getattr(self.config, "image_multiple", self.limits.multiple))

    async def health(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "model": self.model,
            "label": self.label,
            "device": self.device,
            "dtype": self.dtype,
            "ready": self.ready,
            "state": self.state,
            "error": self._error,
            "load": {"busy": self._busy, "waiting": len(self._pending)},
            "stats": vars(self.stats).copy(),
            "limits": self.limits.to_dict(),
        }

    # generation

    async def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        await self._ensure_ready()
        validate_request(request, self.limits)
        if cancel.cancelled:
            raise JobCancelled()
        future: asyncio.Future[list[GeneratedImage]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request, on_progress, cancel, future))
        # dispatch on the next loop turn, so requests submitted together can share a batch
        asyncio.get_running_loop().call_soon(self._dispatch)
        return await future

    async def ensure_ready(self) -> None:
        await self._ensure_ready()

    async def _ensure_ready(self) -> None:
        if self._loading is None or not self._loading.done():
            await self.start()
        if self._pipe is None and self._reload_if is not None and self._reload_if():
            logger.info("engine %s: model files changed; loading again", self.name)
            self._loading = None
            await self.start()
        if self._pipe is None:
            raise EngineUnavailable(self._error or "The image model is not loaded.")

    def _dispatch(self) -> None:
        """Start the next batch when idle: the oldest request plus waiting ones that share its key."""
        if self._busy or not self._pending:
            return
        first = self._pending.pop(0)
        jobs = [first]
        key = _batch_key(first.request)
        if key is not None:
            images = first.request.n
            for pending in list(self._pending):
                if _batch_key(pending.request) == key and images + pending.request.n <= MAX_BATCH:
                    jobs.append(pending)
                    images += pending.request.n
                    self._pending.remove(pending)
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._run_jobs(jobs))
        self._tasks.add(task)
        task.add_done_callback(self._after_batch)

    def _after_batch(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._busy = False
        self._dispatch()

    async def _run_jobs(self, jobs: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        live = [job for job in jobs if not job.cancel.cancelled and not job.future.done()]
        for job in jobs:
            if job.cancel.cancelled and not job.future.done():
                self.stats.cancelled += 1
                job.future.set_exception(JobCancelled())
        if not live:
            return

        def progress(step: int, total: int) -> None:
            self.stats.steps += 1
            for job in live:
                loop.call_soon_threadsafe(_safe_progress, job.on_progress, step, total)

        def cancelled() -> bool:
            # a job whose caller stopped waiting (its future was cancelled) counts as cancelled
            return all(job.cancel.cancelled or job.future.done() for job in live)

        requests = [job.request for job in live]
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_batch, requests, progress, cancelled
            )
        except JobCancelled as exc:
            self.stats.cancelled += len(live)
            for job in live:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        except HuahuaError as exc:
            self.stats.failed += len(live)
            for job in live:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        except Exception as exc:
            logger.exception("engine %s failed on a batch of %d", self.name, len(live))
            self.stats.failed += len(live)
            error = EngineUnavailable(f"The image engine failed: {type(exc).__name__}.")
            for job in live:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self.stats.batches += 1
        for job, images in zip(live, results, strict=True):
            if job.future.done():
                continue
            if job.cancel.cancelled:
                self.stats.cancelled += 1
                job.future.set_exception(JobCancelled())
            else:
                self.stats.images += len(images)
                job.future.set_result(images)

    def _run_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_step: Callable[[int, int], None],
        cancelled: Callable[[], bool],
    ) -> list[list[GeneratedImage]]:
        """Runs on the engine thread: encode, sample, decode one batch; returns images per request."""
        pipe = self._pipe
        first = requests[0]
        width, height = first.width, first.height
        config = self.config
        factor = config.latent_scale
        seeds = [r.seed + i for r in requests for i in range(r.n)]
        prompts = [prompt for r in requests for prompt in (r.panels or (r.prompt,) * r.n)]
        negatives = [r.negative_prompt for r in requests for _ in range(r.n)]
        tokens = pipe.tokenize(prompts + negatives)
        both = pipe.encode_tokens(tokens)  # one text-encoder call
        cond, uncond = both[: len(prompts)], both[len(prompts) :]
        x_T = initial_noise(seeds, (config.latent_channels, height // factor, width // factor))
        init_latents = None
        strength = 1.0
        if first.init_image is not None:
            pixels = png_to_array(resize_png(first.init_image, width, height))
            init_latents = pipe.encode_images(np.repeat(pixels, first.n, axis=0))
            strength = first.strength
        latents = pipe.sample(
            cond,
            uncond,
            sampler=first.sampler,
            steps=first.steps,
            guidance_scale=first.guidance_scale,
            x_T=x_T,
            seed=first.seed,
            height=height,
            width=width,
            init_latents=init_latents,
            strength=strength,
            on_step=on_step,
            cancelled=cancelled,
            **self._consistency(first, width, height, tokens[: len(prompts)]),
        )
        if cancelled():
            raise JobCancelled()
        pngs = array_to_pngs(_to_numpy(pipe.decode_latents(latents)))
        out: list[list[GeneratedImage]] = []
        index = 0
        for request in requests:
            out.append(
                [
                    GeneratedImage(png=pngs[index + i], width=width, height=height, seed=request.seed + i)
                    for i in range(request.n)
                ]
            )
            index += request.n
        return out

    def _consistency(
        self, request: GenerationRequest, width: int, height: int, prompt_tokens: np.ndarray
    ) -> dict[str, Any]:
        """`sample`'s consistency argument: the reference pictures at the panel's size, encoded to latents,
        where in each panel's prompt (`prompt_tokens`) the words of each reference's character stand,
        and the sampling rate of panels drawn together (none when the request follows no reference and
        draws no panels, or its strength is 0)."""
        if request.consistency == 0.0:
            return {}
        if request.references and len(request.reference_images) != len(request.references):
            raise EngineUnavailable("The reference pictures of this drawing could not be loaded.")
        panel_rate = float(request.panel_rate) if request.panels else 0.0
        if not request.reference_images and panel_rate == 0.0:
            return {}
        from core.diffusion.consistency import Consistency, region_masks

        latents = regions = None
        if request.reference_images:
            pixels = np.concatenate([_cover(png, width, height) for png in request.reference_images])
            latents = self._pipe.encode_images(pixels)
            if any(request.reference_words):
                phrases = [[self._phrase(words)] for words in request.reference_words]
                regions = region_masks(np.asarray(prompt_tokens), phrases)
        return {
            "consistency": Consistency(
                references=latents,
                strength=float(request.consistency),
                panel_rate=panel_rate,
                regions=regions,
            )
        }

    def _phrase(self, words: str) -> np.ndarray:
        """The token ids of `words` as they stand inside a prompt (no [CLS], [SEP] or padding)."""
        if not words.strip():
            return np.zeros(0, np.int64)
        ids = self._pipe.tokenize([words])[0]
        tokenizer = self._pipe.tokenizer
        return ids[1 : list(ids).index(tokenizer.sep_id)]


def _cover(data: bytes, width: int, height: int) -> np.ndarray:
    """The picture scaled to cover (width, height) and centre-cropped (no stretching), as (1, 3, h, w)
    in [-1, 1]: a reference of another shape keeps its proportions."""
    image = ImageOps.fit(open_image(data).convert("RGB"), (width, height), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    return (pixels.transpose(2, 0, 1)[None] / 127.5 - 1.0).astype(np.float32)


def _safe_progress(callback: ProgressCallback, step: int, total: int) -> None:
    try:
        callback(step, total)
    except Exception:
        logger.exception("progress callback failed")


def _to_numpy(value: Any) -> np.ndarray:
    as_numpy = getattr(value, "asnumpy", None)
    return np.asarray(as_numpy() if callable(as_numpy) else value, dtype=np.float32)


# the two local engines


def wukong_engine(settings: Settings) -> LocalEngine:
    """The official model: weights from `settings.checkpoint_path`, loaded at `start()`; with
    HUAHUA_GRAPH_MODE the default size is compiled in the background right after."""
    device = mindspore_device(settings.device)
    dtype = resolve_dtype(device, settings.dtype)
    checkpoint, vocab = settings.checkpoint_path, settings.resolved_vocab_path
    tried: list[tuple[object, ...]] = []  # the files as they were at the last load

    def load() -> Any:
        tried[:] = [_files_state(checkpoint, vocab)]
        _check_device(device)  # before the files: a GPU user learns first that MindSpore cannot use it
        if not checkpoint.is_file():
            raise EngineUnavailable(
                f"The model weights are not installed ({checkpoint}); download them with `{FETCH_COMMAND}`."
            )
        if not vocab.is_file():
            raise EngineUnavailable(
                f"The tokenizer vocabulary is not installed ({vocab}); download it with `{FETCH_COMMAND}`."
            )
        diffusion = _import_diffusion()
        try:
            return diffusion.WukongPipeline.load(
                checkpoint,
                vocab,
                config=diffusion.WukongConfig(),
                device=device,
                dtype=dtype,
                graph=settings.graph_mode,
            )
        except CheckpointError as exc:
            raise EngineUnavailable(f"{exc.message} Download a fresh copy with `{FETCH_COMMAND}`.") from exc

    return LocalEngine(
        load,
        name="wukong",
        model="wukong-huahua",
        device=device,
        dtype=dtype,
        limits=EngineLimits.for_area(settings.image_area, max_steps=settings.max_steps),
        # load again once the files change, e.g. after `huahua model fetch`, not on every request
        reload_if=lambda: bool(tried) and _files_state(checkpoint, vocab) != tried[0],
        warm_up=compile_size if settings.graph_mode else None,
    )


def tiny_engine(settings: Settings, *, seed: int = 0, graph: bool = False) -> LocalEngine:
    """The same code at a tiny size with random weights: fast pictures of noise, for tests and demos.
    `graph`: its UNet compiled, and the default size compiled in the background at start, as the
    official engine does with HUAHUA_GRAPH_MODE.

    On MindSpore; where only the torch extra is installed (an NVIDIA user's machine), on the PyTorch
    pipeline instead, whose random weights for a seed are the same, so it draws the same pictures."""
    device = mindspore_device(settings.device)
    dtype = resolve_dtype(device, settings.dtype)
    holder: list[LocalEngine] = []

    def load() -> Any:
        vocab = tiny_vocabulary(settings)  # vocab_zh.txt when installed, else the built-in vocabulary
        if not installed("mindspore") and installed("torch"):
            return _tiny_torch(settings, vocab, seed, holder[0])
        _check_device(device)
        diffusion = _import_diffusion()
        return diffusion.WukongPipeline.random(
            diffusion.WukongConfig.tiny(), vocab, seed=seed, device=device, dtype=dtype, graph=graph
        )

    engine = LocalEngine(
        load,
        name="tiny",
        label="untrained test model",
        model="wukong-tiny",
        device=device,
        dtype=dtype,
        limits=EngineLimits.for_area(settings.tiny_image_area, max_steps=settings.max_steps),
        warm_up=compile_size if graph else None,
    )
    holder.append(engine)
    return engine


def _tiny_torch(settings: Settings, vocab: Any, seed: int, engine: LocalEngine) -> Any:
    from core.diffusion.config import WukongConfig
    from core.torch_engine.pipeline import TorchWukongPipeline, resolve_device

    device = resolve_device(settings.device)
    pipe = TorchWukongPipeline.random(WukongConfig.tiny(), vocab, seed=seed, device=device)
    engine.device, engine.dtype = pipe.device, pipe.dtype
    engine.label = "untrained test model, PyTorch"
    return pipe


def installed(package: str) -> bool:
    """Whether `package` can be imported here (found, not imported: MindSpore takes seconds to load)."""
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # a module set to None in sys.modules: as good as absent
        return False


def compile_size(pipe: Any, width: int, height: int) -> None:
    """One guided UNet call for one picture of (width, height), the shape a one-picture request at that
    size runs: the compiled UNet compiles it now."""
    cfg = pipe.config
    x = np.zeros((1, cfg.latent_channels, height // cfg.latent_scale, width // cfg.latent_scale), np.float32)
    ctx = np.zeros((1, cfg.context_length, cfg.context_dim), np.float32)
    pipe.guided_noise(x, 999, ctx, ctx, 7.5)


def _check_device(device: str) -> None:
    """EngineUnavailable, with what to do instead, when MindSpore cannot run on the GPU here."""
    if device != "GPU":
        return
    _import_diffusion()  # without MindSpore, that sentence first
    from core.diffusion.runtime import device_problem

    problem = device_problem(device)
    if problem is not None:
        logger.info("MindSpore on GPU: %s", problem)
        raise EngineUnavailable(MINDSPORE_GPU_UNAVAILABLE)


def _files_state(*paths: Path) -> tuple[object, ...]:
    """Size and modification time of each file (None when absent)."""
    return tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in paths)


def _import_diffusion() -> Any:
    try:
        import core.diffusion as diffusion
    except ImportError as exc:
        raise EngineUnavailable(
            "MindSpore is not installed here; install the worker extra (pip install 'huahua[worker]')."
        ) from exc
    return diffusion
