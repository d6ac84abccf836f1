"""WukongPipeline: tokenize, encode text, predict noise, sample with guidance, encode and decode images.

Every public method takes and returns numpy arrays (float32 latents and images, int64 token ids), so
callers never touch MindSpore. Classifier-free guidance runs the unconditional and the conditional
inputs as one batch, one UNet call per step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor

from core.diffusion.checkpoint import WukongModel, build_model, load_weights, randomize
from core.diffusion.config import WukongConfig
from core.diffusion.consistency import Consistency, reference_noise, share_indices
from core.diffusion.layers import prepare_for_graph
from core.diffusion.samplers import SAMPLER_NAMES, NoiseSchedule, add_noise, make_timesteps, run_sampler
from core.errors import EngineUnavailable, InvalidOption, JobCancelled
from core.tokenizer import WordPieceTokenizer

logger = logging.getLogger(__name__)

DEVICES = ("CPU", "GPU", "Ascend")
DTYPES = ("float32", "float16")
COMPILED_SHAPES = 4
"""With `graph=True` the UNet is compiled for at most this many input shapes (batch, height, width and
text length), the first ones it meets; other shapes run eagerly (the same results). On 2 CPU cores a
512x512 compile takes about 10 s, and each compiled shape keeps about 100 MB for the life of the
process, so a bot whose users pick many sizes keeps a bounded footprint."""


def _use_device(device: str) -> None:
    """Select PyNative mode on `device`; MindSpore allows one device target per process."""
    if device not in DEVICES:
        raise InvalidOption(f"Unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    try:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        current = ms.get_context("device_target")
        if current != device:
            ms.set_device(device)
    except Exception as exc:
        logger.warning("cannot use device %s: %s", device, exc)
        raise EngineUnavailable(f"MindSpore cannot run on {device} here.") from None


def _float_array(value: object, what: str, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidOption(f"The {what} must be a numeric array.") from None
    if array.ndim != ndim:
        raise InvalidOption(f"The {what} must have {ndim} dimensions, not shape {array.shape}.")
    if array.shape[0] == 0:
        raise InvalidOption(f"The {what} must not be empty.")
    if not np.isfinite(array).all():
        raise InvalidOption(f"The {what} contain NaN or infinite values.")
    return array


class WukongPipeline:
    """The Wukong-Huahua text-to-image model: weights, tokenizer and noise schedule together."""

    def __init__(
        self,
        model: WukongModel,
        config: WukongConfig,
        tokenizer: WordPieceTokenizer | None,
        *,
        device: str = "CPU",
        dtype: str = "float32",
        random_weights: bool = False,
        graph: bool = False,
    ) -> None:
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.random_weights = random_weights
        self.schedule = NoiseSchedule.official()
        self._ms_dtype = ms.float16 if dtype == "float16" else ms.float32
        # graph=True runs the UNet as a compiled static graph for the first COMPILED_SHAPES input shapes
        # it meets, eagerly for any other: the same results, faster after a compile per shape.
        self.graph = graph
        if graph:
            prepare_for_graph(model.unet)
        self._compiled = ms.jit(model.unet.construct) if graph else None
        self._compiled_shapes: set[tuple[int, ...]] = set()
        model.set_train(False)

    # construction

    @classmethod
    def load(
        cls,
        ckpt_path: str | Path,
        vocab_path: str | Path,
        config: WukongConfig | None = None,
        device: str = "CPU",
        dtype: str = "float32",
        graph: bool = False,
    ) -> WukongPipeline:
        """The model with weights from a MindSpore `.ckpt` or a `.safetensors` file."""
        config = config or WukongConfig()
        cls._check_dtype(dtype)
        tokenizer = WordPieceTokenizer.from_file(vocab_path)
        _use_device(device)
        model = build_model(config)
        load_weights(model, ckpt_path, dtype=dtype)
        logger.info("loaded %s on %s (%s)", Path(ckpt_path).name, device, dtype)
        return cls(model, config, tokenizer, device=device, dtype=dtype, graph=graph)

    @classmethod
    def random(
        cls,
        config: WukongConfig | None = None,
        vocab_path: str | Path | WordPieceTokenizer | None = None,
        seed: int = 0,
        device: str = "CPU",
        dtype: str = "float32",
        graph: bool = False,
    ) -> WukongPipeline:
        """The same model with random weights drawn from numpy (the same `seed` gives the same model).

        `vocab_path` is a vocabulary file or a ready tokenizer (the tiny engine's built-in vocabulary)."""
        config = config or WukongConfig()
        cls._check_dtype(dtype)
        if vocab_path is None or isinstance(vocab_path, WordPieceTokenizer):
            tokenizer = vocab_path
        else:
            tokenizer = WordPieceTokenizer.from_file(vocab_path)
        _use_device(device)
        model = build_model(config)
        randomize(model, seed, dtype=dtype)
        return cls(model, config, tokenizer, device=device, dtype=dtype, random_weights=True, graph=graph)

    @staticmethod
    def _check_dtype(dtype: str) -> None:
        if dtype not in DTYPES:
            raise InvalidOption(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Official parameter name -> shape."""
        return {name: tuple(p.shape) for name, p in self.model.named_parameters().items()}

    # text

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids (n, context_length) int64: [CLS] pieces [SEP] [PAD]..."""
        if self.tokenizer is None:
            raise EngineUnavailable("This model was built without a tokenizer vocabulary.")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InvalidOption("The texts to tokenize must be a list of strings.")
        return self.tokenizer.encode_batch(list(texts), context_length=self.config.context_length)

    def encode_tokens(self, ids: np.ndarray) -> np.ndarray:
        """The text condition (n, context_length, text_width) float32."""
        array = np.asarray(ids)
        cfg = self.config
        if array.ndim != 2 or array.shape[1] != cfg.context_length or array.shape[0] == 0:
            raise InvalidOption(f"Token ids must have shape (n, {cfg.context_length}), not {array.shape}.")
        if not np.issubdtype(array.dtype, np.integer):
            raise InvalidOption("Token ids must be whole numbers.")
        if array.min() < 0 or array.max() >= cfg.vocab_size:
            raise InvalidOption(f"Token ids must lie in [0, {cfg.vocab_size}).")
        out = self.model.text_encoder(Tensor(array.astype(np.int32)))
        return out.astype(ms.float32).asnumpy()

    # noise prediction and sampling

    def predict_noise(
        self,
        x: np.ndarray,
        t: np.ndarray,
        ctx: np.ndarray,
        *,
        share: tuple[np.ndarray, Sequence[np.ndarray]] | None = None,
    ) -> np.ndarray:
        """The UNet's noise estimate eps(x_t, t, ctx): (n, 4, h, w) float32.

        `share` = (weights (k,), one int32 index array per rate of `unet.share_rates`): the first k
        rows' self-attention also reads those tokens of the batch (see `core.diffusion.consistency`)."""
        cfg = self.config
        x = _float_array(x, "latents", 4)
        ctx = _float_array(ctx, "text condition", 3)
        n, c, h, w = x.shape
        if c != cfg.latent_channels:
            raise InvalidOption(f"The latents must have {cfg.latent_channels} channels, not {c}.")
        if h % cfg.unet_multiple or w % cfg.unet_multiple:
            raise InvalidOption(f"The latent height and width must be multiples of {cfg.unet_multiple}.")
        if ctx.shape[0] != n or ctx.shape[2] != cfg.context_dim:
            raise InvalidOption(f"The text condition must have shape ({n}, L, {cfg.context_dim}).")
        steps = np.asarray(t).reshape(-1)
        if steps.shape != (n,) or not np.issubdtype(steps.dtype, np.integer):
            raise InvalidOption(f"The timesteps must be {n} whole numbers.")
        if steps.min() < 0 or steps.max() >= self.schedule.num_train_steps:
            raise InvalidOption(f"The timesteps must lie in [0, {self.schedule.num_train_steps}).")
        t_emb = self.model.unet.embed_timesteps(steps, self._ms_dtype)
        if share is None:
            unet = self._unet_for((*x.shape, *ctx.shape))
            eps = unet(Tensor(x, dtype=self._ms_dtype), t_emb, Tensor(ctx, dtype=self._ms_dtype))
        else:
            tensors = self._share_tensors(share, x.shape)
            unet = self._unet_for((*x.shape, *ctx.shape, *(int(i.shape[0]) for i in tensors[1:])))
            eps = unet(Tensor(x, dtype=self._ms_dtype), t_emb, Tensor(ctx, dtype=self._ms_dtype), tensors)
        return eps.astype(ms.float32).asnumpy()

    def _share_tensors(
        self, share: tuple[np.ndarray, Sequence[np.ndarray]], shape: tuple[int, ...]
    ) -> tuple[Tensor, ...]:
        """Checked `share` tensors: weights (k, 1, 1) in the model's dtype, then the index per rate."""
        weights, indices = share
        w = np.asarray(weights, np.float32).reshape(-1)
        n, _, h, width = shape
        rates = self.model.unet.share_rates
        if not 1 <= w.size <= n or not np.isfinite(w).all():
            raise InvalidOption(f"Sharing needs 1 to {n} finite reader weights, not {w.size}.")
        if len(indices) != len(rates):
            raise InvalidOption(f"Sharing needs one token index per UNet resolution ({len(rates)}).")
        out = [Tensor(w.reshape(-1, 1, 1), dtype=self._ms_dtype)]
        for rate, index in zip(rates, indices, strict=True):
            flat = np.asarray(index).reshape(-1)
            tokens = n * (h // rate) * (width // rate)
            if flat.size == 0 or flat.size % w.size or not np.issubdtype(flat.dtype, np.integer):
                raise InvalidOption("Each shared token index must hold whole numbers, as many per reader.")
            if flat.min() < 0 or flat.max() >= tokens:
                raise InvalidOption(f"Shared token indices must lie in [0, {tokens}).")
            out.append(Tensor(flat.astype(np.int32)))
        # mutable: the index values change every step; as constants each call would compile again
        return ms.mutable(tuple(out))

    def _unet_for(self, shape: tuple[int, ...]) -> Callable[..., Tensor]:
        """The compiled UNet for a shape it is (or may still be) compiled for, else the eager one."""
        if self._compiled is None:
            return self.model.unet
        if shape not in self._compiled_shapes and len(self._compiled_shapes) >= COMPILED_SHAPES:
            return self.model.unet
        self._compiled_shapes.add(shape)
        return self._compiled

    def guided_noise(
        self, x: np.ndarray, t: int, ctx: np.ndarray, uncond_ctx: np.ndarray | None, guidance_scale: float
    ) -> np.ndarray:
        """eps = u + g * (c - u), with the unconditional and conditional halves in one UNet batch."""
        n = x.shape[0]
        if uncond_ctx is None or guidance_scale == 1.0:
            return self.predict_noise(x, np.full(n, t, np.int64), ctx)
        batch = self.predict_noise(
            np.concatenate([x, x]), np.full(2 * n, t, np.int64), np.concatenate([uncond_ctx, ctx])
        )
        uncond, cond = batch[:n], batch[n:]
        return uncond + np.float32(guidance_scale) * (cond - uncond)

    def sample(
        self,
        ctx: np.ndarray,
        uncond_ctx: np.ndarray | None,
        sampler: str = "dpm++2m",
        steps: int = 20,
        guidance_scale: float = 7.5,
        x_T: np.ndarray | None = None,
        *,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        init_latents: np.ndarray | None = None,
        strength: float = 1.0,
        on_step: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        consistency: Consistency | None = None,
    ) -> np.ndarray:
        """Final latents (n, 4, h, w) float32 from noise (or from noised `init_latents`).

        `consistency`, when active, shares reference latents and the n panels' tokens into every
        self-attention during its first steps (see `core.diffusion.consistency`); otherwise, and at
        the other steps, each step is exactly the plain guided step."""
        if sampler not in SAMPLER_NAMES:
            raise InvalidOption(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}.")
        if not isinstance(guidance_scale, int | float) or not math.isfinite(guidance_scale):
            raise InvalidOption("The guidance scale must be a finite number.")
        shape = self._latent_shape(ctx, x_T, init_latents, height, width)
        ctx = self._batched(ctx, shape[0], "text condition")
        uncond = None if uncond_ctx is None else self._batched(uncond_ctx, shape[0], "negative condition")
        if x_T is not None:
            noise = _float_array(x_T, "initial noise", 4)
        else:
            noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        if init_latents is None:
            timesteps = make_timesteps(steps)
            x = noise
        else:
            timesteps = make_timesteps(steps, strength=strength)
            x0 = _float_array(init_latents, "initial latents", 4)
            x = add_noise(self.schedule, x0, noise, int(timesteps[0])).astype(np.float32)

        shared = self._consistency_step(
            consistency, shape, timesteps, ctx, uncond, float(guidance_scale), seed
        )

        def eps_fn(latents: np.ndarray, t: int) -> np.ndarray:
            if cancelled is not None and cancelled():
                raise JobCancelled()
            if shared is not None and int(t) in shared[0]:
                return shared[1](latents, int(t))
            return self.guided_noise(latents, int(t), ctx, uncond, float(guidance_scale))

        return run_sampler(sampler, eps_fn, x, timesteps, self.schedule, on_step=on_step, cancelled=cancelled)

    def _consistency_step(
        self,
        consistency: Consistency | None,
        shape: tuple[int, int, int, int],
        timesteps: np.ndarray,
        ctx: np.ndarray,
        uncond: np.ndarray | None,
        guidance_scale: float,
        seed: int | None,
    ) -> tuple[frozenset[int], Callable[[np.ndarray, int], np.ndarray]] | None:
        """(the timesteps that share, the guided noise estimate with sharing), or None when inactive."""
        n = shape[0]
        if consistency is None or not consistency.active(n):
            return None
        refs = np.zeros((0, *shape[1:]), np.float32)
        if consistency.references is not None:
            refs = _float_array(consistency.references, "reference latents", 4)
            if refs.shape[1:] != shape[1:]:
                raise InvalidOption(
                    f"Reference latents must have shape (r, {', '.join(map(str, shape[1:]))})."
                )
        ref_noise = reference_noise(refs, seed)
        guided = uncond is not None and guidance_scale != 1.0
        halves = 2 if guided else 1
        readers = halves * n
        # references are read as pictures, not as any text: they run with the unconditional prompt
        ref_ctx = np.repeat((uncond if uncond is not None else ctx)[:1], refs.shape[0], axis=0)
        panel_ctx = np.concatenate([uncond, ctx]) if guided and uncond is not None else ctx
        rng = np.random.default_rng(None if seed is None else [int(seed), 13])
        weights = np.full(readers, consistency.strength, np.float32)
        rates = self.model.unet.share_rates
        _, _, h, w = shape

        def step(latents: np.ndarray, t: int) -> np.ndarray:
            noised = add_noise(self.schedule, refs, ref_noise, t) if refs.shape[0] else refs
            rows = np.concatenate([*([latents] * halves), noised])
            indices = [
                share_indices(
                    panels=n,
                    halves=halves,
                    references=refs.shape[0],
                    tokens=(h // rate) * (w // rate),
                    panel_rate=consistency.panel_rate,
                    rng=rng,
                )
                for rate in rates
            ]
            eps = self.predict_noise(
                rows,
                np.full(rows.shape[0], t, np.int64),
                np.concatenate([panel_ctx, ref_ctx]),
                share=(weights, indices),
            )[:readers]
            if not guided:
                return eps
            plain, cond = eps[:n], eps[n:]
            return plain + np.float32(guidance_scale) * (cond - plain)

        return consistency.shared_timesteps([int(t) for t in timesteps]), step

    def _latent_shape(
        self,
        ctx: np.ndarray,
        x_T: np.ndarray | None,
        init_latents: np.ndarray | None,
        height: int | None,
        width: int | None,
    ) -> tuple[int, int, int, int]:
        cfg = self.config
        for given in (x_T, init_latents):
            if given is not None:
                shape = np.shape(given)
                if len(shape) != 4:
                    raise InvalidOption(f"Latents must have shape (n, 4, h, w), not {shape}.")
                return (int(shape[0]), int(shape[1]), int(shape[2]), int(shape[3]))
        height = cfg.image_size if height is None else height
        width = cfg.image_size if width is None else width
        m = cfg.image_multiple
        for side in (height, width):
            if not isinstance(side, int) or side <= 0 or side % m:
                raise InvalidOption(
                    f"Image height and width must be positive multiples of {m}, not {side!r}."
                )
        n = int(np.shape(ctx)[0]) if np.ndim(ctx) == 3 else 0
        if n == 0:
            raise InvalidOption("The text condition must have shape (n, L, width) with n >= 1.")
        return (n, cfg.latent_channels, height // cfg.latent_scale, width // cfg.latent_scale)

    @staticmethod
    def _batched(ctx: np.ndarray, n: int, what: str) -> np.ndarray:
        array = _float_array(ctx, what, 3)
        if array.shape[0] == n:
            return array
        if array.shape[0] == 1:
            return np.repeat(array, n, axis=0)
        raise InvalidOption(f"The {what} has {array.shape[0]} rows for {n} latents.")

    # images

    def decode_latents(self, z: np.ndarray) -> np.ndarray:
        """Latents (n, 4, h, w) -> images (n, 3, 8h, 8w) in [-1, 1]."""
        z = _float_array(z, "latents", 4)
        if z.shape[1] != self.config.latent_channels:
            raise InvalidOption(f"The latents must have {self.config.latent_channels} channels.")
        s = self.config.latent_scale
        images = np.empty((z.shape[0], 3, z.shape[2] * s, z.shape[3] * s), np.float32)
        for i in range(z.shape[0]):  # one image at a time: the peak does not grow with the batch
            scaled = Tensor(z[i : i + 1] / np.float32(self.config.scale_factor), dtype=self._ms_dtype)
            images[i : i + 1] = self.model.vae.decode(scaled).astype(ms.float32).asnumpy()
        return np.clip(images, -1.0, 1.0, out=images)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Images (n, 3, H, W) in [-1, 1] -> latents (n, 4, H/8, W/8): posterior mean times 0.18215."""
        images = _float_array(images, "images", 4)
        s = self.config.latent_scale
        if images.shape[1] != 3 or images.shape[2] % s or images.shape[3] % s:
            raise InvalidOption(f"Images must have shape (n, 3, H, W) with H and W multiples of {s}.")
        mean = self.model.vae.encode_mean(Tensor(images, dtype=self._ms_dtype))
        return mean.astype(ms.float32).asnumpy() * np.float32(self.config.scale_factor)
