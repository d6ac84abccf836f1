"""The CLIP-style text encoder: token ids -> the condition (last hidden state after the final LayerNorm)."""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from core.diffusion.config import WukongConfig
from core.diffusion.layers import LayerNorm, attention, merge_heads, split_heads

LAYER_NORM_EPS = 1e-7
"""MindSpore's LayerNorm default, which the official encoder was trained with."""


class MultiheadAttention(nn.Cell):
    """Self-attention with q, k, v fused in one `in_proj` (stacked in that order)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Dense(width, 3 * width)
        self.out_proj = nn.Dense(width, width)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = ops.split(self.in_proj(x), x.shape[-1], axis=-1)
        out = attention(
            split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads), mask
        )
        return self.out_proj(merge_heads(out, self.heads))


class MaskedAttention(nn.Cell):
    """Name level `attn.attn` of the official layout."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = MultiheadAttention(width, heads)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.attn(x, mask)


class ResidualAttentionBlock(nn.Cell):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = MaskedAttention(width, heads)
        self.ln_1 = LayerNorm(width, LAYER_NORM_EPS)
        self.c_fc = nn.Dense(width, 4 * width)
        self.c_proj = nn.Dense(4 * width, width)
        self.ln_2 = LayerNorm(width, LAYER_NORM_EPS)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        h = self.c_fc(self.ln_2(x))
        h = h * ops.sigmoid(1.702 * h)  # QuickGELU
        return x + self.c_proj(h)


class Transformer(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class TextEncoder(nn.Cell):
    """Token embedding + learned positions, causal transformer, final LayerNorm."""

    def __init__(self, config: WukongConfig) -> None:
        super().__init__()
        width, length = config.text_width, config.context_length
        self.embedding_table = Parameter(initializer(Normal(0.02), [config.vocab_size, width]))
        self.positional_embedding = Parameter(initializer(Normal(0.01), [length, width]))
        self.ln_final = LayerNorm(width, LAYER_NORM_EPS)
        self.transformer_layer = Transformer(width, config.text_layers, config.text_heads)
        causal = np.triu(np.full((length, length), -np.inf, dtype=np.float32), 1)
        self._mask = Tensor(causal)

    def construct(self, ids: Tensor) -> Tensor:
        x = ops.gather(self.embedding_table, ids, 0) + self.positional_embedding
        x = self.transformer_layer(x, self._mask)
        return self.ln_final(x)
