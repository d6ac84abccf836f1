"""Building blocks shared by the text encoder, the UNet and the VAE (MindSpore classic nn/ops API)."""

from __future__ import annotations

import math
from collections.abc import Callable

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

# runtime applies process settings before the first operator
from core.diffusion import cpu_kernels, runtime, winograd

_bmm = ops.BatchMatMul()
_ATTENTION_CHUNK_BYTES = 64 * 1024 * 1024
"""Largest float32 score block (heads, queries, keys) built at once: heads are attended in groups that
fit (query slices where one head alone does not), so one guided 512x512 step never holds its full
1 GiB score matrix."""
_GELU_2_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715 * _GELU_2_SQRT_2_OVER_PI


class GroupNorm(nn.GroupNorm):
    """GroupNorm that always normalises in float32 and returns the input dtype (params gamma/beta).

    `kernels` (on when built on the CPU and `cpu_kernels` is available): our fused C++ kernel, 10-20x
    faster there than MindSpore's, which runs otherwise. `silu_of` fuses the SiLU that follows most
    norms (and an optional per-channel bias added before), one pass instead of three operators.
    `tiled` (on the CPU): without the kernel, that bias is tiled to the map's shape before it is added
    (see `expand`).
    """

    def __init__(self, groups: int, channels: int, eps: float) -> None:
        super().__init__(num_groups=groups, num_channels=channels, eps=eps, affine=True)
        self.groups = groups
        self.kernels = kernels_available()
        self.tiled = runtime.on_cpu()

    def construct(self, x: Tensor) -> Tensor:
        if x.dtype == ms.float32:
            return self._normalise(x)
        return self._normalise(x.astype(ms.float32)).astype(x.dtype)

    def _normalise(self, x: Tensor) -> Tensor:
        if self.kernels:
            return cpu_kernels.group_norm(x, self.gamma, self.beta, self.groups, self.eps)
        return super().construct(x)

    def silu_of(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """silu(norm(x + bias[:, :, None, None])); `bias` (n, c), if given, must have x's dtype."""
        if self.kernels and x.dtype == ms.float32:
            return cpu_kernels.group_norm(
                x, self.gamma, self.beta, self.groups, self.eps, silu=True, bias=bias
            )
        if bias is not None:
            n, c = bias.shape
            per_channel = bias.reshape(n, c, 1, 1)
            x = x + (expand(per_channel, x.shape) if self.tiled else per_channel)
        return ops.silu(self.construct(x))  # not self(x): a compiled graph calls no cell here

    def banded_affine(self, x: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean, rstd * gamma) of the whole map `x`, each (n, c, 1, 1) float32, read in
        bands of `rows` rows (two passes, sums in float64), so no full-size temporary is made."""
        n, c, h, w = x.shape
        per_group = c // self.groups

        def group_means(band_sum: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
            total = np.zeros((n, c), np.float64)
            for a in range(0, h, rows):
                total += band_sum(x[:, :, a : a + rows])
            means = total.reshape(n, self.groups, per_group).sum(-1) / (per_group * h * w)
            return np.repeat(means, per_group, axis=1)[:, :, None, None]

        mean = group_means(lambda band: band.sum(axis=(2, 3), dtype=np.float64))
        mean32 = mean.astype(np.float32)
        var = group_means(lambda band: np.square(band - mean32, dtype=np.float32).sum((2, 3), np.float64))
        gamma = self.gamma.asnumpy().astype(np.float64)[None, :, None, None]
        return mean32, (gamma / np.sqrt(var + self.eps)).astype(np.float32)

    def silu_of_affine(self, band: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """SiLU of rows of the map normalised with `banded_affine`'s statistics (float32, new array)."""
        out = np.subtract(band, mean, dtype=np.float32)
        out *= scale
        out += self.beta.asnumpy().astype(np.float32)[None, :, None, None]
        gate = np.negative(out)
        np.exp(gate, out=gate)
        gate += 1.0
        out /= gate
        return out


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last axis, in float32 (params gamma/beta); `kernels` as in `GroupNorm`."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__((width,), epsilon=eps)
        self.kernels = kernels_available()

    def construct(self, x: Tensor) -> Tensor:
        if x.dtype == ms.float32:
            return self._normalise(x)
        return self._normalise(x.astype(ms.float32)).astype(x.dtype)

    def _normalise(self, x: Tensor) -> Tensor:
        if self.kernels:
            return cpu_kernels.layer_norm(x, self.gamma, self.beta, self.epsilon)
        return super().construct(x)


def kernels_available() -> bool:
    """The default of the `kernels` switch: on the CPU, when our C++ kernels built (see `cpu_kernels`)."""
    return runtime.on_cpu() and cpu_kernels.available()


def expand(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """`x` repeated to `shape` (same rank, each axis of `x` either 1 or the full size).

    MindSpore's CPU kernels for element-wise operators that broadcast are about 30x slower than for
    operands of one shape (14 ms against 0.45 ms for 2.6M floats), while `ops.tile` copies at memory
    speed; so on the CPU a per-channel or per-row operand is tiled first.
    """
    return ops.tile(x, tuple(full // part for full, part in zip(shape, x.shape)))  # noqa: B905 (graph mode)


class Conv2d(nn.Conv2d):
    """A biased 2-D convolution with explicit padding (parameters weight/bias, as nn.Conv2d).

    `winograd` (on by default on the CPU): a 3x3, stride-1, padding-1 float32 convolution on a map
    where it pays (`winograd.worth_it`) runs by Winograd's algorithm, 1.4-3x faster there than
    MindSpore's CPU convolution. With the C++ kernels it also runs in a compiled graph; without them
    its transforms are numpy, so a compiled graph turns it off.
    """

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, padding: int | tuple[int, ...]
    ) -> None:
        mode = "pad" if padding else "valid"
        super().__init__(c_in, c_out, kernel, stride=stride, pad_mode=mode, padding=padding, has_bias=True)
        self.three_by_three = kernel == 3 and stride == 1 and padding == 1
        self.winograd = runtime.on_cpu()

    def winograd_for(self, c_in: int, h: int, w: int) -> bool:
        """Whether a float32 (n, c_in, h, w) input runs by Winograd's algorithm."""
        return self.winograd and self.three_by_three and winograd.worth_it(c_in, self.out_channels, h, w)

    def construct(self, x: Tensor) -> Tensor:
        _, c_in, h, w = x.shape
        if x.dtype == ms.float32 and self.winograd_for(c_in, h, w):
            return winograd.conv3x3(x, self.weight, self.bias)
        return super().construct(x)


def conv2d(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int | tuple[int, ...] = 0) -> Conv2d:
    """A biased 2-D convolution with explicit padding (see `Conv2d`)."""
    return Conv2d(c_in, c_out, kernel, stride, padding)


def band_rows(shape: tuple[int, ...], itemsize: int, band_bytes: int | None) -> int | None:
    """Rows per band when a map of `shape` (n, c, h, w) is larger than `band_bytes`; None: run it whole."""
    if band_bytes is None:
        return None
    n, c, h, w = shape
    row_bytes = n * c * w * itemsize
    return None if h * row_bytes <= band_bytes else max(1, band_bytes // row_bytes)


def banded_conv3x3(
    source: Callable[[int, int], np.ndarray],
    height: int,
    conv: nn.Conv2d,
    rows: int,
    residual: Callable[[int, int], np.ndarray] | None = None,
    into: np.ndarray | None = None,
) -> np.ndarray:
    """A 3x3, stride-1, padding-1 convolution computed `rows` output rows at a time.

    `source(lo, hi)` makes rows [lo, hi) of the convolution's input (so normalisation, activation and
    upsampling are applied per band); `residual(a, b)`, if given, is added to output rows [a, b). Each
    band reads one halo row above and below, so the result equals the whole-map convolution, while only
    the output and one band of temporaries exist at a time. Bands are numpy arrays: MindSpore's memory
    pool keeps every block it ever held, numpy hands large blocks back at once.

    `into`, if given, receives the output in place and may be the very map `source` reads: each band's
    input is made before the previous band's output is written over the rows it shares.
    """
    dtype = conv.weight.dtype
    starts = list(range(0, height, rows))
    if dtype == ms.float32 and isinstance(conv, Conv2d):
        # Winograd pads every band with zeros itself: bands carry their real halo rows and the
        # output rows computed from the zero rows beyond a band are dropped.
        band = source(0, min(height, rows + 1)).astype(np.float32, copy=False)
        if conv.winograd_for(band.shape[1], min(height, rows + 2), band.shape[3]):
            return _banded_winograd(source, height, conv, rows, band, residual, into)

    def band_input(a: int) -> Tensor:
        b = min(height, a + rows)
        lo, hi = max(0, a - 1), min(height, b + 1)
        pads = ((0, 0), (0, 0), (1 if a == 0 else 0, 1 if b == height else 0), (1, 1))
        return Tensor.from_numpy(np.pad(source(lo, hi), pads)).astype(dtype)

    out = into
    upcoming: Tensor | None = band_input(0)
    for i, a in enumerate(starts):
        b = min(height, a + rows)
        values = ops.conv2d(upcoming, conv.weight, conv.bias).asnumpy()
        upcoming = band_input(starts[i + 1]) if i + 1 < len(starts) else None
        out = _place_band(out, values, a, b, height, residual)
    assert out is not None
    return out


def _place_band(
    out: np.ndarray | None,
    values: np.ndarray,
    a: int,
    b: int,
    height: int,
    residual: Callable[[int, int], np.ndarray] | None,
) -> np.ndarray:
    """Output rows [a, b) of a banded convolution into `out` (made on the first band), plus the residual."""
    if out is None:
        out = pooled_array((*values.shape[:2], height, values.shape[3]), values.dtype)
    out[:, :, a:b] = values
    if residual is not None:
        out[:, :, a:b] += residual(a, b)
    return out


def pooled_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zeroed numpy array for a whole map; on the CPU it lies in MindSpore's memory pool.

    The pool keeps every block it ever held, and after a UNet step it holds hundreds of MiB of free
    blocks: a decoder map placed there reuses them instead of growing the process by a fresh numpy
    allocation. The array is a zero-copy view of a tensor's memory and keeps that memory alive itself
    (its base is the tensor's device address).
    """
    pool_dtype = {np.dtype(np.float32): ms.float32, np.dtype(np.float16): ms.float16}.get(np.dtype(dtype))
    if pool_dtype is None or not runtime.on_cpu():
        return np.zeros(shape, dtype)
    return ops.zeros(shape, pool_dtype).asnumpy()


def _banded_winograd(
    source: Callable[[int, int], np.ndarray],
    height: int,
    conv: Conv2d,
    rows: int,
    first: np.ndarray,
    residual: Callable[[int, int], np.ndarray] | None,
    into: np.ndarray | None,
) -> np.ndarray:
    """`banded_conv3x3` by Winograd's algorithm; `first` is source(0, min(height, rows + 1))."""
    how = winograd.scheme_for(min(height, rows + 2), first.shape[3])
    transformed = winograd.transformed_weight(conv.weight, how)
    out = into
    upcoming: np.ndarray | None = first
    for a in range(0, height, rows):
        b = min(height, a + rows)
        lo = max(0, a - 1)
        assert upcoming is not None
        values = winograd.conv3x3_array(upcoming, conv.weight, conv.bias, how, transformed)
        values = values[:, :, a - lo : a - lo + b - a]
        if b < height:  # the next band's input is made before this band's output lands in `into`
            upcoming = source(b - 1, min(height, b + rows + 1)).astype(np.float32, copy=False)
            if into is not None and np.may_share_memory(upcoming, into):
                upcoming = upcoming.copy()
        out = _place_band(out, values, a, b, height, residual)
    assert out is not None
    return out


class WrappedConv(nn.Cell):
    """A convolution one name level down (`<name>.conv.weight`), as the official UNet stores it."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(x)


class SiLU(nn.Cell):
    def construct(self, x: Tensor) -> Tensor:
        return ops.silu(x)


class Identity(nn.Cell):
    """Holds a slot without parameters (the official layout's dropout) so indices match."""

    def construct(self, x: Tensor) -> Tensor:
        return x


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation (MindSpore's `GeLU` primitive, as the reference uses), via
    0.5 * (1 + tanh(z)) = sigmoid(2z): several times faster on CPU than `ops.gelu`. `x` should be
    contiguous: MindSpore's CPU element-wise kernels are several times slower on strided views."""
    return x * ops.sigmoid(x * (ops.square(x) * _GELU_CUBIC + _GELU_2_SQRT_2_OVER_PI))


def upsample_nearest(x: Tensor) -> Tensor:
    """Double height and width by nearest-neighbour repetition."""
    _, _, h, w = x.shape
    return ops.ResizeNearestNeighbor((h * 2, w * 2))(x)


def host_permute(x: Tensor, shape: tuple[int, ...], perm: tuple[int, ...]) -> Tensor:
    """`x` reshaped to `shape` and permuted to `perm`, copied through numpy (CPU, PyNative only).

    On the CPU numpy's copy is about 10x faster than MindSpore's Transpose kernel (1 ms against 12 ms
    for 2.6M floats in 40-float runs), and the numpy view of a tensor is free.
    """
    return Tensor.from_numpy(np.ascontiguousarray(x.asnumpy().reshape(shape).transpose(perm)))


def split_heads(x: Tensor, heads: int, host: bool = False) -> Tensor:
    """(b, n, heads*d) -> (b*heads, n, d); `host`: the copy goes through numpy (see `host_permute`)."""
    b, n, width = x.shape
    d = width // heads
    if host:
        return host_permute(x, (b, n, heads, d), (0, 2, 1, 3)).reshape(b * heads, n, d)
    return x.reshape(b, n, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, n, d)


def split_heads_transposed(x: Tensor, heads: int, host: bool = False) -> Tensor:
    """(b, n, heads*d) -> (b*heads, d, n): the keys as the score product wants them, in one copy."""
    b, n, width = x.shape
    d = width // heads
    if host:
        return host_permute(x, (b, n, heads, d), (0, 2, 3, 1)).reshape(b * heads, d, n)
    return x.reshape(b, n, heads, d).transpose(0, 2, 3, 1).contiguous().reshape(b * heads, d, n)


def merge_heads(x: Tensor, heads: int, host: bool = False) -> Tensor:
    """(b*heads, n, d) -> (b, n, heads*d)."""
    bh, n, d = x.shape
    if host:
        return host_permute(x, (bh // heads, heads, n, d), (0, 2, 1, 3)).reshape(bh // heads, n, heads * d)
    x = x.reshape(bh // heads, heads, n, d).transpose(0, 2, 1, 3)
    return x.reshape(bh // heads, n, heads * d)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, kernels: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over batched heads (bh, n, d); softmax in float32, by our
    C++ kernel if `kernels` (see `cpu_kernels`; the caller's switch).

    The keys are transposed once into a contiguous (bh, d, m) block: MindSpore's CPU BatchMatMul is
    about twice as slow with `transpose_b` or strided views. See `attention_keys_first`.
    """
    return attention_keys_first(q, k.transpose(0, 2, 1).contiguous(), v.contiguous(), mask, kernels)


def attention_keys_first(
    q: Tensor, k_t: Tensor, v: Tensor, mask: Tensor | None = None, kernels: bool = False
) -> Tensor:
    """`attention` with the keys given transposed, (bh, d, m); q (bh, n, d), v (bh, m, d) contiguous.

    The score block never exceeds `_ATTENTION_CHUNK_BYTES`: whole heads are taken in groups (slices of
    the leading axis are contiguous, so no operand is copied), and where one head's scores alone are
    larger, that head's queries are taken in slices (every slice sees all keys). The result is the same
    as in one block.
    """
    bh, n, d = q.shape
    m = k_t.shape[2]
    q = q * (1.0 / math.sqrt(d))
    head_bytes = n * m * 4
    if bh * head_bytes <= _ATTENTION_CHUNK_BYTES:
        return _attend(q, k_t, v, mask, kernels)
    if head_bytes <= _ATTENTION_CHUNK_BYTES:
        group = _ATTENTION_CHUNK_BYTES // head_bytes
        parts = [
            _attend(q[i : i + group], k_t[i : i + group], v[i : i + group], mask, kernels)
            for i in range(0, bh, group)
        ]
        return ops.concat(parts, 0)
    rows = max(1, _ATTENTION_CHUNK_BYTES // (m * 4))
    heads = []
    for i in range(bh):
        q_i, k_i, v_i = q[i : i + 1], k_t[i : i + 1], v[i : i + 1]
        slices = [
            _attend(q_i[:, a : a + rows], k_i, v_i, None if mask is None else mask[a : a + rows], kernels)
            for a in range(0, n, rows)
        ]
        heads.append(ops.concat(slices, 1))
    return ops.concat(heads, 0)


def _attend(q: Tensor, k_t: Tensor, v: Tensor, mask: Tensor | None, kernels: bool) -> Tensor:
    scores = _bmm(q, k_t)
    if scores.dtype != ms.float32:
        scores = scores.astype(ms.float32)
    if mask is not None:
        scores = scores + mask
    weights = cpu_kernels.softmax(scores) if kernels else ops.softmax(scores, -1)
    return _bmm(weights.astype(v.dtype), v)


def timestep_embedding(timesteps: np.ndarray, dim: int, max_period: float = 10000.0) -> np.ndarray:
    """Sinusoidal embedding (n, dim), cos first then sin, as the official UNet uses."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half)
    args = np.asarray(timesteps, dtype=np.float32)[:, None] * freqs[None, :]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1)
    return emb.astype(np.float32)


CPU_PATHS = ("kernels", "tiled", "host", "winograd", "fused_proj")
"""Switches that cells read to pick their CPU implementations (each is on when built on the CPU):
`kernels` (our C++ kernels from `cpu_kernels`, when they built), `tiled` (no broadcasting element-wise
operators), `host` (layout copies through numpy: PyNative only), `winograd` (3x3 convolutions by
Winograd's algorithm, see `Conv2d`) and `fused_proj` (1x1 projections as products with transpose
flags)."""


def prepare_for_graph(cell: nn.Cell) -> None:
    """Turn off the CPU paths a compiled graph cannot run: numpy copies, and Winograd's numpy
    transforms where the C++ kernels are not built."""
    set_cpu_paths(cell, host=False, winograd=runtime.on_cpu() and cpu_kernels.available())


def set_cpu_paths(cell: nn.Cell, **switches: bool) -> None:
    """Set CPU-path switches (names from `CPU_PATHS`) on `cell` and every cell under it that has them."""
    unknown = set(switches) - set(CPU_PATHS)
    if unknown:
        raise ValueError(f"unknown CPU path switches: {sorted(unknown)}")
    for _, sub in cell.cells_and_names():
        for name, enabled in switches.items():
            if hasattr(sub, name):
                setattr(sub, name, enabled)
