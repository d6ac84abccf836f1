"""Reference attention and shared panel attention on diffusers' UNet: the self-attention processor.

The same computation as `core.diffusion.unet.CrossAttention.shared` (see `core.diffusion.consistency`
for which tokens are shared and why): the first k rows of the batch (the readers) also attend to
tokens gathered from the whole batch, their keys and values appended to their own, and each reader's
output is blended with its plain self-attention output by its weight. The token indices for the
current step arrive through the UNet's `cross_attention_kwargs` as `share=(weights, indices)`, with
`indices` keyed by the number of tokens of a resolution, so each self-attention picks its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

Share = tuple[torch.Tensor, dict[int, torch.Tensor]]
"""(weights (k, 1, 1) in the model's dtype, {tokens of a resolution: int64 indices (k * m,)})."""


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of projected q (b, n, c) over k, v (b, m, c), heads merged, before to_out."""
    b, n, c = q.shape
    d = c // attn.heads
    q4 = q.view(b, n, attn.heads, d).transpose(1, 2)
    k4 = k.view(b, k.shape[1], attn.heads, d).transpose(1, 2)
    v4 = v.view(b, v.shape[1], attn.heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q4, k4, v4, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, n, c).to(q.dtype)


class SharedSelfAttnProcessor(AttnProcessor2_0):
    """The self-attention (`attn1`) processor: plain attention without `share`, shared tokens with it."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        share: Share | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if share is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("shared tokens are for the image tokens' own self-attention only")
        weights, indices = share
        b, n, c = hidden_states.shape
        readers = weights.shape[0]
        index = indices[n]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        plain = _attend(attn, q, k, v)
        extra = index.shape[0] // readers
        k_more = k.reshape(b * n, c).index_select(0, index).reshape(readers, extra, c)
        v_more = v.reshape(b * n, c).index_select(0, index).reshape(readers, extra, c)
        k_all = torch.cat((k[:readers], k_more), 1)
        v_all = torch.cat((v[:readers], v_more), 1)
        own = plain[:readers]
        wide = _attend(attn, q[:readers], k_all, v_all)
        mixed = own + weights * (wide - own)
        if readers < b:
            mixed = torch.cat((mixed, plain[readers:]), 0)
        out: torch.Tensor = attn.to_out[1](attn.to_out[0](mixed))
        return out


class CrossAttnProcessor(AttnProcessor2_0):
    """The text cross-attention (`attn2`) processor: plain attention that takes (and ignores) `share`,
    which diffusers hands every attention of a transformer block."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        share: Share | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install(unet: Any) -> None:
    """Give every transformer block of the UNet the shared self-attention and the plain cross-attention."""
    # diffusers types `set_processor` with a closed union of its own processors
    self_attention: Any = SharedSelfAttnProcessor()
    cross_attention: Any = CrossAttnProcessor()
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            if name.endswith("attn1"):
                module.set_processor(self_attention)
            elif name.endswith("attn2"):
                module.set_processor(cross_attention)
