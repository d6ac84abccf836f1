"""AutoencoderKL: images (n, 3, H, W) in [-1, 1] <-> latents (n, 4, H/8, W/8)."""

from __future__ import annotations

from collections.abc import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from core.diffusion import cpu_kernels
from core.diffusion.config import WukongConfig
from core.diffusion.layers import (
    GroupNorm,
    attention,
    band_rows,
    banded_conv3x3,
    conv2d,
    upsample_nearest,
)

Residual = Callable[[int, int], np.ndarray]
NORM_EPS = 1e-6
DECODE_BAND_BYTES = 8 * 1024 * 1024
"""Decoder maps larger than this are computed in bands of rows (the same result, a smaller peak): at
512x512 the 128- and 256-channel maps are 128-256 MiB each, and a whole-map GroupNorm + SiLU + conv
holds several of them at once."""


def _norm_silu_conv(
    x: np.ndarray,
    norm: GroupNorm,
    conv: nn.Conv2d,
    rows: int,
    residual: Residual | None = None,
    in_place: bool = False,
) -> np.ndarray:
    """conv(silu(norm(x))) in bands of rows; `x` (n, c, h, w) stays whole, temporaries are per band.
    `in_place` writes the result over `x` (same shape), which the caller must own."""
    mean, scale = norm.banded_affine(x, rows)

    def source(lo: int, hi: int) -> np.ndarray:
        return norm.silu_of_affine(x[:, :, lo:hi], mean, scale).astype(x.dtype, copy=False)

    return banded_conv3x3(source, x.shape[2], conv, rows, residual, into=x if in_place else None)


class ResnetBlock(nn.Cell):
    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, c_in, NORM_EPS)
        self.conv1 = conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = GroupNorm(groups, c_out, NORM_EPS)
        self.conv2 = conv2d(c_out, c_out, 3, padding=1)
        self.has_shortcut = c_in != c_out
        if self.has_shortcut:
            self.nin_shortcut = conv2d(c_in, c_out, 1)

    def construct(self, x: Tensor, band_bytes: int | None = None) -> Tensor:
        rows = band_rows(x.shape, x.itemsize, band_bytes)
        if rows is not None:
            return self._banded(x, rows)
        h = self.conv1(self.norm1.silu_of(x))
        h = self.conv2(self.norm2.silu_of(h))
        return (self.nin_shortcut(x) if self.has_shortcut else x) + h

    def _banded(self, x: Tensor, rows: int) -> Tensor:
        values = x.asnumpy()
        h = _norm_silu_conv(values, self.norm1, self.conv1, rows)
        if self.has_shortcut:

            def residual(a: int, b: int) -> np.ndarray:
                return self.nin_shortcut(x[:, :, a:b]).asnumpy()
        else:

            def residual(a: int, b: int) -> np.ndarray:
                return values[:, :, a:b]

        return Tensor.from_numpy(_norm_silu_conv(h, self.norm2, self.conv2, rows, residual, True))


class AttnBlock(nn.Cell):
    """Single-head self-attention over all pixels, with 1x1-convolution projections.

    `kernels` (off by default; on only where our C++ kernels built): the fused token-layout attention
    kernel of `cpu_kernels`, in blocks of queries, instead of a whole score matrix (64 MiB at 512x512)
    softmaxed by MindSpore's operator. Measured on 2 cores it made the 512x512 decode slower, not faster
    (`bench/vae_attention.py`, docs/architecture.md), so MindSpore's products run unless turned on.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = GroupNorm(groups, channels, NORM_EPS)
        self.q = conv2d(channels, channels, 1)
        self.k = conv2d(channels, channels, 1)
        self.v = conv2d(channels, channels, 1)
        self.proj_out = conv2d(channels, channels, 1)
        self.scale = channels**-0.5
        self.kernels = False

    def construct(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t: Tensor) -> Tensor:
            return t.reshape(b, c, h * w).transpose(0, 2, 1)

        q, k, v = tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n))
        if self.kernels and x.dtype == ms.float32 and cpu_kernels.attention_available():
            out = cpu_kernels.attention_tokens(q.contiguous(), k.contiguous(), v.contiguous(), 1, self.scale)
        else:
            out = attention(q, k, v)
        return x + self.proj_out(out.transpose(0, 2, 1).reshape(b, c, h, w))


class Downsample(nn.Cell):
    """Stride-2 convolution with asymmetric padding (bottom and right only)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv2d(channels, channels, 3, stride=2, padding=(0, 1, 0, 1))

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Cell):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv2d(channels, channels, 3, padding=1)

    def construct(self, x: Tensor, band_bytes: int | None = None) -> Tensor:
        n, c, h, w = x.shape
        rows = band_rows((n, c, 2 * h, 2 * w), x.itemsize, band_bytes)
        if rows is None:
            return self.conv(upsample_nearest(x))

        values = x.asnumpy()

        def source(lo: int, hi: int) -> np.ndarray:
            first = lo // 2
            doubled = values[:, :, first : (hi + 1) // 2].repeat(2, axis=2).repeat(2, axis=3)
            return doubled[:, :, lo - 2 * first : hi - 2 * first]

        return Tensor.from_numpy(banded_conv3x3(source, 2 * h, self.conv, rows))


class _Mid(nn.Cell):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def construct(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Cell):
    """One resolution: its ResnetBlocks and a resampler.

    The official checkpoint stores a resampler for every level, also the one that never runs
    (the last encoder level, the first decoder level); it is kept so the names and shapes match.
    """

    def __init__(self, blocks: list[ResnetBlock], resampler: nn.Cell, name: str) -> None:
        super().__init__()
        self.block = nn.CellList(blocks)
        self._resampler_name = name
        setattr(self, name, resampler)

    def construct(self, x: Tensor, resample: bool) -> Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self._resampler_name)(x) if resample else x


