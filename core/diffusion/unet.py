"""The SD-v1 UNet: ResBlocks, SpatialTransformers (self-attn, cross-attn, GEGLU) and skip connections."""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from core.diffusion import cpu_kernels, runtime
from core.diffusion.config import WukongConfig
from core.diffusion.consistency import REGION_EPS, REGION_FLOOR
from core.diffusion.layers import (
    GroupNorm,
    Identity,
    LayerNorm,
    SiLU,
    WrappedConv,
    attention,
    attention_keys_first,
    conv2d,
    expand,
    gelu_tanh,
    kernels_available,
    merge_heads,
    split_heads,
    split_heads_transposed,
    timestep_embedding,
    upsample_nearest,
)

_bmm_a_b_t = ops.BatchMatMul(transpose_a=True, transpose_b=True)
_bmm = ops.BatchMatMul()
_bmm_b_t = ops.BatchMatMul(transpose_b=True)
_matmul_b_t = ops.MatMul(transpose_b=True)

RESBLOCK_NORM_EPS = 1e-5
TRANSFORMER_NORM_EPS = 1e-6


class ResBlock(nn.Cell):
    def __init__(self, c_in: int, c_out: int, emb_width: int, groups: int) -> None:
        super().__init__()
        self.in_layers_norm = GroupNorm(groups, c_in, RESBLOCK_NORM_EPS)
        self.in_layers_conv = WrappedConv(c_in, c_out, 3)
        self.emb_layers = nn.SequentialCell([SiLU(), nn.Dense(emb_width, c_out)])
        self.out_layers_norm = GroupNorm(groups, c_out, RESBLOCK_NORM_EPS)
        self.out_layers_conv = WrappedConv(c_out, c_out, 3)
        self.skip_connection = WrappedConv(c_in, c_out, 1) if c_in != c_out else Identity()

    def construct(
        self, x: Tensor, emb: Tensor, context: Tensor, share: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        # conv(x) + emb is only read by the next GroupNorm + SiLU, which adds the embedding itself
        h = self.in_layers_conv(self.in_layers_norm.silu_of(x))
        h = self.out_layers_conv(self.out_layers_norm.silu_of(h, self.emb_layers(emb)))
        return self.skip_connection(x) + h


class CrossAttention(nn.Cell):
    """Multi-head attention of image tokens over themselves (attn1) or over the text (attn2).

    `kernels` (on the CPU when our C++ kernels built, see `cpu_kernels`): one fused kernel attends
    every head in place in the token layout, so no copy splits or merges the heads, in PyNative and in
    a compiled graph (where each Transpose would also hold its memory to the end of the graph). Without
    it, `host` (on by default on the CPU, off for a compiled graph) splits and merges the heads by
    copies through numpy, see `host_permute`.
    """

    def __init__(self, width: int, context_width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(width // heads)
        self.to_q = nn.Dense(width, width, has_bias=False)
        self.to_k = nn.Dense(context_width, width, has_bias=False)
        self.to_v = nn.Dense(context_width, width, has_bias=False)
        self.to_out = nn.SequentialCell([nn.Dense(width, width)])
        self.host = runtime.on_cpu()
        self.kernels = kernels_available()

    def construct(self, x: Tensor, context: Tensor) -> Tensor:
        return self.to_out(self._attend(self.to_q(x), self.to_k(context), self.to_v(context)))

    def shared(self, x: Tensor, weight: Tensor, index: Tensor, log_maps: Tensor | None = None) -> Tensor:
        """Self-attention in which the first `k` rows (the readers) also attend to tokens of the batch.

        `x` (b, n, c) image tokens; `index` (k * m,) int32: for reader i, positions i*m..(i+1)*m-1 name
        the m extra tokens it reads, as rows of the batch flattened to (b * n) tokens (a reference
        picture's tokens, a sample of the other panels'); `weight` (k, 1, 1): the strength per reader.
        Keys and values of the extra tokens come from the same projections and are appended to the
        reader's own; its output is blended with its plain self-attention output:
        plain + weight * (with_extra - plain), so 0 is plain attention and 1 plain appended keys.
        Rows from k on (the references) attend only to themselves.

        `log_maps` (k, n, r), when given: the logit of reader query q for every key of reference row
        k + j (the extra tokens whose index falls in that row) is raised by log_maps[:, q, j] (<= 0,
        see `region_log_maps`), so reference j is read mostly where its map is high. The bias is added
        as r extra dimensions of each head (the query carries the bias, the key a one-hot of its
        reference row, the value zeros), so one attention call of one static shape computes it and no
        (queries x keys) bias is ever held.
        """
        b, n, c = x.shape
        readers = weight.shape[0]
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        plain = self._attend(q, k, v)
        extra = index.shape[0] // readers
        k_more = ops.gather(k.reshape(b * n, c), index, 0).reshape(readers, extra, c)
        v_more = ops.gather(v.reshape(b * n, c), index, 0).reshape(readers, extra, c)
        k_all = ops.concat((k[:readers], k_more), 1)
        v_all = ops.concat((v[:readers], v_more), 1)
        own = plain[:readers]
        if log_maps is None:
            wide = self._attend(q[:readers], k_all, v_all)
        else:
            wide = self._attend_biased(q[:readers], k_all, v_all, index, log_maps, n)
        mixed = own + expand(weight, own.shape) * (wide - own)
        if readers < b:
            mixed = ops.concat((mixed, plain[readers:]), 0)
        return self.to_out(mixed)

    def region_log_maps(self, x: Tensor, context: Tensor, regions: Tensor, rows: Tensor) -> Tensor:
        """log M (k, n, r) for the readers' tokens `x` (k, n, c), this cross-attention's input (the
        block's norm2 of its input, before the self-attention): M_j(q) is how much query q attends,
        by this cross-attention, to the tokens `regions[:, :, j]` (k, L, r) 0/1 name in the prompt
        `context[rows]` (rows (k,)).

        Per reader and reference: the attention probabilities (softmax over the L text tokens) summed
        over the region's tokens and averaged over heads; scaled to [0, 1] over the queries (min-max);
        made competitive between the references, m_j^2 / sum_i m_i (where another character's words
        draw more, this one's map falls), scaled again to a peak of 1 (where its character is most
        clearly, a reference is read as without regions); and floored, M = FLOOR + (1 - FLOOR) * that.
        A reference without region tokens for a reader gets M = 1 (log 0: read everywhere)."""
        readers, length, _ = regions.shape
        h = self.heads
        q = split_heads(self.to_q(x), h)  # (k*h, n, d)
        keys = split_heads(self.to_k(ops.gather(context, rows, 0)), h)  # (k*h, L, d)
        probs = ops.softmax((_bmm_b_t(q, keys) * self.scale).astype(ms.float32), -1)  # (k*h, n, L)
        n = probs.shape[1]
        mean = probs.reshape(readers, h, n, length).mean(1)
        mass = _bmm(mean, regions.astype(ms.float32))  # (k, n, r)
        low = ops.amin(mass, 1, True)
        high = ops.amax(mass, 1, True)
        has = (ops.amax(regions, 1, True) > 0).astype(ms.float32)  # (k, 1, r)
        scaled = (mass - low) / (high - low + REGION_EPS) * has
        rival = scaled * scaled / (scaled.sum(-1, keepdims=True) + REGION_EPS)
        share = rival / (ops.amax(rival, 1, True) + REGION_EPS)
        maps = (REGION_FLOOR + (1.0 - REGION_FLOOR) * share) * has + (1.0 - has)
        return ops.log(maps)

    def _attend_biased(
        self, q: Tensor, k: Tensor, v: Tensor, index: Tensor, log_maps: Tensor, tokens: int
    ) -> Tensor:
        """`_attend` of q (k, n, c) over k, v (k, n + m, c) (own tokens, then the extra ones that `index`
        names) with the logit bias `log_maps` (k, n, r) on the keys of reference rows k..k+r-1."""
        readers, n, c = q.shape
        keys, refs, h = k.shape[1], log_maps.shape[2], self.heads
        d = c // h
        extra = index.shape[0] // readers
        row_of = ops.floor_div(index, tokens).reshape(readers, extra, 1)
        first = ops.arange(readers, readers + refs, dtype=row_of.dtype).reshape(1, 1, refs)
        hot = ops.equal(row_of, first).astype(k.dtype)  # (k, m, r): which reference a key belongs to
        hot = ops.concat((ops.zeros((readers, keys - extra, refs), k.dtype), hot), 1)
        # queries pre-scaled, so the bias dimensions add log M itself to the logits
        q_aug = ops.concat(
            (
                (q * self.scale).reshape(readers, n, h, d),
                ops.broadcast_to(
                    log_maps.astype(q.dtype).reshape(readers, n, 1, refs), (readers, n, h, refs)
                ),
            ),
            -1,
        ).reshape(readers, n, h * (d + refs))
        k_aug = ops.concat(
            (
                k.reshape(readers, keys, h, d),
                ops.broadcast_to(hot.reshape(readers, keys, 1, refs), (readers, keys, h, refs)),
            ),
            -1,
        ).reshape(readers, keys, h * (d + refs))
        v_aug = ops.concat(
            (v.reshape(readers, keys, h, d), ops.zeros((readers, keys, h, refs), v.dtype)), -1
        ).reshape(readers, keys, h * (d + refs))
        out = self._attend(q_aug, k_aug, v_aug, 1.0)
        return out.reshape(readers, n, h, d + refs)[:, :, :, :d].reshape(readers, n, c)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
        """Multi-head attention of projected q (b, n, c) over k, v (b, m, c), heads merged, before to_out;
        softmax(scale q k^T) v with `scale` 1/sqrt(head width) unless given."""
        h = self.heads
        if self.kernels and q.dtype == ms.float32 and cpu_kernels.attention_available():
            return cpu_kernels.attention_tokens(q, k, v, h, self.scale if scale is None else scale)
        if scale is not None:  # the paths below scale by 1/sqrt(head width)
            q = q * (scale * math.sqrt(q.shape[2] // h))
        if self.host:
            k_t = split_heads_transposed(k, h, host=True)
            q, v = split_heads(q, h, host=True), split_heads(v, h, host=True)
            return merge_heads(attention_keys_first(q, k_t, v, None, self.kernels), h, host=True)
        q, k, v = split_heads(q, h), split_heads(k, h), split_heads(v, h)
        return merge_heads(attention(q, k, v, None, self.kernels), h)


class GEGLU(nn.Cell):
    """value * gelu_tanh(gate), both halves of one projection; `kernels`: one C++ kernel adds the
    projection's bias and reads the halves in place (see `cpu_kernels`)."""

    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.inner = inner
        self.proj = nn.Dense(width, 2 * inner)
        self.host = runtime.on_cpu()
        self.kernels = kernels_available()

    def construct(self, x: Tensor) -> Tensor:
        if self.kernels and x.dtype == ms.float32:
            b, n, width = x.shape  # tokens
            product = _matmul_b_t(x.reshape(b * n, width), self.proj.weight)  # nn.Dense without its bias
            return cpu_kernels.geglu(product, self.proj.bias).reshape(b, n, self.inner)
        both = self.proj(x)
        # The split halves are strided views; copied contiguous first (through numpy on the CPU, where
        # that copy is several times faster), since MindSpore's CPU element-wise kernels are several
        # times slower on strided views than the copies cost.
        if self.host:
            values = both.asnumpy()
            value = Tensor.from_numpy(np.ascontiguousarray(values[..., : self.inner]))
            gate = Tensor.from_numpy(np.ascontiguousarray(values[..., self.inner :]))
            return value * gelu_tanh(gate)
        value, gate = ops.split(both, self.inner, axis=-1)
        return value.contiguous() * gelu_tanh(gate.contiguous())


class FeedForward(nn.Cell):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.SequentialCell([GEGLU(width, 4 * width), Identity(), nn.Dense(4 * width, width)])

    def construct(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    def __init__(self, width: int, context_width: int, heads: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(width, width, heads)
        self.ff = FeedForward(width)
        self.attn2 = CrossAttention(width, context_width, heads)
        self.norm1 = LayerNorm(width, 1e-5)
        self.norm2 = LayerNorm(width, 1e-5)
        self.norm3 = LayerNorm(width, 1e-5)

    def construct(
        self,
        x: Tensor,
        context: Tensor,
        weight: Tensor | None = None,
        index: Tensor | None = None,
        regions: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """`weight`, `index`: tokens shared into the self-attention (see `CrossAttention.shared`);
        `regions`, `rows`: each reference read mostly where its character's words draw this block's
        cross-attention (see `CrossAttention.region_log_maps`; the maps of the block's input)."""
        h = self.norm1(x)
        if weight is None:
            x = x + self.attn1(h, h)
        elif regions is None:
            x = x + self.attn1.shared(h, weight, index)
        else:
            log_maps = self.attn2.region_log_maps(self.norm2(x[: weight.shape[0]]), context, regions, rows)
            x = x + self.attn1.shared(h, weight, index, log_maps)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Cell):
    """Image (b, c, h, w) -> tokens (b, h*w, c) -> transformer blocks -> image, plus the input."""

    def __init__(self, width: int, context_width: int, heads: int, depth: int, groups: int) -> None:
        super().__init__()
        self.norm = GroupNorm(groups, width, TRANSFORMER_NORM_EPS)
        self.proj_in = conv2d(width, width, 1)
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(width, context_width, heads) for _ in range(depth)]
        )
        self.proj_out = conv2d(width, width, 1)
        self.fused_proj = runtime.on_cpu()
        self.share_slot = 0
        """Which index of a `share` tuple (after its weight) holds this resolution's token indices."""
        self.share_rates = 1
        """How many index tensors a `share` tuple holds; regions and their rows follow when present."""

    def construct(
        self, x: Tensor, emb: Tensor, context: Tensor, share: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        b, c, h, w = x.shape
        if self.fused_proj:
            return x + self._out_fused(self._blocks(self._in_fused(self.norm(x)), context, share), h, w)
        tokens = self.proj_in(self.norm(x)).reshape(b, c, h * w).transpose(0, 2, 1)
        return x + self.proj_out(self._blocks(tokens, context, share).transpose(0, 2, 1).reshape(b, c, h, w))

    def _blocks(self, tokens: Tensor, context: Tensor, share: tuple[Tensor, ...] | None) -> Tensor:
        if share is None:
            for block in self.transformer_blocks:
                tokens = block(tokens, context)
            return tokens
        weight, index = share[0], share[1 + self.share_slot]
        if len(share) == 1 + self.share_rates:
            for block in self.transformer_blocks:
                tokens = block(tokens, context, weight, index)
            return tokens
        regions, rows = share[1 + self.share_rates], share[2 + self.share_rates]
        for block in self.transformer_blocks:
            tokens = block(tokens, context, weight, index, regions, rows)
        return tokens

    # On the CPU the 1x1 projections in and out are products whose transposed operand is read in
    # place (transpose flags), so neither the convolution nor the token transposes run: MindSpore's
    # CPU 1x1 convolution is about 2x slower than a product of the same size, its Transpose slower still.

    def _in_fused(self, x: Tensor) -> Tensor:
        """(b, c, h, w) -> tokens (b, h*w, c) through proj_in."""
        b, c, h, w = x.shape
        weight = ops.tile(ops.depend(self.proj_in.weight, x).reshape(1, c, c), (b, 1, 1))
        tokens = _bmm_a_b_t(x.reshape(b, c, h * w), weight)
        return ops.bias_add(tokens.reshape(b * h * w, c), self.proj_in.bias).reshape(b, h * w, c)

    def _out_fused(self, tokens: Tensor, h: int, w: int) -> Tensor:
        """tokens (b, h*w, c) -> (b, c, h, w) through proj_out."""
        b, _, c = tokens.shape
        weight = ops.tile(ops.depend(self.proj_out.weight, tokens).reshape(1, c, c), (b, 1, 1))
        return ops.bias_add(_bmm_b_t(weight, tokens), self.proj_out.bias).reshape(b, c, h, w)


class Downsample(nn.Cell):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = WrappedConv(channels, channels, 3, stride=2)

    def construct(
        self, x: Tensor, emb: Tensor, context: Tensor, share: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        return self.op(x)


class Upsample(nn.Cell):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = WrappedConv(channels, channels, 3)

    def construct(
        self, x: Tensor, emb: Tensor, context: Tensor, share: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        return self.conv(upsample_nearest(x))


class InputConv(WrappedConv):
    def construct(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor, share: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        return self.conv(x)


class UNetModel(nn.Cell):
    """eps = UNet(x_t, t, context); names follow the official `model.diffusion_model.` layout."""

    def __init__(self, config: WukongConfig) -> None:
        super().__init__()
        ch0, groups, heads = config.unet_channels, config.norm_groups, config.unet_heads
        ctx, depth = config.context_dim, config.unet_transformer_depth
        emb_width = 4 * ch0
        self.model_channels = ch0
        self.time_embed = nn.SequentialCell(
            [nn.Dense(ch0, emb_width), SiLU(), nn.Dense(emb_width, emb_width)]
        )

        transformers: list[tuple[int, SpatialTransformer]] = []

        def transformer(width: int) -> SpatialTransformer:
            cell = SpatialTransformer(width, ctx, heads, depth, groups)
            transformers.append((rate, cell))
            return cell

        self.input_blocks = nn.CellList([nn.CellList([InputConv(config.latent_channels, ch0, 3)])])
        skip_widths = [ch0]
        ch, rate = ch0, 1
        levels = len(config.unet_channel_mult)
        for level, mult in enumerate(config.unet_channel_mult):
            for _ in range(config.unet_res_blocks):
                layers: list[nn.Cell] = [ResBlock(ch, ch0 * mult, emb_width, groups)]
                ch = ch0 * mult
                if rate in config.unet_attention_rates:
                    layers.append(transformer(ch))
                self.input_blocks.append(nn.CellList(layers))
                skip_widths.append(ch)
            if level != levels - 1:
                self.input_blocks.append(nn.CellList([Downsample(ch)]))
                skip_widths.append(ch)
                rate *= 2

        self.middle_block = nn.CellList(
            [ResBlock(ch, ch, emb_width, groups), transformer(ch), ResBlock(ch, ch, emb_width, groups)]
        )

        self.output_blocks = nn.CellList()
        for level, mult in reversed(list(enumerate(config.unet_channel_mult))):
            for i in range(config.unet_res_blocks + 1):
                layers = [ResBlock(ch + skip_widths.pop(), ch0 * mult, emb_width, groups)]
                ch = ch0 * mult
                if rate in config.unet_attention_rates:
                    layers.append(transformer(ch))
                if level and i == config.unet_res_blocks:
                    layers.append(Upsample(ch))
                    rate //= 2
                self.output_blocks.append(nn.CellList(layers))

        self.out = nn.SequentialCell(
            [GroupNorm(groups, ch, RESBLOCK_NORM_EPS), SiLU(), WrappedConv(ch, config.latent_channels, 3)]
        )
        self.share_rates: tuple[int, ...] = tuple(sorted({r for r, _ in transformers}))
        """Downsampling rates that have transformers, in the order of a `share` tuple's index tensors."""
        for r, cell in transformers:
            cell.share_slot = self.share_rates.index(r)
            cell.share_rates = len(self.share_rates)

    def construct(
        self, x: Tensor, t_emb: Tensor, context: Tensor, share: tuple[Tensor, ...] | None = None
    ) -> Tensor:
        """`t_emb` is the sinusoidal timestep embedding (n, model_channels), see `embed_timesteps`.

        `share`, when given, is (weight (k, 1, 1), then one int32 index (k * m_r,) per rate of
        `share_rates`): the first k rows' self-attention also reads those tokens of the batch (see
        `CrossAttention.shared`); optionally followed by regions (k, L, r) 0/1 and their prompt rows
        (k,) int32, which weight reference row k + j by where its words draw the cross-attention
        (`CrossAttention.region_log_maps`). None runs exactly the plain UNet."""
        emb = self.time_embed(t_emb)
        skips = []
        h = x
        for block in self.input_blocks:
            for layer in block:
                h = layer(h, emb, context, share)
            skips.append(h)
        for layer in self.middle_block:
            h = layer(h, emb, context, share)
        i = len(skips)
        for block in self.output_blocks:
            i = i - 1  # skips are consumed last first (indexing, not pop: graph mode has no list.pop)
            h = ops.concat((h, skips[i]), 1)
            for layer in block:
                h = layer(h, emb, context, share)
        norm, conv = self.out[0], self.out[2]  # out[1] is the SiLU, fused into the norm
        return conv(norm.silu_of(h))

    def embed_timesteps(self, timesteps: np.ndarray, dtype: ms.Type = ms.float32) -> Tensor:
        """The UNet's `t_emb` input for integer timesteps (n,)."""
        return Tensor(timestep_embedding(timesteps, self.model_channels), dtype=dtype)
