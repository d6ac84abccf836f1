"""Noise schedule and deterministic samplers (PLMS, DDIM, DPM-Solver++ 2M) in pure numpy.

Every sampler walks the given descending timesteps; the step from the last one lands on
`alphas_cumprod[0]`, as the reference's DDIM/PLMS samplers do. `eps_fn(x, t)` returns the
(already guided) noise prediction for latents `x` at integer timestep `t`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from core.errors import EngineUnavailable, InvalidOption, JobCancelled

SAMPLER_NAMES = ("dpm++2m", "ddim", "plms")
NUM_TRAIN_STEPS = 1000

EpsFn = Callable[[np.ndarray, int], np.ndarray]
StepCallback = Callable[[int, int], None]

PLMS_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    1: (3 / 2, -1 / 2),
    2: (23 / 12, -16 / 12, 5 / 12),
    3: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
"""Adams-Bashforth weights of (eps now, eps one step back, ...), keyed by how many past eps there are."""


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM training schedule: `betas` and their `alphas_cumprod`, float64 of shape (1000,)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray

    def __post_init__(self) -> None:
        for array in (self.betas, self.alphas_cumprod):
            array.setflags(write=False)

    @classmethod
    def official(cls) -> NoiseSchedule:
        """Wukong-Huahua's "scaled linear" schedule: linspace(sqrt(0.00085), sqrt(0.012), 1000) squared."""
        betas = np.linspace(0.00085**0.5, 0.012**0.5, NUM_TRAIN_STEPS, dtype=np.float64) ** 2
        return cls(betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))

    @property
    def num_train_steps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def make_timesteps(steps: int, strength: float = 1.0) -> np.ndarray:
    """Descending timesteps spaced 1000 // steps apart, offset by one as in the reference.

    Where `steps` divides 1000 this is exactly the reference's `range(0, 1000, 1000 // steps) + 1`,
    reversed (951, 901, ..., 51, 1 for 20 steps). Otherwise the reference yields an extra step; here the
    caller gets exactly `steps`. For 1000 steps the offset is dropped so the last index stays 999.
    `strength` < 1 (image-to-image) keeps only the last ceil(steps * strength) timesteps.
    """
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise InvalidOption(f"The number of steps must be a whole number, not {steps!r}.")
    if not 1 <= steps <= NUM_TRAIN_STEPS:
        raise InvalidOption(f"The number of steps must be between 1 and {NUM_TRAIN_STEPS}, not {steps}.")
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
        raise InvalidOption(f"The strength must be above 0 and at most 1, not {strength!r}.")
    spacing = NUM_TRAIN_STEPS // int(steps)
    offset = 1 if (steps - 1) * spacing + 1 < NUM_TRAIN_STEPS else 0
    timesteps = (np.arange(steps, dtype=np.int64) * spacing + offset)[::-1]
    keep = math.ceil(round(steps * strength, 9))
    return np.ascontiguousarray(timesteps[steps - keep :])


