"""The model classes produce exactly the official parameter names and shapes; layers match numpy."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from tests.support import NO_MINDSPORE, shared_dir, skip_needing

ms = pytest.importorskip("mindspore", reason=NO_MINDSPORE)

from mindspore import Tensor  # noqa: E402

from core.diffusion import WukongConfig, cpu_kernels  # noqa: E402
from core.diffusion.checkpoint import build_model, expected_shapes, randomize  # noqa: E402
from core.diffusion.layers import (  # noqa: E402
    CPU_PATHS,
    GroupNorm,
    LayerNorm,
    attention,
    attention_keys_first,
    gelu_tanh,
    merge_heads,
    set_cpu_paths,
    split_heads,
    split_heads_transposed,
    timestep_embedding,
)
from core.diffusion.text_encoder import MultiheadAttention  # noqa: E402
from core.diffusion.vae import Downsample  # noqa: E402

OFFICIAL_TSV = shared_dir() / "wukong" / "params-official.tsv"
PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")


def _official() -> dict[str, tuple[int, ...]]:
    if not OFFICIAL_TSV.exists():
        skip_needing(
            f"the official parameter list {OFFICIAL_TSV}",
            "the project's shared/ model facts beside the checkout",
        )
    rows = {}
    for line in OFFICIAL_TSV.read_text().splitlines():
        name, shape = line.split("\t")
        rows[name] = tuple(int(d) for d in shape.split(","))
    return rows


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.)", ".N", name)


def test_official_config_builds_every_official_name_and_shape() -> None:
    official = _official()
    ours = expected_shapes(WukongConfig())
    assert len(official) == 1086
    assert ours == official
    assert list(ours) == list(official)  # same order as the file, too
    assert sum(math.prod(s) for s in ours.values()) == 1_068_742_699
    for prefix, count in zip(PREFIXES, (686, 252, 148), strict=True):
        assert sum(n.startswith(prefix) for n in ours) == count


def test_tiny_config_names_follow_official_patterns() -> None:
    official_patterns = {_pattern(n) for n in _official()}
    tiny = expected_shapes(WukongConfig.tiny())
    assert tiny
    outside = [n for n in tiny if _pattern(n) not in official_patterns]
    assert outside == []
    assert all(any(n.startswith(p) for n in tiny) for p in PREFIXES)
    # far smaller than the official model
    assert sum(math.prod(s) for s in tiny.values()) < 5_000_000


def test_tiny_shapes_follow_the_config() -> None:
    cfg = WukongConfig.tiny()
    tiny = expected_shapes(cfg)
    assert tiny["model.diffusion_model.input_blocks.0.0.conv.weight"] == (cfg.unet_channels, 4, 3, 3)
    assert tiny["cond_stage_model.transformer.embedding_table"] == (cfg.vocab_size, cfg.text_width)
    assert tiny["first_stage_model.decoder.conv_out.weight"] == (3, cfg.vae_channels, 3, 3)


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError, match="norm_groups"):
        WukongConfig(unet_channels=40)
    with pytest.raises(ValueError, match="context_dim"):
        WukongConfig(context_dim=64)


def test_random_weights_depend_only_on_seed() -> None:
    def first_weights(seed: int) -> np.ndarray:
        model = build_model(WukongConfig.tiny())
        randomize(model, seed)
        return model.named_parameters()["model.diffusion_model.time_embed.0.weight"].asnumpy()

    a, b, c = first_weights(3), first_weights(3), first_weights(4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_timestep_embedding_is_cos_first_then_sin() -> None:
    emb = timestep_embedding(np.array([0, 10]), 8)
    assert emb.shape == (2, 8) and emb.dtype == np.float32
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
    freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
    np.testing.assert_allclose(emb[1, :4], np.cos(10 * freqs), rtol=1e-5)
    np.testing.assert_allclose(emb[1, 4:], np.sin(10 * freqs), rtol=1e-5, atol=1e-6)


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("chunk_bytes", [None, 200, 40, 1])
def test_attention_matches_numpy(monkeypatch: pytest.MonkeyPatch, chunk_bytes: int | None) -> None:
    # one head's scores are 5 * 5 * 4 = 100 bytes: 200 takes heads in pairs, 40 slices each head's
    # queries in pairs, 1 takes one query at a time
    if chunk_bytes is not None:
        monkeypatch.setattr("core.diffusion.layers._ATTENTION_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((4, 5, 8)).astype(np.float32) for _ in range(3))
    mask = np.triu(np.full((5, 5), -np.inf, np.float32), 1)
    out = attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask)).asnumpy()
    expected = _softmax(q @ k.transpose(0, 2, 1) / math.sqrt(8) + mask) @ v
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_fused_in_proj_is_q_k_v_in_that_order() -> None:
    rng = np.random.default_rng(1)
    width, heads = 8, 2
    cell = MultiheadAttention(width, heads)
    w = rng.standard_normal((3 * width, width)).astype(np.float32) * 0.3
    b = rng.standard_normal(3 * width).astype(np.float32) * 0.1
    cell.in_proj.weight.set_data(Tensor(w))
    cell.in_proj.bias.set_data(Tensor(b))
    cell.out_proj.weight.set_data(Tensor(np.eye(width, dtype=np.float32)))
    cell.out_proj.bias.set_data(Tensor(np.zeros(width, np.float32)))
    x = rng.standard_normal((1, 3, width)).astype(np.float32)
    mask = np.zeros((3, 3), np.float32)
    out = cell(Tensor(x), Tensor(mask)).asnumpy()
    qkv = x[0] @ w.T + b
    q, k, v = qkv[:, :width], qkv[:, width : 2 * width], qkv[:, 2 * width :]
    d = width // heads
    heads_out = [
        _softmax(q[:, i * d : (i + 1) * d] @ k[:, i * d : (i + 1) * d].T / math.sqrt(d))
        @ v[:, i * d : (i + 1) * d]
        for i in range(heads)
    ]
    np.testing.assert_allclose(out[0], np.concatenate(heads_out, -1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernels", [True, False])
def test_group_norm_matches_numpy(kernels: bool) -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 8, 3, 3)) * 3 + 1).astype(np.float32)
    norm = GroupNorm(4, 8, 1e-6)
    norm.kernels = kernels and norm.kernels
    gamma = rng.standard_normal(8).astype(np.float32)
    beta = rng.standard_normal(8).astype(np.float32)
    norm.gamma.set_data(Tensor(gamma))
    norm.beta.set_data(Tensor(beta))
    g = x.reshape(2, 4, -1)
    ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)).reshape(x.shape)
    ref = ref * gamma[None, :, None, None] + beta[None, :, None, None]
    np.testing.assert_allclose(norm(Tensor(x)).asnumpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", [True, False])
def test_layer_norm_matches_numpy(kernels: bool) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6)).astype(np.float32) * 5 + 2
    gamma, beta = (rng.standard_normal(6).astype(np.float32) for _ in range(2))
    norm = LayerNorm(6, 1e-5)
    norm.kernels = kernels and norm.kernels
    norm.gamma.set_data(Tensor(gamma))
    norm.beta.set_data(Tensor(beta))
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(norm(Tensor(x)).asnumpy(), ref, rtol=1e-4, atol=1e-4)


def test_cpu_paths_are_on_by_default_here_and_change_nothing() -> None:
    """The CPU implementations (our C++ kernels where they build, numpy layout copies, fused 1x1
    projections) give the framework operators' results on a whole tiny UNet."""
    cfg = WukongConfig.tiny()
    model = build_model(cfg)
    randomize(model, seed=4)
    unet = model.unet
    unet.set_train(False)
    for switch in CPU_PATHS:
        values = [getattr(sub, switch) for _, sub in unet.cells_and_names() if hasattr(sub, switch)]
        expected = cpu_kernels.available() if switch == "kernels" else True
        assert values and all(value == expected for value in values), switch
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    ctx = Tensor(rng.standard_normal((2, cfg.context_length, cfg.context_dim)).astype(np.float32))
    t_emb = unet.embed_timesteps(np.array([3, 800]))
    fast = unet(x, t_emb, ctx).asnumpy()
    set_cpu_paths(unet, kernels=False, tiled=False, host=False, winograd=False, fused_proj=False)
    generic = unet(x, t_emb, ctx).asnumpy()
    assert np.abs(generic).max() > 0.1
    np.testing.assert_allclose(fast, generic, rtol=1e-4, atol=1e-5)


