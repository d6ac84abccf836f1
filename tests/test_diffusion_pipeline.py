"""WukongPipeline at the tiny size: the conformance calls, guidance, seeds, img2img, progress, cancel."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from tests.support import NO_MINDSPORE

ms = pytest.importorskip("mindspore", reason=NO_MINDSPORE)

from core.diffusion import WukongConfig, WukongPipeline  # noqa: E402
from core.errors import InvalidOption, JobCancelled  # noqa: E402
from core.vocabulary import builtin_tokenizer  # noqa: E402

CFG = WukongConfig.tiny()
SIDE = 4  # latent side: 32x32 images


@pytest.fixture(scope="module")
def pipe() -> WukongPipeline:
    return WukongPipeline.random(CFG, builtin_tokenizer(), seed=0)


@pytest.fixture(scope="module")
def ctx(pipe: WukongPipeline) -> np.ndarray:
    ids = np.zeros((2, CFG.context_length), np.int64)
    ids[0, :4] = [101, 4344, 4157, 102]  # [CLS] 猫 咪 [SEP]
    ids[1, :2] = [101, 102]  # the empty prompt
    return pipe.encode_tokens(ids)


def _noise(n: int = 1, seed: int = 0, size: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, size, size)).astype(np.float32)


def test_tokenize_delegates_to_the_wordpiece_tokenizer(pipe: WukongPipeline) -> None:
    ids = pipe.tokenize(["一只猫", ""])
    assert ids.shape == (2, 77) and np.issubdtype(ids.dtype, np.integer)
    assert ids[0].tolist() == builtin_tokenizer().encode("一只猫") and ids[0, 4] == 102
    assert list(ids[1, :3]) == [101, 102, 0]


def test_conformance_shapes(pipe: WukongPipeline, ctx: np.ndarray) -> None:
    assert ctx.shape == (2, 77, CFG.text_width) and ctx.dtype == np.float32
    x = _noise(2)
    eps = pipe.predict_noise(x, np.array([1, 999]), ctx)
    assert eps.shape == x.shape and eps.dtype == np.float32 and np.isfinite(eps).all()
    images = pipe.decode_latents(x)
    assert images.shape == (2, 3, 8 * SIDE, 8 * SIDE) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    latents = pipe.encode_images(images)
    assert latents.shape == x.shape and latents.dtype == np.float32
    final = pipe.sample(ctx[:1], ctx[1:], sampler="plms", steps=2, guidance_scale=7.5, x_T=_noise())
    assert final.shape == (1, 4, SIDE, SIDE) and np.isfinite(final).all()
    assert pipe.random_weights and pipe.dtype == "float32" and pipe.device == "CPU" and pipe.config == CFG
    assert len(pipe.parameter_shapes()) > 300


def test_text_encoder_is_causal(pipe: WukongPipeline) -> None:
    ids = np.zeros((2, 77), np.int64)
    ids[:, :6] = [101, 10, 11, 12, 13, 102]
    ids[1, 4] = 200  # change one token: earlier positions must not see it
    out = pipe.encode_tokens(ids)
    np.testing.assert_allclose(out[0, :4], out[1, :4], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[0, 4:], out[1, 4:])


def test_timestep_and_context_change_the_noise_estimate(pipe: WukongPipeline, ctx: np.ndarray) -> None:
    x = np.repeat(_noise(), 2, axis=0)
    by_t = pipe.predict_noise(x, np.array([10, 900]), ctx[:1].repeat(2, axis=0))
    by_ctx = pipe.predict_noise(x, np.array([10, 10]), ctx)
    assert not np.allclose(by_t[0], by_t[1])
    assert not np.allclose(by_ctx[0], by_ctx[1])
    np.testing.assert_allclose(by_t[0], by_ctx[0], rtol=1e-5, atol=1e-5)  # batching does not leak


def test_guidance_in_one_batch_equals_the_two_call_formula(pipe: WukongPipeline, ctx: np.ndarray) -> None:
    x, g = _noise(), 7.5
    cond = pipe.predict_noise(x, np.array([500]), ctx[:1])
    uncond = pipe.predict_noise(x, np.array([500]), ctx[1:])
    guided = pipe.guided_noise(x, 500, ctx[:1], ctx[1:], g)
    np.testing.assert_allclose(guided, uncond + g * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_sampling_runs_one_unet_batch_per_step(
    pipe: WukongPipeline, ctx: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    original = pipe.predict_noise

    def counting(x: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
        batches.append(x.shape[0])
        return original(x, t, c)

    monkeypatch.setattr(pipe, "predict_noise", counting)
    pipe.sample(ctx[:1], ctx[1:], sampler="ddim", steps=3, x_T=_noise())
    assert batches == [2, 2, 2]


def test_same_seed_same_latents_and_other_seed_differs(pipe: WukongPipeline, ctx: np.ndarray) -> None:
    def run(seed: int) -> np.ndarray:
        return pipe.sample(ctx[:1], ctx[1:], sampler="dpm++2m", steps=2, seed=seed, height=32, width=32)

    a, b, c = run(1), run(1), run(2)
    assert a.shape == (1, 4, SIDE, SIDE)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # the seed's noise is numpy's, so a caller can reproduce it anywhere
    x_T = np.random.default_rng(1).standard_normal((1, 4, SIDE, SIDE)).astype(np.float32)
    np.testing.assert_array_equal(pipe.sample(ctx[:1], ctx[1:], sampler="dpm++2m", steps=2, x_T=x_T), a)


def test_progress_is_reported_every_step(pipe: WukongPipeline, ctx: np.ndarray) -> None:
    calls: list[tuple[int, int]] = []
    pipe.sample(
        ctx[:1], ctx[1:], sampler="plms", steps=3, x_T=_noise(), on_step=lambda i, n: calls.append((i, n))
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_cancellation_raises_job_cancelled(pipe: WukongPipeline, ctx: np.ndarray) -> None:
    steps: list[int] = []
    with pytest.raises(JobCancelled):
        pipe.sample(
            ctx[:1],
            ctx[1:],
            sampler="ddim",
            steps=5,
            x_T=_noise(),
            on_step=lambda i, n: steps.append(i),
            cancelled=lambda: len(steps) >= 1,
        )
    assert steps == [1]


def test_image_to_image_runs_fewer_steps_and_stays_closer(pipe: WukongPipeline, ctx: np.ndarray) -> None:
    init = pipe.encode_images(np.random.default_rng(3).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32))
    results = {}
    for strength in (0.5, 1.0):
        calls: list[int] = []
        results[strength] = pipe.sample(
            ctx[:1],
            ctx[1:],
            sampler="ddim",
            steps=4,
            seed=9,
            init_latents=init,
            strength=strength,
            on_step=lambda i, n, calls=calls: calls.append(n),
        )
        assert len(calls) == math.ceil(4 * strength)
    distance = {s: float(np.abs(r - init).mean()) for s, r in results.items()}
    assert distance[0.5] < distance[1.0]


def test_decode_scales_latents_before_clipping(pipe: WukongPipeline) -> None:
    z = _noise() * 0.05
    from mindspore import Tensor

    raw = pipe.model.vae.decode(Tensor(z / np.float32(CFG.scale_factor))).asnumpy()
    np.testing.assert_allclose(pipe.decode_latents(z), np.clip(raw, -1, 1), rtol=1e-5, atol=1e-5)


def test_encode_images_is_the_scaled_posterior_mean(pipe: WukongPipeline) -> None:
    from mindspore import Tensor

    images = np.random.default_rng(4).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    moments = pipe.model.vae.quant_conv(pipe.model.vae.encoder(Tensor(images))).asnumpy()
    expected = moments[:, :4] * np.float32(CFG.scale_factor)
    np.testing.assert_allclose(pipe.encode_images(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p, c: p.predict_noise(np.zeros((1, 3, 4, 4)), np.array([1]), c[:1]), "channels"),
        (lambda p, c: p.predict_noise(np.zeros((1, 4, 3, 4)), np.array([1]), c[:1]), "multiples"),
        (lambda p, c: p.predict_noise(np.zeros((1, 4, 4, 4)), np.array([1000]), c[:1]), "timesteps"),
        (lambda p, c: p.predict_noise(np.full((1, 4, 4, 4), np.nan), np.array([1]), c[:1]), "NaN"),
        (lambda p, c: p.predict_noise(np.zeros((2, 4, 4, 4)), np.array([1, 2]), c[:1]), "condition"),
        (lambda p, c: p.encode_tokens(np.full((1, 77), 10**6)), "Token ids"),
        (lambda p, c: p.encode_tokens(np.zeros((1, 5), np.int64)), "shape"),
        (lambda p, c: p.encode_tokens(np.zeros((1, 77), np.float32)), "whole numbers"),
        (lambda p, c: p.sample(c[:1], c[1:], sampler="euler", steps=2), "sampler"),
        (lambda p, c: p.sample(c[:1], c[1:], steps=2, height=40, width=32), "multiples of 16"),
        (lambda p, c: p.sample(c[:1], c[1:], steps=0, height=32, width=32), "steps"),
        (lambda p, c: p.sample(c[:1], c[1:], steps=2, guidance_scale=float("inf")), "guidance"),
        (lambda p, c: p.decode_latents(np.zeros((1, 4, 4))), "dimensions"),
        (lambda p, c: p.encode_images(np.zeros((1, 3, 30, 32))), "multiples"),
        (lambda p, c: p.decode_latents("not an array"), "numeric"),
    ],
)
def test_bad_input_is_a_friendly_error(
    pipe: WukongPipeline, ctx: np.ndarray, call: object, match: str
) -> None:
    with pytest.raises(InvalidOption, match=match):
        call(pipe, ctx)  # type: ignore[operator]


def test_unknown_device_or_dtype() -> None:
    with pytest.raises(InvalidOption, match="device"):
        WukongPipeline.random(CFG, None, device="TPU")
    with pytest.raises(InvalidOption, match="dtype"):
        WukongPipeline.random(CFG, None, dtype="bfloat16")


def test_graph_mode_unet_equals_pynative(pipe: WukongPipeline, ctx: np.ndarray) -> None:
    graph = WukongPipeline(pipe.model, CFG, None, graph=True)
    assert graph.graph and not pipe.graph
    x, t = _noise(2, seed=5), np.array([3, 700])
    np.testing.assert_allclose(
        graph.predict_noise(x, t, ctx), pipe.predict_noise(x, t, ctx), rtol=1e-5, atol=1e-5
    )


def test_graph_mode_compiles_a_bounded_number_of_shapes(
    pipe: WukongPipeline, ctx: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the limit a new shape runs eagerly; a shape compiled before keeps its graph."""
    from core.diffusion import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "COMPILED_SHAPES", 1)
    graph = WukongPipeline(pipe.model, CFG, None, graph=True)
    compiled: list[tuple[int, ...]] = []
    jitted = graph._compiled
    assert jitted is not None

    def counted(x: Any, t_emb: Any, context: Any) -> Any:
        compiled.append(tuple(x.shape))
        return jitted(x, t_emb, context)

    graph._compiled = counted
    t = np.array([3, 700])
    for x in (_noise(2, seed=5), _noise(2, seed=6, size=16), _noise(2, seed=7)):
        np.testing.assert_allclose(
            graph.predict_noise(x, t, ctx), pipe.predict_noise(x, t, ctx), rtol=1e-5, atol=1e-5
        )
    first = tuple(_noise(2, seed=5).shape)
    assert compiled == [first, first]