class Encoder(nn.Cell):
    def __init__(self, config: WukongConfig) -> None:
        super().__init__()
        ch, groups, mult = config.vae_channels, config.norm_groups, config.vae_channel_mult
        self.conv_in = conv2d(3, ch, 3, padding=1)
        levels = []
        c_in = ch
        for m in mult:
            blocks = []
            for _ in range(config.vae_res_blocks):
                blocks.append(ResnetBlock(c_in, ch * m, groups))
                c_in = ch * m
            levels.append(_Level(blocks, Downsample(c_in), "downsample"))
        self.down = nn.CellList(levels)
        self.mid = _Mid(c_in, groups)
        self.norm_out = GroupNorm(groups, c_in, NORM_EPS)
        self.conv_out = conv2d(c_in, 2 * config.latent_channels, 3, padding=1)

    def construct(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        last = len(self.down) - 1
        for i, level in enumerate(self.down):
            h = level(h, i != last)
        h = self.mid(h)
        return self.conv_out(self.norm_out.silu_of(h))


class Decoder(nn.Cell):
    def __init__(self, config: WukongConfig) -> None:
        super().__init__()
        ch, groups, mult = config.vae_channels, config.norm_groups, config.vae_channel_mult
        c_in = ch * mult[-1]
        self.conv_in = conv2d(config.latent_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, groups)
        levels: list[_Level] = []
        for m in reversed(mult):
            blocks = []
            for _ in range(config.vae_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, ch * m, groups))
                c_in = ch * m
            levels.insert(0, _Level(blocks, Upsample(c_in), "upsample"))
        self.up = nn.CellList(levels)
        self.norm_out = GroupNorm(groups, c_in, NORM_EPS)
        self.conv_out = conv2d(c_in, 3, 3, padding=1)

    def construct(self, z: Tensor, band_bytes: int | None = None) -> Tensor:
        """Images from latents; maps over `band_bytes` are computed in bands (None: all whole).

        The loop rebinds one name per map so each map is freed as soon as the next one exists.
        """
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h, band_bytes)
            if i != 0:
                h = level.upsample(h, band_bytes)
        rows = band_rows(h.shape, h.itemsize, band_bytes)
        if rows is not None:
            return Tensor.from_numpy(_norm_silu_conv(h.asnumpy(), self.norm_out, self.conv_out, rows))
        return self.conv_out(self.norm_out.silu_of(h))


class AutoencoderKL(nn.Cell):
    def __init__(self, config: WukongConfig) -> None:
        super().__init__()
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = conv2d(z, z, 1)

    def encode_mean(self, x: Tensor) -> Tensor:
        """The posterior mean (unscaled) of images in [-1, 1]."""
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : moments.shape[1] // 2]

    def decode(self, z: Tensor, band_bytes: int | None = DECODE_BAND_BYTES) -> Tensor:
        """Unscaled latents -> images (not clipped); `band_bytes` as in `Decoder.construct`."""
        return self.decoder(self.post_quant_conv(z), band_bytes)
