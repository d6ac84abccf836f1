"""The Winograd 3x3 convolution equals ops.conv2d, also after its weights change."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from tests.support import NO_MINDSPORE, skip_needing

ms = pytest.importorskip("mindspore", reason=NO_MINDSPORE)

from mindspore import Parameter, Tensor, ops  # noqa: E402

from core.diffusion import WukongConfig, cpu_kernels, winograd  # noqa: E402
from core.diffusion.checkpoint import build_model, randomize  # noqa: E402
from core.diffusion.layers import banded_conv3x3, conv2d, prepare_for_graph  # noqa: E402

TOLERANCE = 1e-5
"""Max abs difference from ops.conv2d relative to the largest output (measured at these sizes:
F2 up to 6e-7, F4 up to 1.6e-6)."""


def _random(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> np.ndarray:
    return ops.conv2d(x, weight, bias, pad_mode="pad", padding=1).asnumpy()


def _error(got: Tensor, expected: np.ndarray) -> float:
    assert got.shape == expected.shape
    assert got.dtype == ms.float32
    return float(np.abs(got.asnumpy() - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("how", [winograd.F2, winograd.F4], ids=["F2", "F4"])
@pytest.mark.parametrize(
    ("n", "c_in", "c_out", "h", "w"),
    [
        (1, 3, 5, 1, 1),
        (2, 4, 6, 5, 7),
        (1, 8, 4, 9, 4),
        (2, 16, 8, 12, 13),
        (1, 24, 16, 17, 16),
        (2, 6, 3, 2, 3),
    ],
)
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "numpy"])
def test_equals_conv2d(
    how: winograd.Scheme,
    n: int,
    c_in: int,
    c_out: int,
    h: int,
    w: int,
    kernels: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both ways of making the data transforms: the C++ kernels (where built) and numpy."""
    if kernels and not cpu_kernels.available():
        skip_needing("the fused C++ CPU kernels", "a C++ compiler: apt-get install g++")
    monkeypatch.setattr(winograd.cpu_kernels, "available", lambda: kernels)
    x = Tensor(_random((n, c_in, h, w), 1))
    weight = Parameter(Tensor(_random((c_out, c_in, 3, 3), 2)), name="w")
    bias = Parameter(Tensor(_random((c_out,), 3)), name="b")
    assert _error(winograd.conv3x3(x, weight, bias, how), _reference(x, weight, bias)) < TOLERANCE
    assert _error(winograd.conv3x3(x, weight, None, how), _reference(x, weight, None)) < TOLERANCE