@pytest.mark.parametrize("chunk_bytes", [10 * 9 * 4 + 8, 4 * 9 * 4])
def test_chunked_attention_equals_one_block(monkeypatch: pytest.MonkeyPatch, chunk_bytes: int) -> None:
    from mindspore import Tensor

    from core.diffusion import layers

    rng = np.random.default_rng(3)
    q = rng.standard_normal((4, 10, 8)).astype(np.float32)  # 10 queries over 9 keys, 4 heads
    k, v = (rng.standard_normal((4, 9, 8)).astype(np.float32) for _ in range(2))
    whole = layers.attention(Tensor(q), Tensor(k), Tensor(v)).asnumpy()
    calls: list[int] = []
    attend = layers._attend

    def counted(*args: object) -> object:
        calls.append(1)
        return attend(*args)  # type: ignore[arg-type]

    # one head's scores are 10 * 9 * 4 bytes: a block of one whole head, or of 4 of its query rows
    monkeypatch.setattr(layers, "_ATTENTION_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(layers, "_attend", counted)
    sliced = layers.attention(Tensor(q), Tensor(k), Tensor(v)).asnumpy()
    assert len(calls) == (4 if chunk_bytes > 10 * 9 * 4 else 4 * 3)  # uneven last slices included
    np.testing.assert_allclose(sliced, whole, rtol=1e-5, atol=1e-6)
    expected = np.stack([_np_attention(q[h], k[h], v[h]) for h in range(4)])
    np.testing.assert_allclose(sliced, expected, rtol=1e-4, atol=1e-5)


def _np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    s = q @ k.T / math.sqrt(q.shape[-1])
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v
