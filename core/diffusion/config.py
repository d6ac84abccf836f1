"""The Wukong-Huahua model configuration: official sizes by default, `tiny()` for tests and dry runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WukongConfig:
    """Sizes of the UNet, the AutoencoderKL and the text encoder (defaults: the official checkpoint)."""

    unet_channels: int = 320
    unet_channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    unet_res_blocks: int = 2
    unet_attention_rates: tuple[int, ...] = (4, 2, 1)
    unet_heads: int = 8
    unet_transformer_depth: int = 1
    context_dim: int = 768
    latent_channels: int = 4
    vae_channels: int = 128
    vae_channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_res_blocks: int = 2
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    vocab_size: int = 49408
    context_length: int = 77
    norm_groups: int = 32
    scale_factor: float = 0.18215
    image_size: int = 512
    """Default image side in pixels when a caller gives no height or width."""

    def __post_init__(self) -> None:
        problems = []
        if self.context_dim != self.text_width:
            problems.append("context_dim must equal text_width")
        if self.text_width % self.text_heads:
            problems.append("text_width must be divisible by text_heads")
        for mult in self.unet_channel_mult:
            if (self.unet_channels * mult) % self.unet_heads:
                problems.append("every UNet level width must be divisible by unet_heads")
        widths = [self.unet_channels * m for m in self.unet_channel_mult]
        widths += [self.vae_channels * m for m in self.vae_channel_mult]
        if any(w % self.norm_groups for w in widths):
            problems.append(f"every UNet and VAE width must be divisible by norm_groups={self.norm_groups}")
        if not self.unet_channel_mult or not self.vae_channel_mult:
            problems.append("channel multipliers must not be empty")
        if problems:
            raise ValueError("invalid WukongConfig: " + "; ".join(problems))

    @classmethod
    def tiny(cls) -> WukongConfig:
        """A very small model with the official structure (same names, 8x latent scale) for tests."""
        return cls(
            unet_channels=32,
            unet_channel_mult=(1, 2),
            unet_res_blocks=1,
            unet_attention_rates=(1,),
            unet_heads=2,
            context_dim=32,
            vae_channels=32,
            vae_channel_mult=(1, 1, 2, 2),
            vae_res_blocks=1,
            text_width=32,
            text_layers=2,
            text_heads=2,
            image_size=64,
        )

    @property
    def latent_scale(self) -> int:
        """Image pixels per latent pixel along one side (8 for the official VAE)."""
        return int(2 ** (len(self.vae_channel_mult) - 1))

    @property
    def unet_multiple(self) -> int:
        """Latent sides must be multiples of this for the UNet skips to line up."""
        return int(2 ** (len(self.unet_channel_mult) - 1))

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this (64 for the official model)."""
        return self.latent_scale * self.unet_multiple
