"""The C++ CPU kernels against float64 numpy, their build cache, the fallback, and a whole tiny UNet."""

from __future__ import annotations

import logging
import math
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support import NO_MINDSPORE, skip_needing, skip_unless

ms = pytest.importorskip("mindspore", reason=NO_MINDSPORE)

from mindspore import Tensor  # noqa: E402

from core.diffusion import cpu_kernels  # noqa: E402
from core.diffusion.layers import GroupNorm, LayerNorm, attention, set_cpu_paths  # noqa: E402
from core.diffusion.unet import GEGLU, CrossAttention, ResBlock  # noqa: E402

needs_compiler = skip_unless(
    shutil.which(cpu_kernels.COMPILER) is not None,
    f"a C++ compiler ({cpu_kernels.COMPILER})",
    "apt-get install g++",
)


@pytest.fixture
def fresh_kernels() -> Iterator[None]:
    """Forget the loaded kernels before and after the test (the next use loads them from the cache)."""
    cpu_kernels._operators.cache_clear()
    yield
    cpu_kernels._operators.cache_clear()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


def _group_norm_ref(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int, eps: float
) -> np.ndarray:
    n, c = x.shape[:2]
    g = x.astype(np.float64).reshape(n, groups, -1)
    out = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return out * gamma.reshape(shape) + beta.reshape(shape)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


@needs_compiler
def test_kernels_build_here() -> None:
    assert cpu_kernels.available()


