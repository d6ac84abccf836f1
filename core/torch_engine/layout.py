"""The official parameter layout and where each tensor goes in the diffusers / transformers modules.

Pure Python (no torch, no MindSpore): `official_layout(config)` lists every official parameter, in the
order the MindSpore model defines them, with its shape and its place in the PyTorch modules:

- `model.diffusion_model.` -> `unet` (diffusers `UNet2DConditionModel`),
- `first_stage_model.` -> `vae` (diffusers `AutoencoderKL`),
- `cond_stage_model.transformer.` -> `text_encoder` (transformers `CLIPTextModel`; keys as transformers 5
  names them, without the `text_model.` level that transformers 4 has: `fill_modules` adds it there).

Three kinds of move: `copy` (same values; norms' gamma/beta become weight/bias), `linear` (the VAE
attention's 1x1 convolutions become linear layers: the two trailing unit axes dropped) and `split3`
(the text encoder's fused `in_proj`, q, k and v stacked in that order, becomes `q_proj`, `k_proj`,
`v_proj`). Two official tensors never run (the resampler of the last encoder level and of the first
decoder level): they are listed with no target, checked, and not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.diffusion.config import WukongConfig

UNET, VAE, TEXT = "unet", "vae", "text_encoder"
PARTS = (UNET, VAE, TEXT)
PREFIXES = {UNET: "model.diffusion_model.", VAE: "first_stage_model.", TEXT: "cond_stage_model.transformer."}
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Entry:
    """One official parameter: its name and shape, and the PyTorch parameter(s) it fills."""

    name: str
    shape: Shape
    part: str | None
    """unet, vae or text_encoder; None for the two resamplers that never run."""
    targets: tuple[str, ...] = ()
    """State-dict keys inside `part` (three for `split3`)."""
    kind: str = "copy"

    def target_shapes(self) -> tuple[Shape, ...]:
        """The shape each target has in the PyTorch module."""
        if self.kind == "linear":
            return (self.shape[:2],)
        if self.kind == "split3":
            third = (self.shape[0] // 3, *self.shape[1:])
            return (third, third, third)
        return (self.shape,)


@dataclass
class _Builder:
    part: str
    entries: list[Entry] = field(default_factory=list)

    def add(self, name: str, shape: Shape, target: str | tuple[str, ...] | None, kind: str = "copy") -> None:
        targets = (target,) if isinstance(target, str) else (target or ())
        part = self.part if targets else None
        self.entries.append(Entry(PREFIXES[self.part] + name, shape, part, targets, kind))

    def conv(self, src: str, dst: str | None, c_in: int, c_out: int, k: int, kind: str = "copy") -> None:
        w_shape = (c_out, c_in, k, k)
        self.add(f"{src}.weight", w_shape, None if dst is None else f"{dst}.weight", kind)
        self.add(f"{src}.bias", (c_out,), None if dst is None else f"{dst}.bias")

    def dense(self, src: str, dst: str, c_in: int, c_out: int, bias: bool = True) -> None:
        self.add(f"{src}.weight", (c_out, c_in), f"{dst}.weight")
        if bias:
            self.add(f"{src}.bias", (c_out,), f"{dst}.bias")

    def norm(self, src: str, dst: str, c: int) -> None:
        self.add(f"{src}.gamma", (c,), f"{dst}.weight")
        self.add(f"{src}.beta", (c,), f"{dst}.bias")


def _unet(cfg: WukongConfig) -> list[Entry]:
    b = _Builder(UNET)
    ch0, emb = cfg.unet_channels, 4 * cfg.unet_channels
    levels = len(cfg.unet_channel_mult)

    def resblock(src: str, dst: str, c_in: int, c_out: int) -> None:
        b.norm(f"{src}.in_layers_norm", f"{dst}.norm1", c_in)
        b.conv(f"{src}.in_layers_conv.conv", f"{dst}.conv1", c_in, c_out, 3)
        b.dense(f"{src}.emb_layers.1", f"{dst}.time_emb_proj", emb, c_out)
        b.norm(f"{src}.out_layers_norm", f"{dst}.norm2", c_out)
        b.conv(f"{src}.out_layers_conv.conv", f"{dst}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            b.conv(f"{src}.skip_connection.conv", f"{dst}.conv_shortcut", c_in, c_out, 1)

    def transformer(src: str, dst: str, c: int) -> None:
        b.norm(f"{src}.norm", f"{dst}.norm", c)
        b.conv(f"{src}.proj_in", f"{dst}.proj_in", c, c, 1)
        for d in range(cfg.unet_transformer_depth):
            s, t = f"{src}.transformer_blocks.{d}", f"{dst}.transformer_blocks.{d}"
            for attn, ctx in (("attn1", c), ("ff", 0), ("attn2", cfg.context_dim)):
                if attn == "ff":
                    b.dense(f"{s}.ff.net.0.proj", f"{t}.ff.net.0.proj", c, 8 * c)
                    b.dense(f"{s}.ff.net.2", f"{t}.ff.net.2", 4 * c, c)
                    continue
                b.dense(f"{s}.{attn}.to_q", f"{t}.{attn}.to_q", c, c, bias=False)
                b.dense(f"{s}.{attn}.to_k", f"{t}.{attn}.to_k", ctx, c, bias=False)
                b.dense(f"{s}.{attn}.to_v", f"{t}.{attn}.to_v", ctx, c, bias=False)
                b.dense(f"{s}.{attn}.to_out.0", f"{t}.{attn}.to_out.0", c, c)
            for i in (1, 2, 3):
                b.norm(f"{s}.norm{i}", f"{t}.norm{i}", c)
        b.conv(f"{src}.proj_out", f"{dst}.proj_out", c, c, 1)

    b.dense("time_embed.0", "time_embedding.linear_1", ch0, emb)
    b.dense("time_embed.2", "time_embedding.linear_2", emb, emb)
    b.conv("input_blocks.0.0.conv", "conv_in", cfg.latent_channels, ch0, 3)
    skips, ch, index = [ch0], ch0, 1
    for level, mult in enumerate(cfg.unet_channel_mult):
        attention = 2**level in cfg.unet_attention_rates
        for j in range(cfg.unet_res_blocks):
            resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", ch, ch0 * mult)
            ch = ch0 * mult
            if attention:
                transformer(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", ch)
            skips.append(ch)
            index += 1
        if level != levels - 1:
            b.conv(f"input_blocks.{index}.0.op.conv", f"down_blocks.{level}.downsamplers.0.conv", ch, ch, 3)
            skips.append(ch)
            index += 1
    resblock("middle_block.0", "mid_block.resnets.0", ch, ch)
    transformer("middle_block.1", "mid_block.attentions.0", ch)
    resblock("middle_block.2", "mid_block.resnets.1", ch, ch)
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        mult = cfg.unet_channel_mult[level]
        attention = 2**level in cfg.unet_attention_rates
        for j in range(cfg.unet_res_blocks + 1):
            src, dst = f"output_blocks.{index}", f"up_blocks.{up}"
            resblock(f"{src}.0", f"{dst}.resnets.{j}", ch + skips.pop(), ch0 * mult)
            ch = ch0 * mult
            layer = 1
            if attention:
                transformer(f"{src}.1", f"{dst}.attentions.{j}", ch)
                layer = 2
            if level and j == cfg.unet_res_blocks:
                b.conv(f"{src}.{layer}.conv.conv", f"{dst}.upsamplers.0.conv", ch, ch, 3)
            index += 1
    b.norm("out.0", "conv_norm_out", ch)
    b.conv("out.2.conv", "conv_out", ch, cfg.latent_channels, 3)
    return b.entries


def _vae(cfg: WukongConfig) -> list[Entry]:
    b = _Builder(VAE)
    ch, mult, z = cfg.vae_channels, cfg.vae_channel_mult, cfg.latent_channels
    levels = len(mult)

    def resnet(src: str, dst: str, c_in: int, c_out: int) -> None:
        b.norm(f"{src}.norm1", f"{dst}.norm1", c_in)
        b.conv(f"{src}.conv1", f"{dst}.conv1", c_in, c_out, 3)
        b.norm(f"{src}.norm2", f"{dst}.norm2", c_out)
        b.conv(f"{src}.conv2", f"{dst}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            b.conv(f"{src}.nin_shortcut", f"{dst}.conv_shortcut", c_in, c_out, 1)

    def mid(src: str, dst: str, c: int) -> None:
        resnet(f"{src}.block_1", f"{dst}.resnets.0", c, c)
        b.norm(f"{src}.attn_1.norm", f"{dst}.attentions.0.group_norm", c)
        for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            b.conv(f"{src}.attn_1.{ours}", f"{dst}.attentions.0.{theirs}", c, c, 1, kind="linear")
        resnet(f"{src}.block_2", f"{dst}.resnets.1", c, c)

    b.conv("encoder.conv_in", "encoder.conv_in", 3, ch, 3)
    c_in = ch
    for i, m in enumerate(mult):
        for j in range(cfg.vae_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c_in, ch * m)
            c_in = ch * m
        used = i != levels - 1
        dst = f"encoder.down_blocks.{i}.downsamplers.0.conv" if used else None
        b.conv(f"encoder.down.{i}.downsample.conv", dst, c_in, c_in, 3)
    mid("encoder.mid", "encoder.mid_block", c_in)
    b.norm("encoder.norm_out", "encoder.conv_norm_out", c_in)
    b.conv("encoder.conv_out", "encoder.conv_out", c_in, 2 * z, 3)

    top = ch * mult[-1]
    b.conv("decoder.conv_in", "decoder.conv_in", z, top, 3)
    mid("decoder.mid", "decoder.mid_block", top)
    for i, m in enumerate(mult):  # official order: up.0 (full resolution) first
        up = levels - 1 - i  # diffusers counts from the lowest resolution
        c_in = ch * mult[i + 1] if i + 1 < levels else top
        for j in range(cfg.vae_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", c_in, ch * m)
            c_in = ch * m
        dst = f"decoder.up_blocks.{up}.upsamplers.0.conv" if i != 0 else None
        b.conv(f"decoder.up.{i}.upsample.conv", dst, c_in, c_in, 3)
    b.norm("decoder.norm_out", "decoder.conv_norm_out", ch * mult[0])
    b.conv("decoder.conv_out", "decoder.conv_out", ch * mult[0], 3, 3)
    b.conv("quant_conv", "quant_conv", 2 * z, 2 * z, 1)
    b.conv("post_quant_conv", "post_quant_conv", z, z, 1)
    return b.entries


def _text(cfg: WukongConfig) -> list[Entry]:
    b = _Builder(TEXT)
    w = cfg.text_width
    b.add("embedding_table", (cfg.vocab_size, w), "embeddings.token_embedding.weight")
    b.add("positional_embedding", (cfg.context_length, w), "embeddings.position_embedding.weight")
    b.norm("ln_final", "final_layer_norm", w)
    for i in range(cfg.text_layers):
        src, dst = f"transformer_layer.resblocks.{i}", f"encoder.layers.{i}"
        for what, shape in (("weight", (3 * w, w)), ("bias", (3 * w,))):
            targets = tuple(f"{dst}.self_attn.{p}_proj.{what}" for p in "qkv")
            b.add(f"{src}.attn.attn.in_proj.{what}", shape, targets, "split3")
        b.dense(f"{src}.attn.attn.out_proj", f"{dst}.self_attn.out_proj", w, w)
        b.norm(f"{src}.ln_1", f"{dst}.layer_norm1", w)
        b.dense(f"{src}.c_fc", f"{dst}.mlp.fc1", w, 4 * w)
        b.dense(f"{src}.c_proj", f"{dst}.mlp.fc2", 4 * w, w)
        b.norm(f"{src}.ln_2", f"{dst}.layer_norm2", w)
    return b.entries


def official_layout(config: WukongConfig | None = None) -> list[Entry]:
    """Every official parameter of `config` (UNet, VAE, text encoder), in the MindSpore model's order."""
    cfg = config or WukongConfig()
    return [*_unet(cfg), *_vae(cfg), *_text(cfg)]


