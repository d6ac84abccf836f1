"""The three networks as diffusers / transformers modules, configured to compute what Wukong computes.

`UNet2DConditionModel`, `AutoencoderKL` and `CLIPTextModel` have Wukong's architecture; two details
differ from their defaults and are set here: the UNet's feed-forward gate is GELU's tanh approximation
(MindSpore's `GeLU`, which the official model was trained with; diffusers' `GEGLU` uses the exact GELU),
and the timestep embedding is a table computed in numpy exactly as the MindSpore engine computes it
(cos first, then sin), so both engines feed the UNet bit-identical embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from core.diffusion.config import WukongConfig
from core.diffusion.samplers import NUM_TRAIN_STEPS

TEXT_LAYER_NORM_EPS = 1e-7
"""MindSpore's LayerNorm default, which the official text encoder was trained with."""


def unet_config(cfg: WukongConfig) -> dict[str, Any]:
    """diffusers `UNet2DConditionModel` arguments for Wukong's UNet."""
    levels = range(len(cfg.unet_channel_mult))
    attention = [2**level in cfg.unet_attention_rates for level in levels]
    return {
        "sample_size": cfg.image_size // cfg.latent_scale,
        "in_channels": cfg.latent_channels,
        "out_channels": cfg.latent_channels,
        "block_out_channels": [cfg.unet_channels * m for m in cfg.unet_channel_mult],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": cfg.unet_res_blocks,
        "transformer_layers_per_block": cfg.unet_transformer_depth,
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": cfg.unet_heads,  # diffusers' historical name: the number of heads
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }


def vae_config(cfg: WukongConfig) -> dict[str, Any]:
    """diffusers `AutoencoderKL` arguments for Wukong's first stage."""
    levels = len(cfg.vae_channel_mult)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.vae_channels * m for m in cfg.vae_channel_mult],
        "layers_per_block": cfg.vae_res_blocks,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.image_size,
        "scaling_factor": cfg.scale_factor,
        "act_fn": "silu",
    }


def text_config(cfg: WukongConfig) -> dict[str, Any]:
    """transformers `CLIPTextConfig` arguments for Wukong's text encoder."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.text_width,
        "intermediate_size": 4 * cfg.text_width,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        "max_position_embeddings": cfg.context_length,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": TEXT_LAYER_NORM_EPS,
        "projection_dim": cfg.text_width,
    }


def timestep_table(dim: int, max_period: float = 10000.0) -> np.ndarray:
    """Sinusoidal embeddings of every training timestep (1000, dim) float32, cos first then sin,
    computed in float32 numpy as the MindSpore engine computes them."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half)
    args = np.arange(NUM_TRAIN_STEPS, dtype=np.float32)[:, None] * freqs[None, :]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros_like(emb[:, :1])], axis=-1)
    return emb.astype(np.float32)


class TimestepTable(nn.Module):
    """Replaces diffusers' `Timesteps`: integer timesteps (n,) -> their rows of `timestep_table`."""

    table: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.from_numpy(timestep_table(dim)), persistent=False)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.table[timesteps.long()]


class TanhGEGLU(nn.Module):
    """value * gelu_tanh(gate), both halves of one projection (first half value, second half gate)."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        value, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return value * F.gelu(gate, approximate="tanh")


@dataclass
class TorchModules:
    """The three networks, on one device in one dtype."""

    unet: Any  # UNet2DConditionModel (diffusers' stubs are partial: typed loosely)
    vae: Any  # AutoencoderKL
    text_encoder: Any  # CLIPTextModel

    def part(self, name: str) -> Any:
        return getattr(self, name)


def build_modules(cfg: WukongConfig) -> TorchModules:
    """The networks with no weights yet (on the meta device): fill them with `fill_modules`."""
    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**unet_config(cfg))
        vae = AutoencoderKL(**vae_config(cfg))
        text = CLIPTextModel(CLIPTextConfig(**text_config(cfg)))
    for block in unet.modules():
        ff = getattr(block, "ff", None)
        if ff is not None and hasattr(ff, "net"):
            ff.net[0] = TanhGEGLU(ff.net[0].proj)
    return TorchModules(unet=unet, vae=vae, text_encoder=text)


def _own_keys(state: dict[str, torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
    """The state under the module's own key names: CLIPTextModel nests everything under `text_model.`
    in transformers 4 and not in transformers 5; the layout and converted files may use either."""
    out = {}
    for key, tensor in state.items():
        bare = key.removeprefix(TEXT_PREFIX)
        out[bare if bare in keys else TEXT_PREFIX + bare if TEXT_PREFIX + bare in keys else key] = tensor
    return out


TEXT_PREFIX = "text_model."


def fill_modules(
    modules: TorchModules, states: dict[str, dict[str, torch.Tensor]], cfg: WukongConfig
) -> TorchModules:
    """Give every parameter its tensor (strict: every key present, none extra) and make the buffers."""
    for name, state in states.items():
        part = modules.part(name)
        part.load_state_dict(_own_keys(state, set(part.state_dict())), strict=True, assign=True)
    modules.unet.time_proj = TimestepTable(cfg.unet_channels)
    text = modules.text_encoder
    embeddings = getattr(text, "text_model", text).embeddings
    positions = torch.arange(cfg.context_length).expand((1, -1))
    embeddings.register_buffer("position_ids", positions, persistent=False)
    for name in ("unet", "vae", "text_encoder"):
        part = modules.part(name)
        left = [n for n, t in [*part.named_parameters(), *part.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{name} has tensors without values: {', '.join(left[:3])}")
        part.eval().requires_grad_(False)
    processor = AttnProcessor2_0()  # PyTorch's scaled_dot_product_attention (flash / memory-efficient)
    modules.unet.set_attn_processor(processor)
    modules.vae.set_attn_processor(processor)
    return modules
