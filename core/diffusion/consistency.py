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

Several characters in one scene (`regions`): each reference is read mostly where its character is.
In every transformer block each reader's queries get a map M_r in [REGION_FLOOR, 1] per reference
from the block's cross-attention to the words naming that reference's character in the panel's
conditional prompt (`region_masks` finds them), and reference r's keys get the logit bias log M_r(q);
see `CrossAttention.region_log_maps` in `core.diffusion.unet`.
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
REGION_FLOOR = 0.1
"""Where a character is not, its reference is still read with a tenth of the weight (a logit bias of
log 0.1): the maps of one block are a coarse guess, so a reference never vanishes from a panel."""
REGION_EPS = 1e-6
"""Keeps the regional map's normalisations finite where a map is flat or every map is zero."""


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
    regions: np.ndarray | None = None
    """(r, panels, context_length) 0/1: for each reference, the token positions of each panel's
    conditional prompt that name its character (`region_masks`). That reference is then read mostly
    where those words' cross-attention falls; None, or a panel's all-zero row, reads it everywhere."""

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
        if self.regions is not None:
            regions = np.asarray(self.regions)
            if self.references is None:
                raise InvalidOption("Character regions need the reference pictures they place.")
            if regions.ndim != 3 or regions.shape[0] != self.reference_count:
                raise InvalidOption(
                    f"Character regions must have shape ({self.reference_count}, panels, tokens): one "
                    f"row per reference picture, not {regions.shape}."
                )
            if not np.isin(regions, (0, 1)).all():
                raise InvalidOption("Character regions must hold only 0 and 1.")

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


def region_masks(prompt_tokens: np.ndarray, phrases: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """(r, panels, L) float32 0/1: for reference r, every position of each panel's tokens (panels, L)
    covered by an occurrence (as a contiguous run) of any token sequence in `phrases[r]`.

    Overlapping and repeated occurrences are all marked; an empty sequence marks nothing."""
    tokens = np.asarray(prompt_tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise InvalidOption(f"Prompt tokens must be whole numbers of shape (panels, L), not {tokens.shape}.")
    panels, length = tokens.shape
    out = np.zeros((len(phrases), panels, length), np.float32)
    for r, sequences in enumerate(phrases):
        for sequence in sequences:
            phrase = np.asarray(sequence).reshape(-1)
            if phrase.size == 0 or phrase.size > length:
                continue
            if not np.issubdtype(phrase.dtype, np.integer):
                raise InvalidOption("Phrase tokens must be whole numbers.")
            windows = np.lib.stride_tricks.sliding_window_view(tokens, phrase.size, axis=1)
            starts = (windows == phrase).all(axis=-1)  # (panels, L - size + 1)
            for offset in range(phrase.size):
                out[r, :, offset : offset + starts.shape[1]] += starts
    return np.minimum(out, 1.0, out=out)


def reader_regions(
    consistency: Consistency, panels: int, halves: int, context_length: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The regions of each reader row: (tokens (readers, L, r) float32, the batch row of the prompt
    whose cross-attention maps them (readers,) int32), or None when no panel has a region.

    Reader (g, p) takes panel p's region tokens and reads the maps of p's conditional row, the last
    half's: an unconditional row places each character where its conditional twin does."""
    if consistency.regions is None:
        return None
    regions = np.asarray(consistency.regions, np.float32)
    if regions.shape[1:] != (panels, context_length):
        raise InvalidOption(
            f"Character regions must have shape ({regions.shape[0]}, {panels}, {context_length}) for "
            f"{panels} panel(s), not {regions.shape}."
        )
    if not regions.any():
        return None
    per_panel = np.ascontiguousarray(regions.transpose(1, 2, 0))  # (panels, L, r)
    tokens = np.concatenate([per_panel] * halves)
    rows = np.tile(np.arange(panels, dtype=np.int32) + (halves - 1) * panels, halves)
    return tokens, rows


def check_regions(
    regions: tuple[np.ndarray, np.ndarray], readers: int, batch: int, context_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """`predict_noise`'s `regions` checked: (tokens (readers, L, r) float32 0/1, rows (readers,) int32)
    with every r a reference row after the readers and every row inside the batch."""
    tokens, rows = (np.asarray(part) for part in regions)
    if (
        tokens.ndim != 3
        or tokens.shape[:2] != (readers, context_length)
        or not 1 <= tokens.shape[2] <= batch - readers
    ):
        raise InvalidOption(
            f"Shared regions must have shape ({readers}, {context_length}, r) with r reference rows."
        )
    if not np.isin(tokens, (0, 1)).all():
        raise InvalidOption("Shared regions must hold only 0 and 1.")
    if rows.shape != (readers,) or not np.issubdtype(rows.dtype, np.integer):
        raise InvalidOption(f"Shared regions need one prompt row per reader ({readers}).")
    if rows.min() < 0 or rows.max() >= batch:
        raise InvalidOption(f"Shared region rows must lie in [0, {batch}).")
    return tokens.astype(np.float32), rows.astype(np.int32)


def reference_noise(references: np.ndarray, seed: int | None) -> np.ndarray:
    """One fixed standard-normal draw per reference latent, from the sampling seed."""
    rng = np.random.default_rng(None if seed is None else [int(seed), 12])
    return rng.standard_normal(np.shape(references)).astype(np.float32)
