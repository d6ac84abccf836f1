"""The AutoencoderKL decoder computed in bands of rows equals the whole-map computation."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from tests.support import NO_MINDSPORE

ms = pytest.importorskip("mindspore", reason=NO_MINDSPORE)

from mindspore import Tensor, ops  # noqa: E402

from core.diffusion import WukongConfig, cpu_kernels  # noqa: E402
from core.diffusion.checkpoint import build_model, randomize  # noqa: E402
from core.diffusion.layers import band_rows, pooled_array, set_cpu_paths  # noqa: E402
from core.diffusion.vae import DECODE_BAND_BYTES, AttnBlock, ResnetBlock, Upsample  # noqa: E402

TOLERANCE = 1e-5


def _random(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.fixture(scope="module")
def vae() -> object:
    model = build_model(WukongConfig.tiny())
    randomize(model, 0)
    model.set_train(False)
    return model.vae


def test_band_rows_splits_only_maps_over_the_limit() -> None:
    assert band_rows((1, 128, 512, 512), 4, None) is None
    assert band_rows((1, 128, 512, 512), 4, 128 * 1024 * 1024) is None
    assert band_rows((1, 128, 512, 512), 4, 32 * 1024 * 1024) == 128
    assert band_rows((2, 128, 512, 512), 4, 32 * 1024 * 1024) == 64
    assert band_rows((1, 512, 64, 64), 4, DECODE_BAND_BYTES) is None  # the decoder's first maps run whole
    assert band_rows((1, 128, 512, 512), 4, 1) == 1


@pytest.mark.parametrize("band_bytes", [64 * 1024, 3000, 1])
def test_banded_decode_equals_whole_decode(vae: object, band_bytes: int) -> None:
    z = _random((2, 4, 5, 6), seed=1)  # odd sides: the last band is shorter than the others
    whole = vae.decode(z, None).asnumpy()
    banded = vae.decode(z, band_bytes).asnumpy()
    assert banded.shape == whole.shape == (2, 3, 40, 48)
    assert np.abs(whole).max() > 0.1
    assert np.abs(banded - whole).max() <= TOLERANCE


def test_default_decode_is_whole_at_the_tiny_size(vae: object) -> None:
    z = _random((1, 4, 4, 4), seed=2)
    assert np.array_equal(vae.decode(z).asnumpy(), vae.decode(z, None).asnumpy())


@pytest.mark.parametrize(("c_in", "c_out"), [(512, 256), (128, 128)])
def test_banded_resnet_block_at_official_widths(c_in: int, c_out: int) -> None:
    block = ResnetBlock(c_in, c_out, 32)
    block.set_train(False)
    x = _random((1, c_in, 11, 16), seed=3) * 3.0 + 0.5
    whole = block(x).asnumpy()
    banded = block(x, 16 * c_in * 4 * 4).asnumpy()  # four rows per band
    assert np.abs(banded - whole).max() <= TOLERANCE * max(1.0, float(np.abs(whole).max()))


def test_banded_upsample_equals_whole() -> None:
    up = Upsample(64)
    up.set_train(False)
    x = _random((1, 64, 7, 9), seed=4)
    whole = up(x).asnumpy()
    banded = up(x, 18 * 64 * 4 * 3).asnumpy()  # three output rows per band: halos cross source rows
    assert banded.shape == whole.shape == (1, 64, 14, 18)
    assert np.abs(banded - whole).max() <= TOLERANCE


def _attn_block_reference(block: AttnBlock, x: np.ndarray) -> np.ndarray:
    """The block in numpy: GroupNorm, 1x1 projections, softmax(q k^T / sqrt(c)) v over all pixels."""
    b, c, h, w = x.shape
    groups = x.reshape(b, 32, -1)
    normed = (groups - groups.mean(-1, keepdims=True)) / np.sqrt(groups.var(-1, keepdims=True) + 1e-6)
    gamma, beta = block.norm.gamma.asnumpy(), block.norm.beta.asnumpy()
    tokens = (normed.reshape(b, c, h * w) * gamma[:, None] + beta[:, None]).transpose(0, 2, 1)

    def project(conv: object) -> np.ndarray:
        weight = conv.weight.asnumpy().reshape(c, c)  # type: ignore[attr-defined]
        return tokens @ weight.T + conv.bias.asnumpy()  # type: ignore[attr-defined]

    q, k, v = project(block.q), project(block.k), project(block.v)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(c)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    out = (weights / weights.sum(-1, keepdims=True)) @ v
    proj = block.proj_out.weight.asnumpy().reshape(c, c)
    return x + (out @ proj.T + block.proj_out.bias.asnumpy()).transpose(0, 2, 1).reshape(b, c, h, w)


def test_attention_block_paths_agree_with_numpy_at_the_official_width() -> None:
    """The framework operators (the default) and the fused token-layout kernel (a switch, where the
    kernels built) give the numpy result."""
    block = AttnBlock(512, 32)
    block.set_train(False)
    rng = np.random.default_rng(6)
    for conv in (block.q, block.k, block.v, block.proj_out):
        conv.weight.set_data(Tensor(rng.standard_normal((512, 512, 1, 1)).astype(np.float32) * 0.1))
        conv.bias.set_data(Tensor(rng.standard_normal(512).astype(np.float32)))
    assert block.kernels is False
    x = rng.standard_normal((2, 512, 12, 10)).astype(np.float32) * 2.0 + 0.5
    expected = _attn_block_reference(block, x)
    generic = block(Tensor(x)).asnumpy()
    set_cpu_paths(block, kernels=cpu_kernels.available())
    fast = block(Tensor(x)).asnumpy()
    assert np.abs(expected - x).max() > 0.5  # the attention changed the map
    np.testing.assert_allclose(fast, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(generic, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_pooled_array_is_zeroed_writable_and_outlives_its_tensor(dtype: type) -> None:
    """The map stays valid after every name for its tensor is gone and the pool hands out more blocks."""
    array = pooled_array((2, 3, 64, 64), np.dtype(dtype))
    assert array.shape == (2, 3, 64, 64) and array.dtype == dtype and not array.any()
    array += 1.5
    gc.collect()
    others = [ops.ones((2, 3, 64, 64), ms.float32) * 7.0 for _ in range(4)]
    assert float(others[-1].asnumpy()[0, 0, 0, 0]) == 7.0
    np.testing.assert_array_equal(array, np.full((2, 3, 64, 64), 1.5, dtype))