@pytest.mark.parametrize("how", [winograd.F2, winograd.F4], ids=["F2", "F4"])
@pytest.mark.parametrize("rows", [1, 5])
def test_bands_of_tile_rows(how: winograd.Scheme, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of `rows` tile rows (the last one shorter) give the whole-map result."""
    n, c_in, h, w = 2, 5, 23, 10
    x = Tensor(_random((n, c_in, h, w), 4))
    weight = Tensor(_random((7, c_in, 3, 3), 5))
    bias = Tensor(_random((7,), 6))
    firsts: list[int] = []
    real_gather = winograd._gather

    def gather(x: np.ndarray, tile: int, first: int, into: np.ndarray) -> None:
        firsts.append(first)
        real_gather(x, tile, first, into)

    tile_rows, tile_cols = -(-h // how.tile), -(-w // how.tile)
    monkeypatch.setattr(winograd.cpu_kernels, "available", lambda: False)  # the numpy path bands
    monkeypatch.setattr(winograd, "_gather", gather)
    monkeypatch.setattr(winograd, "_BAND_BYTES", rows * how.alpha**2 * c_in * n * tile_cols * 4)
    got = winograd.conv3x3(x, weight, bias, how)
    assert firsts == list(range(0, tile_rows, rows))
    assert _error(got, _reference(x, weight, bias)) < TOLERANCE


@pytest.mark.parametrize(
    ("tile", "points"),
    [
        (2, (0, 1, -1)),
        (4, (0, 1, -1, 2, -2)),
        (4, (0, 1, -1, Fraction(1, 2), -2)),
        (6, (0, 1, -1, 2, -2, 3, -3)),
    ],
)
def test_scheme_computes_a_one_dimensional_correlation(tile: int, points: tuple[int | Fraction, ...]) -> None:
    how = winograd.scheme(tile, points)
    rng = np.random.default_rng(7)
    d, g = rng.standard_normal(tile + 2), rng.standard_normal(3)
    y = how.a_t @ ((how.g @ g) * (how.b_t @ d))
    np.testing.assert_allclose(y, [d[j : j + 3] @ g for j in range(tile)], rtol=0, atol=1e-9)
    assert np.array_equal(how.tiles_in, np.kron(how.b_t, how.b_t))
    assert np.array_equal(how.tiles_out, np.kron(how.a_t, how.a_t))


def test_scheme_needs_distinct_points() -> None:
    with pytest.raises(ValueError, match="distinct points"):
        winograd.scheme(4, (0, 1, -1, 2, 2))
    with pytest.raises(ValueError, match="needs 3"):
        winograd.scheme(2, (0, 1))


def test_scheme_and_worth_it_follow_the_measurements() -> None:
    assert winograd.scheme_for(64, 64) is winograd.F4
    assert winograd.scheme_for(16, 16) is winograd.F4
    assert winograd.scheme_for(12, 12) is winograd.F2
    assert winograd.scheme_for(8, 8) is winograd.F2
    assert winograd.worth_it(960, 320, 64, 64)
    assert winograd.worth_it(1280, 1280, 32, 32)
    assert winograd.worth_it(64, 64, 32, 32)
    assert not winograd.worth_it(1280, 1280, 16, 16)
    assert not winograd.worth_it(64, 64, 16, 16)
    assert not winograd.worth_it(32, 32, 64, 64)
    assert not winograd.worth_it(4, 320, 64, 64)
    assert not winograd.worth_it(320, 4, 64, 64)
    assert not winograd.worth_it(1280, 1280, 4, 4)


def test_rejects_what_it_cannot_compute() -> None:
    x = Tensor(_random((1, 4, 6, 6), 8))
    weight = Tensor(_random((2, 4, 3, 3), 9))
    with pytest.raises(ValueError, match="input has 3 channels"):
        winograd.conv3x3(Tensor(_random((1, 3, 6, 6), 8)), weight)
    with pytest.raises(ValueError, match="float32"):
        winograd.conv3x3(x.astype(ms.float16), weight)
    with pytest.raises(ValueError, match="float32"):
        winograd.conv3x3(x, weight.astype(ms.float16))
    with pytest.raises(ValueError, match="bias"):
        winograd.conv3x3(x, weight, Tensor(_random((3,), 1)))
    with pytest.raises(ValueError, match="3, 3"):
        winograd.conv3x3(x, Tensor(_random((2, 4, 1, 1), 9)))


@pytest.mark.parametrize("how", [winograd.F2, winograd.F4], ids=["F2", "F4"])
def test_weight_transform_is_g_w_g_transposed(how: winograd.Scheme) -> None:
    weight = _random((6, 4, 3, 3), 10)
    got = winograd.transformed_weight(Tensor(weight), how).asnumpy()
    expected = np.einsum("ai,ocij,bj->aboc", how.g, weight.astype(np.float64), how.g)
    np.testing.assert_allclose(got, expected.reshape(how.alpha**2, 6, 4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [Tensor.from_numpy, Tensor], ids=["from_numpy", "Tensor"])
def test_new_weights_are_used_at_once(make: type) -> None:
    """Weights replaced with set_data (new storage, often at a freed block's old address) are used."""
    x = Tensor(_random((2, 4, 9, 8), 11))
    weight = Parameter(Tensor(_random((5, 4, 3, 3), 12)), name="w")
    for seed in range(13, 25, 2):
        weight.set_data(make(_random((5, 4, 3, 3), seed)))
        weight.set_data(make(_random((5, 4, 3, 3), seed + 1)))
        for how in (winograd.F2, winograd.F4):
            assert _error(winograd.conv3x3(x, weight, None, how), _reference(x, weight, None)) < TOLERANCE


def test_randomize_and_in_place_copies_are_seen() -> None:
    model = build_model(WukongConfig.tiny())
    randomize(model, 0)
    weight = model.named_parameters()["model.diffusion_model.input_blocks.1.0.in_layers_conv.conv.weight"]
    x = Tensor(_random((1, weight.shape[1], 8, 8), 20))
    winograd.conv3x3(x, weight)
    randomize(model, 1)
    assert _error(winograd.conv3x3(x, weight), _reference(x, weight, None)) < TOLERANCE
    weight.copy_(Tensor(_random(tuple(weight.shape), 21)))
    assert _error(winograd.conv3x3(x, weight), _reference(x, weight, None)) < TOLERANCE


@pytest.mark.parametrize("rows", [16, 40])
def test_banded_convolution_by_winograd_equals_the_whole_map(rows: int) -> None:
    """The VAE decoder's banded 3x3 convolution, on a map where Winograd pays, equals one whole-map
    convolution: every band reads its real halo rows, and the rows made from zero padding are dropped."""
    conv = conv2d(64, 64, 3, padding=1)
    conv.weight.set_data(Tensor(_random((64, 64, 3, 3), 30) * 0.1))
    conv.bias.set_data(Tensor(_random((64,), 31)))
    x = _random((1, 64, 40, 64), 32)
    assert conv.winograd_for(64, rows + 2, 64)
    expected = _reference(Tensor(x), conv.weight, conv.bias)
    got = banded_conv3x3(lambda lo, hi: x[:, :, lo:hi], 40, conv, rows)
    assert _error(Tensor(got), expected) < TOLERANCE
    into = x.copy()
    in_place = banded_conv3x3(lambda lo, hi: into[:, :, lo:hi], 40, conv, rows, into=into)
    assert in_place is into
    assert _error(Tensor(into), expected) < TOLERANCE


def test_convolution_cells_pick_winograd_where_it_pays() -> None:
    conv = conv2d(64, 64, 3, padding=1)
    x = Tensor(_random((2, 64, 32, 32), 33))
    assert conv.winograd and conv.winograd_for(64, 32, 32)
    assert not conv2d(64, 64, 3, stride=2, padding=1).winograd_for(64, 32, 32)
    assert not conv2d(64, 64, 1).winograd_for(64, 32, 32)
    by_winograd = conv(x).asnumpy()
    conv.winograd = False
    assert _error(Tensor(by_winograd), conv(x).asnumpy()) < TOLERANCE


def test_winograd_by_the_kernels_runs_in_a_compiled_graph() -> None:
    if not cpu_kernels.available():
        skip_needing("the fused C++ CPU kernels", "a C++ compiler: apt-get install g++")
    conv = conv2d(64, 64, 3, padding=1)
    x = Tensor(_random((2, 64, 32, 32), 34))
    prepare_for_graph(conv)
    assert conv.winograd
    compiled = ms.jit(conv.construct)(x).asnumpy()
    np.testing.assert_array_equal(compiled, conv(x).asnumpy())  # the same Winograd operators
    assert _error(Tensor(compiled), _reference(x, conv.weight, conv.bias)) < TOLERANCE