def official_shapes(config: WukongConfig | None = None) -> dict[str, Shape]:
    """Official name -> shape, without building any model."""
    return {e.name: e.shape for e in official_layout(config)}


def torch_shapes(config: WukongConfig | None = None) -> dict[str, dict[str, Shape]]:
    """Per part, every PyTorch state-dict key the official parameters fill and its shape."""
    out: dict[str, dict[str, Shape]] = {part: {} for part in PARTS}
    for entry in official_layout(config):
        if entry.part is not None:
            out[entry.part].update(zip(entry.targets, entry.target_shapes(), strict=True))
    return out


@dataclass(frozen=True)
class LayoutReport:
    """How a file's names and shapes match a layout: what is missing, of the wrong shape, or unknown."""

    path: str
    expected: int
    found: int
    missing: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, Shape, Shape], ...] = ()
    """(name, expected shape, found shape)."""
    extra: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched

    @property
    def matched(self) -> int:
        return self.expected - len(self.missing) - len(self.mismatched)

    def problem(self) -> str:
        """One sentence naming the first problems, empty when ok."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing (first: {', '.join(self.missing[:_SHOWN])})")
        if self.mismatched:
            shown = "; ".join(f"{n} is {f}, expected {e}" for n, e, f in self.mismatched[:_SHOWN])
            parts.append(f"{len(self.mismatched)} of the wrong shape ({shown})")
        if not parts:
            return ""
        name = self.path.rsplit("/", 1)[-1]
        return f"The checkpoint {name} does not match the model: " + ", ".join(parts) + "."


_SHOWN = 5


def compare(path: str, expected: dict[str, Shape], found: dict[str, Shape]) -> LayoutReport:
    """Names and shapes of a file against what a layout expects."""
    return LayoutReport(
        path=path,
        expected=len(expected),
        found=len(found),
        missing=tuple(n for n in expected if n not in found),
        mismatched=tuple((n, s, found[n]) for n, s in expected.items() if n in found and found[n] != s),
        extra=tuple(n for n in found if n not in expected),
    )