def add_noise(schedule: NoiseSchedule, x0: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
    """The forward process q(x_t | x_0): sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise, as float32."""
    if isinstance(t, bool) or not isinstance(t, int | np.integer) or not 0 <= t < schedule.num_train_steps:
        raise InvalidOption(f"The timestep must be between 0 and {schedule.num_train_steps - 1}, not {t}.")
    if np.shape(x0) != np.shape(noise):
        raise InvalidOption(f"Latents of shape {np.shape(x0)} and noise of shape {np.shape(noise)} differ.")
    acp = float(schedule.alphas_cumprod[int(t)])
    out = math.sqrt(acp) * np.asarray(x0, np.float64) + math.sqrt(1.0 - acp) * np.asarray(noise, np.float64)
    return out.astype(np.float32)


def _ddim_move(x: np.ndarray, eps: np.ndarray, a_t: float, a_next: float) -> np.ndarray:
    """Deterministic DDIM transfer from alpha-bar `a_t` to `a_next` along the predicted noise."""
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    return (math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps).astype(np.float32)


class _Walk:
    """Shared bookkeeping: validated inputs, alphas per step, eps calls, cancel and progress."""

    def __init__(
        self,
        eps_fn: EpsFn,
        x: np.ndarray,
        timesteps: np.ndarray,
        schedule: NoiseSchedule,
        on_step: StepCallback | None,
        cancelled: Callable[[], bool] | None,
    ) -> None:
        ts = np.asarray(timesteps)
        if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
            raise InvalidOption("The timesteps must be a non-empty 1-D array of whole numbers.")
        if ts.min() < 0 or ts.max() >= schedule.num_train_steps or np.any(np.diff(ts) >= 0):
            raise InvalidOption(
                f"The timesteps must strictly descend within 0..{schedule.num_train_steps - 1}."
            )
        if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
            raise InvalidOption("The latents must be a floating-point numpy array.")
        self.start = x.astype(np.float32)
        self.timesteps = [int(t) for t in ts]
        acp = schedule.alphas_cumprod
        self.alphas = [float(acp[t]) for t in self.timesteps]
        self.alphas_next = [*self.alphas[1:], float(acp[0])]
        self.eps_fn, self.on_step, self.cancelled = eps_fn, on_step, cancelled

    @property
    def total(self) -> int:
        return len(self.timesteps)

    def eps(self, x: np.ndarray, t: int, step: int) -> np.ndarray:
        out = np.asarray(self.eps_fn(x, t), dtype=np.float32)
        if out.shape != x.shape:
            raise EngineUnavailable(f"The model returned shape {out.shape} for latents of shape {x.shape}.")
        if not np.all(np.isfinite(out)):
            raise EngineUnavailable(f"The model produced NaN or infinite values at step {step}.")
        return out

    def before(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise JobCancelled()

    def after(self, i: int) -> None:
        if self.on_step is not None:
            self.on_step(i + 1, self.total)


def _ddim(walk: _Walk) -> np.ndarray:
    x = walk.start
    for i, t in enumerate(walk.timesteps):
        walk.before()
        x = _ddim_move(x, walk.eps(x, t, i + 1), walk.alphas[i], walk.alphas_next[i])
        walk.after(i)
    return x


def plms_combine(eps: np.ndarray, history: list[np.ndarray]) -> np.ndarray:
    """Adams-Bashforth combination of the current eps and up to three earlier ones (newest last)."""
    weights = PLMS_COEFFICIENTS[min(len(history), 3)]
    past = history[::-1][:3]
    out = weights[0] * eps
    for w, e in zip(weights[1:], past, strict=True):
        out = out + w * e
    return out.astype(np.float32)


def _plms(walk: _Walk) -> np.ndarray:
    x = walk.start
    history: list[np.ndarray] = []
    last = walk.total - 1
    for i, t in enumerate(walk.timesteps):
        walk.before()
        a_t, a_next = walk.alphas[i], walk.alphas_next[i]
        eps = walk.eps(x, t, i + 1)
        if not history:
            # Warm-up as the reference: an improved-Euler step that evaluates the model again at the target.
            x_trial = _ddim_move(x, eps, a_t, a_next)
            eps_next = walk.eps(x_trial, walk.timesteps[min(i + 1, last)], i + 1)
            eps_prime = ((eps + eps_next) / 2).astype(np.float32)
        else:
            eps_prime = plms_combine(eps, history)
        x = _ddim_move(x, eps_prime, a_t, a_next)
        history = [*history, eps][-3:]
        walk.after(i)
    return x


def _dpmpp_2m(walk: _Walk) -> np.ndarray:
    """DPM-Solver++(2M), Lu et al. 2022: multistep, data prediction, steps in lambda = log(alpha/sigma)."""
    x = walk.start
    prev_x0: np.ndarray | None = None
    prev_h = 0.0
    for i, t in enumerate(walk.timesteps):
        walk.before()
        a_t, a_next = walk.alphas[i], walk.alphas_next[i]
        alpha_s, sigma_s = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        alpha_t, sigma_t = math.sqrt(a_next), math.sqrt(1.0 - a_next)
        h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
        x0 = ((x - sigma_s * walk.eps(x, t, i + 1)) / alpha_s).astype(np.float32)
        if prev_x0 is None or i == walk.total - 1 or h == 0.0:
            d = x0
        else:
            half_inv_r = h / (2.0 * prev_h)
            d = ((1.0 + half_inv_r) * x0 - half_inv_r * prev_x0).astype(np.float32)
        x = ((sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * d).astype(np.float32)
        prev_x0, prev_h = x0, h
        walk.after(i)
    return x


_SAMPLERS: dict[str, Callable[[_Walk], np.ndarray]] = {"dpm++2m": _dpmpp_2m, "ddim": _ddim, "plms": _plms}


def run_sampler(
    name: str,
    eps_fn: EpsFn,
    x: np.ndarray,
    timesteps: np.ndarray,
    schedule: NoiseSchedule,
    on_step: StepCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Denoise `x` (float32) from `timesteps[0]` down to acp[0] with the named sampler; float32 out.

    `on_step(i, total)` runs after each step (i from 1); `cancelled()` is checked before each step and
    raises JobCancelled. One eps call per step, except PLMS which calls twice on its first step.
    """
    sampler = _SAMPLERS.get(name) if isinstance(name, str) else None
    if sampler is None:
        raise InvalidOption(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}.")
    return sampler(_Walk(eps_fn, x, timesteps, schedule, on_step, cancelled))