def test_set_cpu_paths_rejects_unknown_switches() -> None:
    with pytest.raises(ValueError, match="fast"):
        set_cpu_paths(GroupNorm(2, 4, 1e-5), fast=True)


@pytest.mark.parametrize("host", [True, False])
def test_heads_split_and_merge(host: bool) -> None:
    x = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)  # (b, n, heads * d), heads 2, d 4
    heads = x.reshape(2, 3, 2, 4).transpose(0, 2, 1, 3).reshape(4, 3, 4)
    np.testing.assert_array_equal(split_heads(Tensor(x), 2, host).asnumpy(), heads)
    keys = split_heads_transposed(Tensor(x), 2, host).asnumpy()
    np.testing.assert_array_equal(keys, heads.transpose(0, 2, 1))
    np.testing.assert_array_equal(merge_heads(Tensor(heads), 2, host).asnumpy(), x)
    q, v = Tensor(heads), Tensor(heads * 0.5)
    np.testing.assert_allclose(
        attention_keys_first(q, Tensor(keys), v).asnumpy(),
        attention(q, Tensor(heads), v).asnumpy(),
        rtol=1e-6,
    )


def test_vae_downsample_pads_only_bottom_and_right() -> None:
    down = Downsample(1)
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    kernel[0, 0, 0, 0] = 1.0  # picks the top-left input of each 3x3 window
    down.conv.weight.set_data(Tensor(kernel))
    down.conv.bias.set_data(Tensor(np.zeros(1, np.float32)))
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    out = down(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(out[0, 0], x[0, 0, ::2, ::2])


def test_gelu_is_the_tanh_approximation() -> None:
    x = np.linspace(-6, 6, 49, dtype=np.float32)
    ref = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(gelu_tanh(Tensor(x)).asnumpy(), ref, rtol=1e-5, atol=1e-6)
