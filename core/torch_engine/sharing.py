"""Reference attention and shared panel attention on diffusers' UNet: the self-attention processor.

The same computation as `core.diffusion.unet.CrossAttention.shared` (see `core.diffusion.consistency`
for which tokens are shared and why): the first k rows of the batch (the readers) also attend to
tokens gathered from the whole batch, their keys and values appended to their own, and each reader's
output is blended with its plain self-attention output by its weight. The token indices for the
current step arrive through the UNet's `cross_attention_kwargs` as `share=Share(weights, indices)`,
with `indices` keyed by the number of tokens of a resolution, so each self-attention picks its own.

With character regions (`Share.regions`, `Share.rows`), a forward pre-hook on every transformer block
computes the block's maps from its input, as `CrossAttention.region_log_maps` does (norm2, then the
block's cross-attention to the region tokens), and hands them to the self-attention as
`Share.log_maps`: reference row k + j's keys get the logit bias log M_j(q).
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from core.diffusion.consistency import REGION_EPS, REGION_FLOOR

_HOOKED: weakref.WeakSet[BasicTransformerBlock] = weakref.WeakSet()
"""Blocks that already have the regional pre-hook (`install` may run twice on one UNet)."""


class Share(NamedTuple):
    """What the readers' self-attention also reads in one UNet call."""

    weights: torch.Tensor
    """(k, 1, 1) in the model's dtype: each reader's strength."""
    indices: dict[int, torch.Tensor]
    """{tokens of a resolution: int64 indices (k * m,) into the batch flattened to tokens}."""
    regions: torch.Tensor | None = None
    """(k, L, r) float32 0/1: the prompt tokens naming reference j's character, per reader."""
    rows: torch.Tensor | None = None
    """(k,) int64: the batch row whose prompt each reader's maps are computed with."""
    log_maps: torch.Tensor | None = None
    """(k, n, r): log M of this block (set by the block's pre-hook, not by callers)."""


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of projected q (b, n, c) over k, v (b, m, c), heads merged, before to_out."""
    b, n, c = q.shape
    d = c // attn.heads
    q4 = q.view(b, n, attn.heads, d).transpose(1, 2)
    k4 = k.view(b, k.shape[1], attn.heads, d).transpose(1, 2)
    v4 = v.view(b, v.shape[1], attn.heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q4, k4, v4, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, n, c).to(q.dtype)


def _attend_biased(
    attn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    log_maps: torch.Tensor,
    tokens: int,
) -> torch.Tensor:
    """`_attend` of q (k, n, c) over k, v (k, n + m, c) (own tokens, then those `index` names) with the
    logit bias `log_maps` (k, n, r) on the keys of reference rows k..k+r-1: r extra dimensions per
    head (the query carries the bias, the key a one-hot of its reference row), so no (n x keys) bias."""
    readers, n, c = q.shape
    keys, refs, heads = k.shape[1], log_maps.shape[2], attn.heads
    d = c // heads
    extra = index.shape[0] // readers
    row_of = (index // tokens).view(readers, extra, 1)
    first = torch.arange(readers, readers + refs, device=index.device).view(1, 1, refs)
    hot = torch.cat((k.new_zeros(readers, keys - extra, refs), (row_of == first).to(k.dtype)), 1)
    scale = d**-0.5
    q_aug = torch.cat(
        (
            (q * scale).view(readers, n, heads, d),
            log_maps.to(q.dtype).view(readers, n, 1, refs).expand(readers, n, heads, refs),
        ),
        -1,
    ).transpose(1, 2)
    k_aug = torch.cat(
        (
            k.view(readers, keys, heads, d),
            hot.view(readers, keys, 1, refs).expand(readers, keys, heads, refs),
        ),
        -1,
    ).transpose(1, 2)
    v4 = v.view(readers, keys, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q_aug, k_aug, v4, dropout_p=0.0, is_causal=False, scale=1.0)
    return out.transpose(1, 2).reshape(readers, n, c).to(q.dtype)


def region_log_maps(
    attn: Attention, x: torch.Tensor, context: torch.Tensor, regions: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """log M (k, n, r) of the readers' tokens `x` (k, n, c) (the block's norm2 of its input) by the
    cross-attention `attn` to the tokens `regions` (k, L, r) names in the prompts `context[rows]`:
    `core.diffusion.unet.CrossAttention.region_log_maps`, the same steps."""
    readers, length, _ = regions.shape
    heads = attn.heads
    q = attn.to_q(x)
    keys = attn.to_k(context.index_select(0, rows))
    n, c = q.shape[1], q.shape[2]
    d = c // heads
    q4 = q.view(readers, n, heads, d).transpose(1, 2)
    k4 = keys.view(readers, length, heads, d).transpose(1, 2)
    probs = torch.softmax((q4 @ k4.transpose(-1, -2) * d**-0.5).float(), -1)  # (k, h, n, L)
    mass = probs.mean(1) @ regions.float()  # (k, n, r)
    low = mass.amin(1, keepdim=True)
    high = mass.amax(1, keepdim=True)
    has = (regions.amax(1, keepdim=True) > 0).float()
    scaled = (mass - low) / (high - low + REGION_EPS) * has
    rival = scaled * scaled / (scaled.sum(-1, keepdim=True) + REGION_EPS)
    share = rival / (rival.amax(1, keepdim=True) + REGION_EPS)
    maps = (REGION_FLOOR + (1.0 - REGION_FLOOR) * share) * has + (1.0 - has)
    return torch.log(maps)


def _with_region_maps(
    block: BasicTransformerBlock, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook of a transformer block: with regions in its `share`, add the block's maps."""
    extra = kwargs.get("cross_attention_kwargs") or {}
    share = extra.get("share")
    if share is None or share.regions is None:
        return None
    x = args[0] if args else kwargs["hidden_states"]
    readers = share.weights.shape[0]
    maps = region_log_maps(
        block.attn2, block.norm2(x[:readers]), kwargs["encoder_hidden_states"], share.regions, share.rows
    )
    extra = {**extra, "share": share._replace(log_maps=maps)}
    return args, {**kwargs, "cross_attention_kwargs": extra}


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
        weights = share.weights
        b, n, c = hidden_states.shape
        readers = weights.shape[0]
        index = share.indices[n]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        plain = _attend(attn, q, k, v)
        extra = index.shape[0] // readers
        k_more = k.reshape(b * n, c).index_select(0, index).reshape(readers, extra, c)
        v_more = v.reshape(b * n, c).index_select(0, index).reshape(readers, extra, c)
        k_all = torch.cat((k[:readers], k_more), 1)
        v_all = torch.cat((v[:readers], v_more), 1)
        own = plain[:readers]
        if share.log_maps is None:
            wide = _attend(attn, q[:readers], k_all, v_all)
        else:
            wide = _attend_biased(attn, q[:readers], k_all, v_all, index, share.log_maps, n)
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
    """Give every transformer block of the UNet the shared self-attention, the plain cross-attention
    and the pre-hook that computes its regional maps when a call has regions."""
    # diffusers types `set_processor` with a closed union of its own processors
    self_attention: Any = SharedSelfAttnProcessor()
    cross_attention: Any = CrossAttnProcessor()
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock) and module not in _HOOKED:
            module.register_forward_pre_hook(_with_region_maps, with_kwargs=True)
            _HOOKED.add(module)
        if isinstance(module, Attention):
            if name.endswith("attn1"):
                module.set_processor(self_attention)
            elif name.endswith("attn2"):
                module.set_processor(cross_attention)