@needs_compiler
@pytest.mark.parametrize(
    ("shape", "groups", "scale", "shift"),
    [
        ((2, 6, 5, 7), 3, 1.0, 0.0),  # odd sizes
        ((1, 4, 1, 1), 2, 3.0, 0.5),  # one row, two values per group
        ((2, 64, 32, 32), 32, 1.0, 0.0),  # large enough to be split between threads
        ((3, 8, 9, 3), 4, 1e3, -2e3),  # big values
        ((2, 8, 4, 5), 8, 1e-4, 0.0),  # small values (below eps in variance)
        ((2, 8, 6, 6), 2, 1e-2, 1e3),  # large mean, small spread
    ],
)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_group_norm(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    groups: int,
    scale: float,
    shift: float,
    silu: bool,
    with_bias: bool,
) -> None:
    n, c = shape[:2]
    x = (rng.standard_normal(shape) * scale + shift).astype(np.float32)
    gamma = rng.standard_normal(c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    bias = (rng.standard_normal((n, c)) * scale).astype(np.float32) if with_bias else None
    eps = 1e-5
    out = cpu_kernels.group_norm(
        Tensor(x),
        Tensor(gamma),
        Tensor(beta),
        groups,
        eps,
        silu=silu,
        bias=None if bias is None else Tensor(bias),
    ).asnumpy()
    # the bias is added in float32, as the separate add it replaces would
    source = x if bias is None else x + bias[:, :, None, None]
    ref = _group_norm_ref(source, gamma, beta, groups, eps)
    if silu:
        ref = _silu(ref)
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@needs_compiler
@pytest.mark.parametrize(
    ("shape", "scale", "shift"),
    [
        ((3, 5, 17), 1.0, 0.0),
        ((1, 1), 2.0, 1.0),  # one row of width 1: the output is beta
        ((1, 33), 5.0, 2.0),
        ((2, 512, 320), 1.0, 0.0),  # threads
        ((4, 1280), 1e3, 0.0),
        ((4, 40), 1e-2, 1e3),  # large mean, small spread
    ],
)
def test_layer_norm(rng: np.random.Generator, shape: tuple[int, ...], scale: float, shift: float) -> None:
    width = shape[-1]
    x = (rng.standard_normal(shape) * scale + shift).astype(np.float32)
    gamma, beta = (rng.standard_normal(width).astype(np.float32) for _ in range(2))
    out = cpu_kernels.layer_norm(Tensor(x), Tensor(gamma), Tensor(beta), 1e-5).asnumpy()
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@needs_compiler
def test_layer_norm_reads_a_transposed_view(rng: np.random.Generator) -> None:
    x = Tensor(rng.standard_normal((2, 6, 5)).astype(np.float32)).transpose(0, 2, 1)
    ones, zeros = Tensor(np.ones(6, np.float32)), Tensor(np.zeros(6, np.float32))
    out = cpu_kernels.layer_norm(x, ones, zeros, 1e-5).asnumpy()
    v = x.asnumpy().astype(np.float64)
    ref = (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _softmax_ref(s: np.ndarray) -> np.ndarray:
    s = s.astype(np.float64)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@needs_compiler
@pytest.mark.parametrize(
    ("shape", "scale"),
    [((1, 1), 1.0), ((3, 7), 1.0), ((2, 16), 3.0), ((5, 17), 10.0), ((2, 3, 77), 30.0), ((64, 4096), 1.0)],
)
def test_softmax(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> None:
    s = (rng.standard_normal(shape) * scale).astype(np.float32)
    out = cpu_kernels.softmax(Tensor(s)).asnumpy()
    np.testing.assert_allclose(out, _softmax_ref(s), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)


@needs_compiler
def test_softmax_masks_and_extremes() -> None:
    rows = np.array(
        [
            [0.0, -np.inf, 1.0, -np.inf, 2.0],
            [-np.inf, -np.inf, -np.inf, -np.inf, 5.0],  # one finite entry
            [1e30, -1e30, 0.0, 1e30, -np.inf],  # huge values
            [-200.0, -100.0, -150.0, -90.0, -300.0],  # all very negative: the max is subtracted first
        ],
        np.float32,
    )
    out = cpu_kernels.softmax(Tensor(rows)).asnumpy()
    np.testing.assert_allclose(out, _softmax_ref(rows), rtol=1e-5, atol=1e-7)
    assert (out[rows == -np.inf] == 0).all()
    # a row of only -inf (our masks never make one) gives zeros rather than a crash
    np.testing.assert_array_equal(
        cpu_kernels.softmax(Tensor(np.full((2, 19), -np.inf, np.float32))).asnumpy(), 0
    )


@needs_compiler
def test_exp_relative_error_over_the_float_range() -> None:
    # softmax([0, x]) = (1 / (1 + e^x), e^x / (1 + e^x)): for x << 0 the second entry is e^x itself
    x = np.linspace(-87.0, 87.0, 20_001, dtype=np.float32)
    rows = np.stack([np.zeros_like(x), x], axis=1)
    out = cpu_kernels.softmax(Tensor(rows)).asnumpy().astype(np.float64)
    ref = _softmax_ref(rows)
    relative = np.abs(out - ref) / ref
    assert relative.max() < 1e-6
    # below the smallest normal float the result is 0, never a denormal garbage value or NaN
    tiny = cpu_kernels.softmax(Tensor(np.array([[0.0, -88.0, -1e4]], np.float32))).asnumpy()
    assert tiny[0, 0] == 1.0 and (tiny[0, 1:] == 0).all()


@needs_compiler
@pytest.mark.parametrize(
    ("shape", "scale"), [((1, 2), 1.0), ((3, 18), 3.0), ((2, 5, 34), 20.0), ((512, 640), 1.0)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_geglu(rng: np.random.Generator, shape: tuple[int, ...], scale: float, with_bias: bool) -> None:
    h = (rng.standard_normal(shape) * scale).astype(np.float32)
    bias = (rng.standard_normal(shape[-1]) * scale).astype(np.float32) if with_bias else None
    out = cpu_kernels.geglu(Tensor(h), None if bias is None else Tensor(bias)).asnumpy()
    inner = shape[-1] // 2
    u = (h if bias is None else h + bias).astype(np.float64)  # the bias is added in float32
    ref = u[..., :inner] * _gelu_tanh(u[..., inner:])
    assert out.shape == (*shape[:-1], inner)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=4e-6 * scale * scale)


@needs_compiler
def test_build_is_cached_and_safe_when_two_build_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built: list[Path | None] = []
    threads = [threading.Thread(target=lambda: built.append(cpu_kernels.build())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built[0] is not None and built[0] == built[1]
    directory = tmp_path / "huahua" / "kernels"
    assert sorted(directory.iterdir()) == [built[0]]  # one library, no partial files left
    stamp = built[0].stat().st_mtime_ns
    assert cpu_kernels.build() == built[0] and built[0].stat().st_mtime_ns == stamp  # not rebuilt


def test_without_a_compiler_the_layers_use_mindspore(
    monkeypatch: pytest.MonkeyPatch,
    fresh_kernels: None,
    rng: np.random.Generator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(cpu_kernels, "COMPILER", "no-such-compiler-here")
    with caplog.at_level(logging.WARNING, logger="core.diffusion.cpu_kernels"):
        assert not cpu_kernels.available()
    assert len(caplog.records) == 1 and "no-such-compiler-here" in caplog.text
    assert not cpu_kernels.available()  # remembered: no second attempt, no second line
    assert len(caplog.records) == 1

    norm = GroupNorm(2, 4, 1e-5)
    assert not norm.kernels
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    bias = rng.standard_normal((2, 4)).astype(np.float32)
    ref = _silu(_group_norm_ref(x + bias[:, :, None, None], np.ones(4), np.zeros(4), 2, 1e-5))
    np.testing.assert_allclose(norm.silu_of(Tensor(x), Tensor(bias)).asnumpy(), ref, rtol=1e-4, atol=1e-5)

    layer = LayerNorm(6, 1e-5)
    assert not layer.kernels
    geglu = GEGLU(4, 3)
    assert not geglu.kernels
    h = rng.standard_normal((2, 4)).astype(np.float32)
    both = geglu.proj(Tensor(h)).asnumpy().astype(np.float64)
    np.testing.assert_allclose(
        geglu(Tensor(h)).asnumpy(), both[:, :3] * _gelu_tanh(both[:, 3:]), rtol=1e-5, atol=1e-6
    )


@needs_compiler
def test_a_failed_build_is_reported_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_kernels: None, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="core.diffusion.cpu_kernels"):
        assert not cpu_kernels.available()
    assert len(caplog.records) == 1 and "failed" in caplog.text
    assert list((tmp_path / "cache" / "huahua" / "kernels").iterdir()) == []  # no partial file left


@needs_compiler
def test_attention_softmax_kernel_matches_mindspore(rng: np.random.Generator) -> None:
    q, k, v = (rng.standard_normal((4, 9, 8)).astype(np.float32) for _ in range(3))
    mask = np.triu(np.full((9, 9), -np.inf, np.float32), 1)
    ours = attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), kernels=True).asnumpy()
    theirs = attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask)).asnumpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernels", [True, False])
def test_resblock_in_a_compiled_graph_equals_pynative(rng: np.random.Generator, kernels: bool) -> None:
    """The custom operators run inside `ms.jit`, and so does the generic path (GroupNorm.silu_of)."""
    block = ResBlock(8, 16, 12, 4)
    set_cpu_paths(block, kernels=kernels and cpu_kernels.available())
    for param in block.get_parameters():
        param.set_data(Tensor((rng.standard_normal(param.shape) * 0.3).astype(np.float32)))
    x = Tensor(rng.standard_normal((2, 8, 5, 5)).astype(np.float32))
    emb = Tensor(rng.standard_normal((2, 12)).astype(np.float32))
    eager = block(x, emb, emb).asnumpy()
    compiled = ms.jit(block.construct)(x, emb, emb).asnumpy()
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize(
    ("batch", "heads", "n", "m", "width"),
    [(1, 1, 1, 1, 1), (2, 8, 130, 77, 64), (1, 1, 300, 90, 24), (3, 5, 65, 200, 40)],
)
def test_token_layout_attention_matches_numpy(
    rng: np.random.Generator, batch: int, heads: int, n: int, m: int, width: int
) -> None:
    """Heads read in place as column groups; one head over several query blocks is split across threads."""
    if not cpu_kernels.attention_available():
        skip_needing("oneDNN's sgemm in MindSpore's libdnnl", "a MindSpore CPU build that ships it")
    q = rng.standard_normal((batch, n, width)).astype(np.float32)
    k = rng.standard_normal((batch, m, width)).astype(np.float32) * 2
    v = rng.standard_normal((batch, m, width)).astype(np.float32)
    d = width // heads
    got = cpu_kernels.attention_tokens(Tensor(q), Tensor(k), Tensor(v), heads, 0.3).asnumpy()

    def per_head(x: np.ndarray) -> np.ndarray:  # (batch, tokens, width) -> (batch, heads, tokens, d)
        return x.reshape(batch, -1, heads, d).transpose(0, 2, 1, 3).astype(np.float64)

    scores = per_head(q) @ per_head(k).transpose(0, 1, 3, 2) * 0.3
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = ((weights / weights.sum(-1, keepdims=True)) @ per_head(v)).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, expected.reshape(batch, n, width), rtol=1e-4, atol=2e-5)


@needs_compiler
def test_token_layout_attention_rejects_heads_that_do_not_divide_the_width() -> None:
    if not cpu_kernels.attention_available():
        skip_needing("oneDNN's sgemm in MindSpore's libdnnl", "a MindSpore CPU build that ships it")
    x = Tensor(np.ones((1, 4, 10), np.float32))
    with pytest.raises(RuntimeError):
        cpu_kernels.attention_tokens(x, x, x, 3, 1.0).asnumpy()


@needs_compiler
def test_unet_attention_uses_the_token_layout_kernel_and_agrees(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not cpu_kernels.attention_available():
        skip_needing("oneDNN's sgemm in MindSpore's libdnnl", "a MindSpore CPU build that ships it")
    calls: list[int] = []
    fused_kernel = cpu_kernels.attention_tokens

    def counted(*args: Any) -> Tensor:
        calls.append(1)
        return fused_kernel(*args)

    monkeypatch.setattr(cpu_kernels, "attention_tokens", counted)
    cell = CrossAttention(16, 12, heads=4)
    x = Tensor(rng.standard_normal((2, 70, 16)).astype(np.float32))
    context = Tensor(rng.standard_normal((2, 9, 12)).astype(np.float32))
    fused = cell(x, context).asnumpy()
    assert calls == [1]
    set_cpu_paths(cell, kernels=False)
    blocks = cell(x, context).asnumpy()
    assert calls == [1]
    np.testing.assert_allclose(fused, blocks, rtol=1e-4, atol=1e-5)
