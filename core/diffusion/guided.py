"""What both Wukong pipelines (MindSpore, PyTorch) share: input checks and the guided sampling loop.

Everything here is numpy around one `predict_noise` call per UNet batch, so a seed gives the same picture
on every engine. A pipeline supplies `config`, `tokenizer`, `schedule`, `predict_noise` (which takes the
shared tokens of a consistency step into its UNet) and `share_rates`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence

import numpy as np

from core.diffusion.config import WukongConfig
from core.diffusion.consistency import Consistency, reader_regions, reference_noise, share_indices
from core.diffusion.samplers import SAMPLER_NAMES, NoiseSchedule, add_noise, make_timesteps, run_sampler
from core.errors import EngineUnavailable, InvalidOption, JobCancelled
from core.tokenizer import WordPieceTokenizer


def float_array(value: object, what: str, ndim: int) -> np.ndarray:
    """`value` as a finite, non-empty float32 array of `ndim` dimensions; InvalidOption otherwise."""
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


class GuidedSampling(abc.ABC):
    """The conformance API's engine-independent half; subclasses run the networks."""

    config: WukongConfig
    tokenizer: WordPieceTokenizer | None
    schedule: NoiseSchedule

    @abc.abstractmethod
    def predict_noise(
        self,
        x: np.ndarray,
        t: np.ndarray,
        ctx: np.ndarray,
        *,
        share: tuple[np.ndarray, Sequence[np.ndarray]] | None = None,
        regions: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The UNet's noise estimate for latents `x` at timesteps `t` under text condition `ctx`;
        `share` and `regions` as `core.diffusion.WukongPipeline.predict_noise` describes them."""

    @property
    @abc.abstractmethod
    def share_rates(self) -> tuple[int, ...]:
        """The UNet's downsampling rates with attention, in the order of a `share` tuple's indices."""

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
        """(the timesteps that share, the guided noise estimate with sharing), or None when inactive.

        One shared UNet call holds the panels' unconditional rows, their conditional rows (when guided),
        then one row per reference (noised to the step's timestep); see `core.diffusion.consistency`."""
        n = shape[0]
        if consistency is None or not consistency.active(n):
            return None
        refs = np.zeros((0, *shape[1:]), np.float32)
        if consistency.references is not None:
            refs = float_array(consistency.references, "reference latents", 4)
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
        rates = self.share_rates
        _, _, h, w = shape
        regions = reader_regions(consistency, n, halves, ctx.shape[1])

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
                regions=regions,
            )[:readers]
            if not guided:
                return eps
            plain, cond = eps[:n], eps[n:]
            return plain + np.float32(guidance_scale) * (cond - plain)

        return consistency.shared_timesteps([int(t) for t in timesteps]), step

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids (n, context_length) int64: [CLS] pieces [SEP] [PAD]..."""
        if self.tokenizer is None:
            raise EngineUnavailable("This model was built without a tokenizer vocabulary.")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InvalidOption("The texts to tokenize must be a list of strings.")
        return self.tokenizer.encode_batch(list(texts), context_length=self.config.context_length)

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
            noise = float_array(x_T, "initial noise", 4)
        else:
            noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        if init_latents is None:
            timesteps = make_timesteps(steps)
            x = noise
        else:
            timesteps = make_timesteps(steps, strength=strength)
            x0 = float_array(init_latents, "initial latents", 4)
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
        array = float_array(ctx, what, 3)
        if array.shape[0] == n:
            return array
        if array.shape[0] == 1:
            return np.repeat(array, n, axis=0)
        raise InvalidOption(f"The {what} has {array.shape[0]} rows for {n} latents.")
