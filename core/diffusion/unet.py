"""The SD-v1 UNet: ResBlocks, SpatialTransformers (self-attn, cross-attn, GEGLU) and skip connections."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from core.diffusion.config import WukongConfig
from core.diffusion.layers import (
    GroupNorm,
    Identity,
    LayerNorm,
    SiLU,
    WrappedConv,
    attention,
    conv2d,
    gelu_tanh,
    merge_heads,
    split_heads,
    timestep_embedding,
    upsample_nearest,
)

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

    def construct(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        h = self.in_layers_conv(ops.silu(self.in_layers_norm(x)))
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers_conv(ops.silu(self.out_layers_norm(h)))
        return self.skip_connection(x) + h


class CrossAttention(nn.Cell):
    """Multi-head attention of image tokens over themselves (attn1) or over the text (attn2)."""

    def __init__(self, width: int, context_width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Dense(width, width, has_bias=False)
        self.to_k = nn.Dense(context_width, width, has_bias=False)
        self.to_v = nn.Dense(context_width, width, has_bias=False)
        self.to_out = nn.SequentialCell([nn.Dense(width, width)])

    def construct(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.heads
        q = split_heads(self.to_q(x), h)
        k = split_heads(self.to_k(context), h)
        v = split_heads(self.to_v(context), h)
        return self.to_out(merge_heads(attention(q, k, v), h))


class GEGLU(nn.Cell):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.inner = inner
        self.proj = nn.Dense(width, 2 * inner)

    def construct(self, x: Tensor) -> Tensor:
        # The split halves are strided views; copied contiguous first, since MindSpore's CPU
        # element-wise kernels are several times slower on strided views than the copies cost.
        value, gate = ops.split(self.proj(x), self.inner, axis=-1)
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

    def construct(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn1(h, h)
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

    def construct(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).reshape(b, c, h * w).transpose(0, 2, 1)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(0, 2, 1).reshape(b, c, h, w))


class Downsample(nn.Cell):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = WrappedConv(channels, channels, 3, stride=2)

    def construct(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Cell):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = WrappedConv(channels, channels, 3)

    def construct(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        return self.conv(upsample_nearest(x))


class InputConv(WrappedConv):
    def construct(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
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

        def transformer(width: int) -> SpatialTransformer:
            return SpatialTransformer(width, ctx, heads, depth, groups)

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

    def construct(self, x: Tensor, t_emb: Tensor, context: Tensor) -> Tensor:
        """`t_emb` is the sinusoidal timestep embedding (n, model_channels), see `embed_timesteps`."""
        emb = self.time_embed(t_emb)
        skips = []
        h = x
        for block in self.input_blocks:
            for layer in block:
                h = layer(h, emb, context)
            skips.append(h)
        for layer in self.middle_block:
            h = layer(h, emb, context)
        i = len(skips)
        for block in self.output_blocks:
            i = i - 1  # skips are consumed last first (indexing, not pop: graph mode has no list.pop)
            h = ops.concat((h, skips[i]), 1)
            for layer in block:
                h = layer(h, emb, context)
        return self.out(h)

    def embed_timesteps(self, timesteps: np.ndarray, dtype: ms.Type = ms.float32) -> Tensor:
        """The UNet's `t_emb` input for integer timesteps (n,)."""
        return Tensor(timestep_embedding(timesteps, self.model_channels), dtype=dtype)
