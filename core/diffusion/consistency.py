"""Training-free character consistency: which tokens each panel's self-attention also reads (pure numpy).

Two sources, both appended as extra keys and values to a panel's self-attention in every transformer
block (`CrossAttention.shared`):

- reference pictures (reference-only attention): each reference latent, noised to the panel's timestep
  with the forward process (one fixed noise draw per reference), runs through the UNet in the same
  batch with the unconditional (empty) prompt, and every panel row reads all of its tokens;
- the other panels of one batch (StoryDiffusion's consistent self-attention): every panel row reads a
  random sample (`panel_rate` of the tokens) of each other panel of its guidance half, drawn afresh
  every step from the sampling seed, so a seed reproduces the picture.

Batch layout of one shared UNet call: the panels' unconditional rows, their conditional rows (when
guided), then one row per reference. The first (halves x panels) rows are the readers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import InvalidOption

DEFAULT_STEPS = 0.6
"""Share during the first 60% of the sampling steps: the layout and identity form early; the last
steps refine texture from the panel's own prompt."""
DEFAULT_PANEL_RATE = 0.5
"""StoryDiffusion samples about half of the other images' tokens at 512 pixels."""


@dataclass(frozen=True)
class Consistency:
    """How one sampling call keeps characters consistent; `active` says whether it changes anything."""

    references: np.ndarray | None = None
    """(r, 4, h, w) clean latents (scaled, as `encode_images` returns), the panels' latent size."""
    strength: float = 1.0
    """Blend of each self-attention output with (1) and without (0) the shared tokens (above 1: more)."""
    steps: float = DEFAULT_STEPS
    """Fraction of the sampling steps, the first ones, that share."""
    panel_rate: float = 0.0
    """Fraction of each other panel's tokens a panel reads (0: panels drawn together do not share)."""

    def __post_init__(self) -> None:
        for name, value, low, high in (
            ("consistency strength", self.strength, 0.0, 2.0),
            ("share of steps", self.steps, 0.0, 1.0),
            ("panel sampling rate", self.panel_rate, 0.0, 1.0),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise InvalidOption(f"The {name} must be between {low:g} and {high:g}, not {value!r}.")
        if self.references is not None:
            refs = np.asarray(self.references)
            if refs.ndim != 4 or refs.shape[0] == 0:
                raise InvalidOption(f"Reference latents must have shape (r, 4, h, w), not {refs.shape}.")

    @property
    def reference_count(self) -> int:
        return 0 if self.references is None else int(np.shape(self.references)[0])

    def active(self, panels: int) -> bool:
        """Whether sharing changes a call with this many panels."""
        if self.strength == 0.0 or self.steps == 0.0:
            return False
        return self.reference_count > 0 or (self.panel_rate > 0.0 and panels > 1)

    def shared_timesteps(self, timesteps: Sequence[int]) -> frozenset[int]:
        """The timesteps (of the descending schedule) at which sharing runs: the first ceil(steps x n)."""
        count = math.ceil(round(self.steps * len(timesteps), 9))
        return frozenset(int(t) for t in list(timesteps)[:count])


def share_indices(
    *,
    panels: int,
    halves: int,
    references: int,
    tokens: int,
    panel_rate: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Int32 indices (readers * m,) into the batch flattened to (rows * tokens) tokens, for one resolution.

    Reader (g, p) = row g * panels + p reads every token of each reference row, then
    round(panel_rate * tokens) tokens (at least one, sorted, without repeats) of each other panel q of
    half g. Every reader reads the same number m of tokens, so the call has one static shape.
    """
    readers = halves * panels
    first_reference = readers
    take = max(1, round(panel_rate * tokens)) if panel_rate > 0.0 and panels > 1 else 0
    m = references * tokens + (panels - 1) * take
    if m == 0:
        raise InvalidOption("Nothing to share: give a reference or draw several panels together.")
    out = np.empty((readers, m), np.int32)
    own_refs = (np.arange(references)[:, None] + first_reference) * tokens + np.arange(tokens)[None, :]
    for g in range(halves):
        for p in range(panels):
            row = g * panels + p
            parts = [own_refs.reshape(-1)]
            for q in range(panels):
                if q != p and take:
                    picked = np.sort(rng.choice(tokens, size=take, replace=False))
                    parts.append((g * panels + q) * tokens + picked)
            out[row] = np.concatenate(parts)
    return out.reshape(-1)


def reference_noise(references: np.ndarray, seed: int | None) -> np.ndarray:
    """One fixed standard-normal draw per reference latent, from the sampling seed."""
    rng = np.random.default_rng(None if seed is None else [int(seed), 12])
    return rng.standard_normal(np.shape(references)).astype(np.float32)
