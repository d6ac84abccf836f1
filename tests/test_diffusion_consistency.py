"""Reference attention and shared panel attention (core.diffusion.consistency) on the tiny real model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.support import NO_MINDSPORE

ms = pytest.importorskip("mindspore", reason=NO_MINDSPORE)

from mindspore import Tensor  # noqa: E402

from core.diffusion import WukongConfig, WukongPipeline  # noqa: E402
from core.diffusion.consistency import (  # noqa: E402
    REGION_EPS,
    REGION_FLOOR,
    Consistency,
    reader_regions,
    share_indices,
)
from core.diffusion.layers import set_cpu_paths  # noqa: E402
from core.diffusion.samplers import add_noise, make_timesteps, run_sampler  # noqa: E402
from core.diffusion.unet import CrossAttention  # noqa: E402
from core.errors import InvalidOption  # noqa: E402
from core.vocabulary import builtin_tokenizer  # noqa: E402

CFG = WukongConfig.tiny()
SIDE = 64  # pixels: 8x8 latents


@pytest.fixture(scope="module")
def pipe() -> WukongPipeline:
    return WukongPipeline.random(CFG, builtin_tokenizer(), seed=0)


@pytest.fixture(scope="module")
def ctx(pipe: WukongPipeline) -> np.ndarray:
    return pipe.encode_tokens(pipe.tokenize(["一只猫在草地上", ""]))


@pytest.fixture(scope="module")
def reference(pipe: WukongPipeline) -> tuple[np.ndarray, np.ndarray]:
    """(picture, its latent): a smooth random picture, as a drawing is smoother than noise."""
    rng = np.random.default_rng(7)
    coarse = rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    picture = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)
    return picture, pipe.encode_images(picture)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    width = q.shape[1]
    d = width // heads
    out = np.empty_like(q)
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        out[:, part] = _softmax(q[:, part] @ k[:, part].T / np.sqrt(d)) @ v[:, part]
    return out


@pytest.mark.parametrize("paths", ["default", "framework"])
def test_shared_attention_equals_a_numpy_reference(paths: str) -> None:
    """Appended keys and values, blended per reader, against float64 numpy; on our kernels and MindSpore's."""
    width, heads, b, n, readers, m = 16, 2, 3, 10, 2, 7
    cell, weights = _random_cell(width, width, heads, paths, 1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((b, n, width)).astype(np.float32)
    index = rng.integers(0, b * n, readers * m).astype(np.int32)
    strength = np.array([0.3, 1.0], np.float32)
    got = cell.shared(Tensor(x), Tensor(strength.reshape(-1, 1, 1)), Tensor(index)).asnumpy()
    expected = _numpy_shared(x, weights, heads, index, strength)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _numpy_shared(
    x: np.ndarray,
    weights: dict,
    heads: int,
    index: np.ndarray,
    strength: np.ndarray,
    log_maps: np.ndarray | None = None,
) -> np.ndarray:
    """`CrossAttention.shared` in float64: each reader row also attends to the tokens `index` names,
    blended by its strength; with `log_maps` (readers, n, references), a reference row's keys get the
    reader's log map of that reference as a logit bias."""
    b, n, width = x.shape
    readers = strength.shape[0]
    m = index.shape[0] // readers
    q, k, v = (x.astype(np.float64) @ weights[f"to_{p}.weight"].T for p in "qkv")
    flat_k, flat_v = k.reshape(b * n, width), v.reshape(b * n, width)
    d = width // heads
    expected = np.empty_like(q)
    for row in range(b):
        out = _numpy_attention(q[row], k[row], v[row], heads)
        if row < readers:
            extra = index[row * m : (row + 1) * m]
            keys = np.concatenate([k[row], flat_k[extra]])
            values = np.concatenate([v[row], flat_v[extra]])
            bias = np.zeros((n, n + m))
            if log_maps is not None:
                for j, source in enumerate(extra // n):
                    if source >= readers:  # a reference row's token
                        bias[:, n + j] = log_maps[row, :, source - readers]
            wide = np.empty_like(q[row])
            for h in range(heads):
                part = slice(h * d, (h + 1) * d)
                wide[:, part] = (
                    _softmax(q[row][:, part] @ keys[:, part].T / np.sqrt(d) + bias) @ values[:, part]
                )
            out = out + strength[row] * (wide - out)
        expected[row] = out @ weights["to_out.0.weight"].T + weights["to_out.0.bias"]
    return expected


def _random_cell(width: int, context_width: int, heads: int, paths: str, seed: int) -> tuple:
    cell = CrossAttention(width, context_width, heads)
    if paths == "framework":
        set_cpu_paths(cell, kernels=False, host=False)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, param in cell.parameters_and_names():
        value = rng.standard_normal(param.shape).astype(np.float32) * 0.5
        param.set_data(Tensor(value))
        weights[name] = value.astype(np.float64)
    return cell, weights


def _numpy_log_maps(
    x: np.ndarray, context: np.ndarray, regions: np.ndarray, rows: np.ndarray, weights: dict, heads: int
) -> np.ndarray:
    """The regional maps, float64: head-mean cross-attention mass on each region, min-max scaled over
    the queries, made competitive (m_j^2 / sum m), scaled to a peak of 1, floored; 1 without tokens."""
    q = x.astype(np.float64) @ weights["to_q.weight"].T
    d = q.shape[2] // heads
    out = np.empty((x.shape[0], x.shape[1], regions.shape[2]))
    for reader in range(x.shape[0]):
        keys = context[rows[reader]].astype(np.float64) @ weights["to_k.weight"].T
        probs = np.mean(
            [
                _softmax(q[reader][:, h * d : (h + 1) * d] @ keys[:, h * d : (h + 1) * d].T / np.sqrt(d))
                for h in range(heads)
            ],
            axis=0,
        )
        mass = probs @ regions[reader]
        has = regions[reader].max(0) > 0
        scaled = (mass - mass.min(0)) / (mass.max(0) - mass.min(0) + REGION_EPS) * has
        rival = scaled**2 / (scaled.sum(1, keepdims=True) + REGION_EPS)
        share = rival / (rival.max(0) + REGION_EPS)
        out[reader] = np.where(has, REGION_FLOOR + (1 - REGION_FLOOR) * share, 1.0)
    return np.log(out)


@pytest.mark.parametrize("paths", ["default", "framework"])
def test_regional_maps_and_attention_equal_a_numpy_reference(paths: str) -> None:
    """Character regions: the maps (`region_log_maps`, from a cross-attention) and the self-attention
    whose logits on each reference row's keys are raised by its log map, against float64 numpy."""
    width, heads, readers, refs, n, m, length = 16, 2, 2, 2, 10, 9, 6
    b = readers + refs
    cross, cross_w = _random_cell(width, 12, heads, paths, 3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((readers, n, width)).astype(np.float32)
    context = rng.standard_normal((b, length, 12)).astype(np.float32)
    regions = np.zeros((readers, length, refs), np.float32)
    regions[0, 1, 0] = regions[0, 2, 0] = regions[0, 4, 1] = 1
    regions[1, 3, 1] = 1  # reader 1 places only reference 1; reference 0 applies everywhere
    rows = np.array([1, 1], np.int32)  # both readers map with row 1's prompt (a guided panel's twin)
    got_maps = cross.region_log_maps(Tensor(x), Tensor(context), Tensor(regions), Tensor(rows)).asnumpy()
    want_maps = _numpy_log_maps(x, context, regions, rows, cross_w, heads)
    np.testing.assert_allclose(got_maps, want_maps, rtol=1e-5, atol=1e-5)
    assert np.all(got_maps[1, :, 0] == 0.0) and got_maps.min() >= np.log(REGION_FLOOR) - 1e-6
    assert np.isclose(got_maps[0, :, 0].max(), 0.0, atol=1e-4)  # each map peaks at 1

    cell, weights = _random_cell(width, width, heads, paths, 1)
    tokens = rng.standard_normal((b, n, width)).astype(np.float32)
    index = rng.integers(0, b * n, readers * m).astype(np.int32)  # readers' and references' tokens
    strength = np.array([0.7, 1.0], np.float32)
    got = cell.shared(
        Tensor(tokens), Tensor(strength.reshape(-1, 1, 1)), Tensor(index), Tensor(got_maps)
    ).asnumpy()

    expected = _numpy_shared(tokens, weights, heads, index, strength, want_maps)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    uniform = cell.shared(Tensor(tokens), Tensor(strength.reshape(-1, 1, 1)), Tensor(index)).asnumpy()
    assert np.abs(uniform - got).max() > 1e-3  # the maps did move the readers


def test_share_indices_read_every_reference_token_and_a_sample_of_the_other_panels() -> None:
    tokens, panels, halves, refs = 16, 3, 2, 2
    index = share_indices(
        panels=panels,
        halves=halves,
        references=refs,
        tokens=tokens,
        panel_rate=0.25,
        rng=np.random.default_rng(0),
    )
    readers = halves * panels
    rows = index.reshape(readers, -1) // tokens
    assert rows.shape == (readers, refs * tokens + (panels - 1) * 4) and index.dtype == np.int32
    for reader in range(readers):
        half, panel = divmod(reader, panels)
        row = rows[reader]
        first_ref = halves * panels
        assert sorted(set(row[: refs * tokens])) == [first_ref, first_ref + 1]
        assert np.array_equal(
            np.sort(index.reshape(readers, -1)[reader, : refs * tokens] % tokens)[::refs], np.arange(tokens)
        )
        others = row[refs * tokens :]
        assert set(others) == {half * panels + q for q in range(panels) if q != panel}
        picked = index.reshape(readers, -1)[reader, refs * tokens :]
        assert len(set(picked)) == len(picked)  # no token twice
    again = share_indices(
        panels=panels,
        halves=halves,
        references=refs,
        tokens=tokens,
        panel_rate=0.25,
        rng=np.random.default_rng(0),
    )
    assert np.array_equal(index, again)
    with pytest.raises(InvalidOption):
        share_indices(
            panels=1, halves=2, references=0, tokens=tokens, panel_rate=0.5, rng=np.random.default_rng(0)
        )


def test_off_is_bit_identical_to_the_plain_sampler(
    pipe: WukongPipeline, ctx: np.ndarray, reference: tuple[np.ndarray, np.ndarray]
) -> None:
    """No consistency, an inactive one (strength 0, no reference, one panel) and the steps past the
    range all run exactly the plain guided step."""

    def plain(steps: int, sampler: str = "dpm++2m") -> np.ndarray:
        x = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
        return run_sampler(
            sampler,
            lambda latents, t: pipe.guided_noise(latents, int(t), ctx[:1], ctx[1:], 7.5),
            x,
            make_timesteps(steps),
            pipe.schedule,
        )

    expected = plain(4)
    common = {"steps": 4, "seed": 3, "height": SIDE, "width": SIDE}
    for consistency in (
        None,
        Consistency(),
        Consistency(panel_rate=0.5),
        Consistency(references=reference[1], strength=0.0),
        Consistency(references=reference[1], steps=0.0),
    ):
        got = pipe.sample(ctx[:1], ctx[1:], consistency=consistency, **common)
        assert np.array_equal(got, expected), consistency
    with_references = Consistency(references=np.repeat(reference[1], 2, 0), steps=0.5)
    uniform = pipe.sample(ctx[:1], ctx[1:], consistency=with_references, **common)
    nowhere = replace(with_references, regions=np.zeros((2, 1, ctx.shape[1]), np.float32))
    assert reader_regions(nowhere, 1, 2, ctx.shape[1]) is None
    assert np.array_equal(pipe.sample(ctx[:1], ctx[1:], consistency=nowhere, **common), uniform)
    shared_first_step = pipe.sample(
        ctx[:1], ctx[1:], consistency=Consistency(references=reference[1], steps=0.25), **common
    )
    assert not np.array_equal(shared_first_step, expected)


def _pooled_mid_features(
    pipe: WukongPipeline, x: np.ndarray, t: int, ctx: np.ndarray, share: tuple
) -> np.ndarray:
    """The UNet's middle-block output averaged over space, (rows, channels), run with `share`."""
    unet = pipe.model.unet
    emb = unet.time_embed(unet.embed_timesteps(np.full(x.shape[0], t)))
    context = Tensor(np.repeat(ctx, x.shape[0], axis=0))
    h = Tensor(x)
    for block in unet.input_blocks:
        for layer in block:
            h = layer(h, emb, context, share)
    for layer in unet.middle_block:
        h = layer(h, emb, context, share)
    return h.asnumpy().mean(axis=(2, 3))


def test_a_reference_pulls_the_panels_features_towards_it(pipe: WukongPipeline, ctx: np.ndarray) -> None:
    """Metric: cosine similarity of the panel's and the reference's pooled middle-block features (the
    spatial mean, as image-similarity models compare pooled embeddings) in one shared UNet step, with
    the reference read at strength 1 against strength 0 (the same call, nothing shared): the distance
    1 - cosine falls by at least 10% for every seed and timestep.

    On random weights self-attention is close to uniform, so what a reference moves is the panel's
    global feature statistics; its effect on the final picture is lost in the untrained model's other
    paths and is measured with real weights by bench/consistency.py."""
    unet = pipe.model.unet
    rng = np.random.default_rng(7)
    latent = np.repeat(np.repeat(rng.standard_normal((1, 4, 4, 4)).astype(np.float32), 2, 2), 2, 3)
    noise = np.random.default_rng(99).standard_normal(latent.shape).astype(np.float32)
    index = [
        Tensor(share_indices(panels=1, halves=1, references=1, tokens=(8 // r) ** 2, panel_rate=0, rng=rng))
        for r in unet.share_rates
    ]
    for seed in (1, 2, 3):
        panel = np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)
        for t in (900, 500):
            rows = np.concatenate([panel, add_noise(pipe.schedule, latent, noise, t)])
            distance = []
            for strength in (0.0, 1.0):
                share = (Tensor(np.full((1, 1, 1), strength, np.float32)), *index)
                features = _pooled_mid_features(pipe, rows, t, ctx[1:], share)
                distance.append(1.0 - _cosine_raw(features[0], features[1]))
            assert distance[1] < 0.9 * distance[0], (seed, t, distance)


def _cosine_raw(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _first_transformer(
    pipe: WukongPipeline, latents: list[np.ndarray], context: Tensor, share: tuple, regions: tuple
) -> tuple[np.ndarray, np.ndarray]:
    """On the rows `latents` at timestep 700, run with `share`: the first row's output of the UNet's
    first transformer (channels, tokens), and its first block's map of reference 0 for that row
    (tokens,) under `regions` (tokens, rows), from the block's input as the block computes it."""
    unet = pipe.model.unet
    conv, res, transformer = unet.input_blocks[0][0], unet.input_blocks[1][0], unet.input_blocks[1][1]
    emb = unet.time_embed(unet.embed_timesteps(np.full(len(latents), 700)))
    x = res(conv(Tensor(np.concatenate(latents)), emb, context), emb, context)
    b, c, h, w = x.shape
    out = transformer(x, emb, context, share).asnumpy()[0].reshape(c, h * w)
    tokens = transformer.proj_in(transformer.norm(x)).reshape(b, c, h * w).transpose(0, 2, 1)
    block = transformer.transformer_blocks[0]
    log_maps = block.attn2.region_log_maps(block.norm2(tokens[:1]), context, *regions)
    return out, np.exp(log_maps.asnumpy()[0, :, 0])


def test_each_reference_acts_mostly_where_its_characters_words_draw(pipe: WukongPipeline) -> None:
    """Two references (A named by 猫, B by 狗 in the panel's prompt), one shared transformer (the first,
    at the latent resolution) of the real UNet on random weights.

    Metric: A's influence at an image position is how much the transformer's output there changes when
    reference A's picture is swapped for another (B and the panel fixed): the channel norm of the
    difference. Split the positions at the median of that block's map M_A (`region_log_maps` of the
    block's input): with regions, the mean influence where M_A is high is at least 1.3x that where it
    is low, and at least 1.3x the same ratio without regions (which reads A everywhere: about 1)."""
    ids = pipe.tokenize(["一只猫和一只狗在草地上", ""])
    ctx = pipe.encode_tokens(ids)
    cat, dog = (int(np.flatnonzero(ids[0] == pipe.tokenize([w])[0][1])[0]) for w in "猫狗")
    regions = np.zeros((1, ctx.shape[1], 2), np.float32)
    regions[0, cat, 0] = regions[0, dog, 1] = 1
    rows = Tensor(np.zeros(1, np.int32))  # the panel's own (conditional) prompt
    context = Tensor(np.concatenate([ctx[:1], ctx[1:], ctx[1:]]))
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        panel, ref_a, other_a, ref_b = (
            rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(4)
        )
        index = share_indices(panels=1, halves=1, references=2, tokens=64, panel_rate=0, rng=rng)
        share = (Tensor(np.ones((1, 1, 1), np.float32)), Tensor(index), Tensor(np.zeros(4, np.int32)))

        where = (Tensor(regions), rows)
        ratios = []
        for run in ((*share, *where), share):  # with regions, then reading A everywhere
            out, map_a = _first_transformer(pipe, [panel, ref_a, ref_b], context, run, where)
            swapped, _ = _first_transformer(pipe, [panel, other_a, ref_b], context, run, where)
            influence = np.linalg.norm(out - swapped, axis=0)
            high = map_a >= np.median(map_a)
            ratios.append(influence[high].mean() / influence[~high].mean())
        assert ratios[0] > 1.3 and ratios[0] > 1.3 * ratios[1], (seed, ratios)


def test_panels_drawn_together_share_attention(pipe: WukongPipeline, ctx: np.ndarray) -> None:
    """Three panels of one batch: sharing changes the drawing, reproducibly for a seed, and in a shared
    step their pooled middle-block features grow more alike (mean pairwise 1 - cosine falls by 10%)."""
    cond = np.repeat(ctx[:1], 3, axis=0)
    common = {"steps": 6, "seed": 5, "height": SIDE, "width": SIDE}
    alone = pipe.sample(cond, ctx[1:], **common)
    together = pipe.sample(cond, ctx[1:], consistency=Consistency(panel_rate=0.5, steps=1.0), **common)
    assert not np.allclose(alone, together)
    again = pipe.sample(cond, ctx[1:], consistency=Consistency(panel_rate=0.5, steps=1.0), **common)
    assert np.array_equal(again, together)  # the token samples come from the seed

    unet = pipe.model.unet
    rng = np.random.default_rng(0)
    index = [
        Tensor(share_indices(panels=3, halves=1, references=0, tokens=(8 // r) ** 2, panel_rate=0.5, rng=rng))
        for r in unet.share_rates
    ]
    panels = np.random.default_rng(4).standard_normal((3, 4, 8, 8)).astype(np.float32)

    def distance(strength: float) -> float:
        share = (Tensor(np.full((3, 1, 1), strength, np.float32)), *index)
        f = _pooled_mid_features(pipe, panels, 700, ctx[1:], share)
        return float(np.mean([1.0 - _cosine_raw(f[i], f[j]) for i, j in ((0, 1), (0, 2), (1, 2))]))

    plain, shared = distance(0.0), distance(1.0)
    assert shared < 0.9 * plain, (plain, shared)


def test_compiled_sharing_equals_eager(
    pipe: WukongPipeline, ctx: np.ndarray, reference: tuple[np.ndarray, np.ndarray]
) -> None:
    graph = WukongPipeline(pipe.model, CFG, None, graph=True)
    cond = np.repeat(ctx[:1], 2, axis=0)
    consistency = Consistency(references=np.repeat(reference[1], 2, axis=0), strength=0.8, panel_rate=0.5)
    common = {"steps": 3, "seed": 9, "height": SIDE, "width": SIDE, "consistency": consistency}
    compiled = graph.sample(cond, ctx[1:], **common)
    assert graph._compiled_shapes  # the shared call ran compiled
    shapes = len(graph._compiled_shapes)
    np.testing.assert_allclose(compiled, pipe.sample(cond, ctx[1:], **common), rtol=1e-5, atol=1e-5)
    regions = np.zeros((2, 2, ctx.shape[1]), np.float32)
    regions[0, :, 2] = regions[1, 0, 4] = 1
    common["consistency"] = Consistency(
        references=consistency.references, strength=0.8, panel_rate=0.5, regions=regions
    )
    regional = graph.sample(cond, ctx[1:], **common)
    assert len(graph._compiled_shapes) == shapes + 1  # the regional call compiled on its own
    np.testing.assert_allclose(regional, pipe.sample(cond, ctx[1:], **common), rtol=1e-5, atol=1e-5)
    assert np.abs(regional - compiled).max() > 1e-3


def test_bad_consistency_input_is_refused(pipe: WukongPipeline, ctx: np.ndarray) -> None:
    with pytest.raises(InvalidOption, match="strength"):
        Consistency(strength=-1)
    with pytest.raises(InvalidOption, match="Reference latents"):
        Consistency(references=np.zeros((4, 8, 8), np.float32))
    wrong_size = Consistency(references=np.zeros((1, 4, 16, 16), np.float32))
    with pytest.raises(InvalidOption, match="Reference latents"):
        pipe.sample(ctx[:1], ctx[1:], steps=2, seed=1, height=SIDE, width=SIDE, consistency=wrong_size)
    x = np.zeros((2, 4, 8, 8), np.float32)
    with pytest.raises(InvalidOption, match="indices"):
        bad = [np.array([0, 10_000], np.int32)] * len(pipe.model.unet.share_rates)
        pipe.predict_noise(x, np.array([1, 1]), np.repeat(ctx[:1], 2, 0), share=(np.ones(1), bad))
