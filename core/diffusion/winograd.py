"""3x3 convolutions (stride 1, padding 1, NCHW float32) by Winograd's minimal filtering, for the CPU.

MindSpore's CPU Conv2D (oneDNN im2col + sgemm) spends 9 multiply-adds per input value and output
channel; F(4x4, 3x3) spends 36/16 = 2.25. Per band of tile rows, numpy gathers the overlapping 6x6
input tiles and transforms them with one small matrix product, MindSpore's BatchMatMul multiplies
them by the transformed weights (36 products of (c_out, c_in) by (c_in, tiles)), and numpy
transforms the products back into 4x4 output tiles, adding the bias.

The transforms come from Toom-Cook interpolation points. Max error relative to the largest output,
960 input channels, against a float64 convolution: ops.conv2d 4e-7, F(2x2, 3x3) 8e-7, F(4x4, 3x3)
on the textbook points (0, +-1, +-2) 1.5e-5, on (0, +-1, 1/2, -2) 5.5e-6: the best of every pair
added to (0, +-1) from +-{1/4, 1/2, 3/4, 3/2, 2, 3, 4}.

Transformed weights are 4x the weight for F4 (16/9 for F2): kept for every convolution of the
official UNet they would take 5.6 GiB beside its 1.9 GiB of 3x3 weights, so they are made per call
(`transformed_weight`) and only where that still pays (`worth_it`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from core.diffusion import cpu_kernels, runtime  # noqa: F401  (runtime: process settings first)

_bmm = ops.BatchMatMul()
_BAND_BYTES = 16 * 1024 * 1024
"""Largest block of gathered input tiles made at once: the input is processed in bands of tile rows,
so the temporaries (gathered tiles, their transform, the products) stay a fraction of the input."""


@dataclass(frozen=True, eq=False)
class Scheme:
    """F(tile x tile, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A on (tile + 2)^2 input tiles.

    `a_t`, `b_t` and `g` are float64 (exact for `a_t` and `b_t`: the points are dyadic). The data
    transforms act on tiles flattened row by row, as Kronecker products: `tiles_in` = B^T (x) B^T,
    `tiles_out` = A^T (x) A^T, both float32 (still exact).
    """

    tile: int
    points: tuple[Fraction, ...]
    a_t: np.ndarray
    b_t: np.ndarray
    g: np.ndarray
    tiles_in: np.ndarray
    tiles_out: np.ndarray

    @property
    def alpha(self) -> int:
        return self.tile + 2


def _expand(roots: list[Fraction]) -> list[Fraction]:
    """Coefficients, lowest degree first, of the product of (x - root)."""
    coeffs = [Fraction(1)]
    for root in roots:
        coeffs = [Fraction(0), *coeffs]
        for k in range(len(coeffs) - 1):
            coeffs[k] -= root * coeffs[k + 1]
    return coeffs


def scheme(tile: int, points: tuple[int | Fraction, ...]) -> Scheme:
    """The F(tile, 3) transforms on `tile + 1` distinct finite points and infinity (Toom-Cook)."""
    alpha = tile + 2
    pts = tuple(Fraction(p) for p in points)
    if len(pts) != alpha - 1 or len(set(pts)) != len(pts):
        raise ValueError(f"F({tile}, 3) needs {alpha - 1} distinct points, got {points}")
    a_t = [[p**j for p in pts] + [Fraction(int(j == tile - 1))] for j in range(tile)]
    g: list[list[Fraction]] = []
    b_t: list[list[Fraction]] = []
    for i, p in enumerate(pts):
        others = [q for j, q in enumerate(pts) if j != i]
        scale = Fraction(1)
        for q in others:
            scale *= p - q
        g.append([p**k / scale for k in range(3)])
        b_t.append([*_expand(others), Fraction(0)])
    g.append([Fraction(0), Fraction(0), Fraction(1)])
    b_t.append(_expand(list(pts)))
    a64, b64 = np.array(a_t, np.float64), np.array(b_t, np.float64)
    return Scheme(
        tile=tile,
        points=pts,
        a_t=a64,
        b_t=b64,
        g=np.array(g, np.float64),
        tiles_in=np.kron(b64, b64).astype(np.float32),
        tiles_out=np.kron(a64, a64).astype(np.float32),
    )


F2 = scheme(2, (0, 1, -1))
"""F(2x2, 3x3): 16 products per 4 outputs, transformed weights 16/9 of the weight; max error about
1e-6 of the largest output, like the direct convolution (measured against ops.conv2d)."""
F4 = scheme(4, (0, 1, -1, Fraction(1, 2), -2))
"""F(4x4, 3x3): 36 products per 16 outputs, transformed weights 4x the weight; max error 2e-6 to
6e-6 of the largest output (32 to 2560 input channels)."""


def scheme_for(h: int, w: int) -> Scheme:
    """F4 from 16x16 up, F2 below: on small maps the products are too few to pay for reading F4's
    larger transformed weights (1280->1280, batch 2, F4 / F2 ms: 28.8 / 39.5 at 16x16, 26.0 / 25.1
    at 12x12, 18.6 / 12.4 at 8x8)."""
    return F4 if h * w >= 256 else F2


def worth_it(c_in: int, c_out: int, h: int, w: int) -> bool:
    """Whether `conv3x3`, its weight transform included, beats MindSpore 2.8's CPU Conv2D here.

    Convolution alone, batch 2, float32, 2 shared cores (Conv2D / Winograd ms): 960->320@64 282/126,
    640->640@64 318/159, 320->320@64 89/62, 1280->1280@32 332/111, 640->640@32 79/32,
    1920->640@32 234/94; the weight transform per call adds 10 ms (960x320) to 66 ms (1280x1280).
    At 16x16 and below the transform eats the gain (1280->1280@16 79 against 29 + 66; 2560->1280@16
    156 against 52 + 116), and with few channels Winograd loses outright (64->64@16, 32->32@64,
    4->320@64, 320->4@64). So: maps of 32x32 or more, 64 channels or more on both sides.
    """
    return min(c_in, c_out) >= 64 and h * w >= 32 * 32


_weights_product = ops.MatMul(transpose_b=True)


def transformed_weight(weight: Tensor, how: Scheme) -> Tensor:
    """G w G^T of a (c_out, c_in, 3, 3) float32 weight as (alpha^2, c_out, c_in), made on every call.

    One product, (G (x) G) (alpha^2, 9) by the weight seen as (c_out * c_in, 9) transposed, gives the
    layout the batched products want. Nothing is cached: kept, the transformed weights of the official
    UNet would need 4x its 3x3 weights (GiBs); made per call they cost 10 ms (960 -> 320) to 66 ms
    (1280 -> 1280) and only the maps of 32x32 and more use them (`worth_it`).
    """
    if weight.dtype != ms.float32 or len(weight.shape) != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"expected a float32 (c_out, c_in, 3, 3) weight, got {weight.dtype} {weight.shape}")
    c_out, c_in = weight.shape[:2]
    kernel = Tensor.from_numpy(np.kron(how.g, how.g).astype(np.float32))
    return _weights_product(kernel, weight.reshape(c_out * c_in, 9)).reshape(how.alpha**2, c_out, c_in)


def _valid(start: int, step: int, count: int, size: int) -> tuple[int, int]:
    """The range [lo, hi) of t in [0, count) with 0 <= start + step * t < size."""
    lo = min(count, max(0, -(start // step)))
    hi = max(lo, min(count, (size - 1 - start) // step + 1))
    return lo, hi


def _gather(x: np.ndarray, tile: int, first: int, into: np.ndarray) -> None:
    """Tiles of the zero-padded `x` (n, c, h, w) starting at tile row `first` into `into`
    (alpha^2, c, n, rows, cols): into[alpha * i + j][:, :, r, s] = x_pad[:, :, tile * (first + r) + i,
    tile * s + j] where x_pad has one row and column of zeros around `x`."""
    _, _, h, w = x.shape
    alpha, rows, cols = tile + 2, into.shape[3], into.shape[4]
    for i in range(alpha):
        top = tile * first + i - 1
        r_lo, r_hi = _valid(top, tile, rows, h)
        for j in range(alpha):
            c_lo, c_hi = _valid(j - 1, tile, cols, w)
            dest = into[alpha * i + j].transpose(1, 0, 2, 3)
            if r_hi == r_lo or c_hi == c_lo:
                dest[...] = 0
                continue
            dest[:, :, :r_lo] = 0
            dest[:, :, r_hi:] = 0
            dest[:, :, r_lo:r_hi, :c_lo] = 0
            dest[:, :, r_lo:r_hi, c_hi:] = 0
            y0, x0 = top + tile * r_lo, j - 1 + tile * c_lo
            dest[:, :, r_lo:r_hi, c_lo:c_hi] = x[:, :, y0::tile][:, :, : r_hi - r_lo, x0::tile][
                ..., : c_hi - c_lo
            ]


def _scatter(y: np.ndarray, tile: int, first: int, bias: np.ndarray | None, out: np.ndarray) -> None:
    """Output tiles y (tile^2, c_out, n, rows, cols) into `out` (n, c_out, h, w) from tile row `first`,
    plus the bias; tile parts beyond h and w are dropped."""
    _, _, h, w = out.shape
    rows, cols = y.shape[3], y.shape[4]
    for i in range(tile):
        top = tile * first + i
        r_lo, r_hi = _valid(top, tile, rows, h)
        for j in range(tile):
            c_lo, c_hi = _valid(j, tile, cols, w)
            if r_hi == r_lo or c_hi == c_lo:
                continue
            y0, x0 = top + tile * r_lo, j + tile * c_lo
            dest = out[:, :, y0::tile][:, :, : r_hi - r_lo, x0::tile][..., : c_hi - c_lo]
            part = y[tile * i + j].transpose(1, 0, 2, 3)[:, :, r_lo:r_hi, c_lo:c_hi]
            if bias is None:
                np.copyto(dest, part)
            else:
                np.add(part, bias, out=dest)


def conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None, how: Scheme | None = None) -> Tensor:
    """`ops.conv2d(x, weight, bias, pad_mode="pad", padding=1)` for a float32 NCHW `x` and a float32
    (c_out, c_in, 3, 3) weight, by Winograd's F(tile x tile, 3x3) (`scheme_for(h, w)` unless `how`
    is given), in bands of tile rows; any n, h, w."""
    if x.dtype != ms.float32 or len(x.shape) != 4:
        raise ValueError(f"expected a float32 (n, c, h, w) input, got {x.dtype} {x.shape}")
    if cpu_kernels.available():
        return _by_kernels(x, weight, bias, how)
    return Tensor.from_numpy(conv3x3_array(x.asnumpy(), weight, bias, how))


def _by_kernels(
    x: Tensor, weight: Tensor, bias: Tensor | None, how: Scheme | None, transformed: Tensor | None = None
) -> Tensor:
    """`conv3x3` with both data transforms in the C++ kernels (`cpu_kernels`): no numpy, the whole map
    at once (the transformed tiles are alpha^2 / m^2 times the input, 2.25x for F4)."""
    n, c, h, w = x.shape
    how = how or scheme_for(h, w)
    # The weight transform waits for the input: in a compiled graph, work that reads only parameters
    # may run early and hold its output (at 512x512 every early transform held 1.1 GB more in all).
    u = _checked_weight(c, ops.depend(weight, x), bias, how, transformed)
    c_out = u.shape[1]
    b_t, a_t = _matrices(how)
    products = _bmm(u, cpu_kernels.winograd_input(x, b_t))
    return cpu_kernels.winograd_output(products, a_t, _zeros(c_out) if bias is None else bias, n, h, w)


def _checked_weight(
    channels: int, weight: Tensor, bias: Tensor | None, how: Scheme, transformed: Tensor | None
) -> Tensor:
    """The transformed weight (alpha^2, c_out, c_in), after checking it fits an input of `channels`
    and that `bias`, if any, is float32 (c_out,)."""
    u = transformed_weight(weight, how) if transformed is None else transformed
    _, c_out, c_in = u.shape
    if channels != c_in:
        raise ValueError(f"input has {channels} channels, the weight expects {c_in}")
    if bias is not None and (tuple(bias.shape) != (c_out,) or bias.dtype != ms.float32):
        raise ValueError(f"expected a float32 ({c_out},) bias, got {bias.dtype} {bias.shape}")
    return u


@functools.cache
def _matrices(how: Scheme) -> tuple[Tensor, Tensor]:
    return Tensor(how.b_t.astype(np.float32)), Tensor(how.a_t.astype(np.float32))


@functools.cache
def _zeros(channels: int) -> Tensor:
    return Tensor(np.zeros(channels, np.float32))


def conv3x3_array(
    xs: np.ndarray,
    weight: Tensor,
    bias: Tensor | None = None,
    how: Scheme | None = None,
    transformed: Tensor | None = None,
) -> np.ndarray:
    """`conv3x3` of a float32 numpy map (n, c, h, w), returning a new numpy array; `transformed`,
    if given, is `transformed_weight(weight, how)` made once for several calls."""
    if xs.dtype != np.float32 or xs.ndim != 4:
        raise ValueError(f"expected a float32 (n, c, h, w) input, got {xs.dtype} {xs.shape}")
    if cpu_kernels.available():
        x = Tensor.from_numpy(np.ascontiguousarray(xs))
        return _by_kernels(x, weight, bias, how, transformed).asnumpy()
    n, c, h, w = xs.shape
    how = how or scheme_for(h, w)
    u = _checked_weight(c, weight, bias, how, transformed)
    alpha2, c_out, c_in = u.shape
    b = None if bias is None else bias.asnumpy()[None, :, None, None]
    tile = how.tile
    tile_rows, tile_cols = -(-h // tile), -(-w // tile)
    row_bytes = alpha2 * c_in * n * tile_cols * 4
    band = max(1, min(tile_rows, _BAND_BYTES // row_bytes))
    out = np.empty((n, c_out, h, w), np.float32)
    gathered = np.empty(alpha2 * c_in * n * band * tile_cols, np.float32)
    transformed = np.empty_like(gathered)
    tiles = np.empty(tile * tile * c_out * n * band * tile_cols, np.float32)
    for first in range(0, tile_rows, band):
        rows = min(band, tile_rows - first)
        d = gathered[: alpha2 * c_in * n * rows * tile_cols].reshape(alpha2, c_in, n, rows, tile_cols)
        v = transformed[: d.size].reshape(alpha2, -1)
        y = tiles[: tile * tile * c_out * n * rows * tile_cols].reshape(tile * tile, -1)
        _gather(xs, tile, first, d)
        np.matmul(how.tiles_in, d.reshape(alpha2, -1), out=v)
        products = _bmm(u, Tensor.from_numpy(v.reshape(alpha2, c_in, -1))).asnumpy()
        np.matmul(how.tiles_out, products.reshape(alpha2, -1), out=y)
        _scatter(y.reshape(tile * tile, c_out, n, rows, tile_cols), tile, first, b, out)
    return out
