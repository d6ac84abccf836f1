"""TorchWukongPipeline: the conformance API of `core.diffusion.WukongPipeline`, on PyTorch.

Same methods, same shapes, same semantics and errors: numpy in, numpy out (float32 latents and images,
int64 token ids). The samplers are the shared numpy ones (`core.diffusion.samplers`) and the initial
noise is drawn with numpy, so a seed gives the same picture on every engine. The networks are
diffusers' `UNet2DConditionModel` and `AutoencoderKL` and transformers' `CLIPTextModel`, filled from the
official checkpoint through `core.torch_engine.layout`. Reference attention and shared panel attention
(`sample(..., consistency=...)`) run through `core.torch_engine.sharing`, with the token indices and the
reference noise drawn by the shared numpy helpers of `core.diffusion.consistency`, so a seed gives the
same picture on both engines here too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.diffusion.config import WukongConfig
from core.diffusion.consistency import check_regions
from core.diffusion.guided import GuidedSampling, float_array
from core.diffusion.samplers import NoiseSchedule
from core.errors import CheckpointError, EngineUnavailable, InvalidOption
from core.tokenizer import WordPieceTokenizer
from core.torch_engine import files, sharing
from core.torch_engine.layout import PARTS, Entry, compare, official_layout, official_shapes, torch_shapes
from core.torch_engine.models import TorchModules, build_modules, fill_modules
from core.torch_engine.pipeline_config import config_from

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("float32", "float16", "bfloat16")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DECODE_BATCH = {"cpu": 1, "mps": 1, "cuda": 8}
"""Images the VAE decodes per call: one at a time on the CPU (the peak does not grow with the batch)."""


def resolve_device(device: str) -> str:
    """`auto`: cuda, else mps, else cpu; `cuda:N` picks one GPU. CPU/GPU (MindSpore's names) are accepted."""
    name = {"CPU": "cpu", "GPU": "cuda"}.get(device, device)
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    base = name.split(":", 1)[0]
    if base not in DEVICES or (":" in name and (base != "cuda" or not name.split(":", 1)[1].isdigit())):
        raise InvalidOption(
            f"Unknown device {device!r} for the torch engine; choose one of {', '.join(DEVICES)}."
        )
    if base == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailable(
            "HUAHUA_DEVICE=cuda, but PyTorch sees no CUDA GPU here (or is a CPU-only build)."
        )
    if base == "mps" and not torch.backends.mps.is_available():
        raise EngineUnavailable("HUAHUA_DEVICE=mps, but PyTorch's Apple GPU backend is not available here.")
    return name


def resolve_dtype(device: str, dtype: str) -> str:
    """`auto`: float16 on a GPU (cuda, mps), float32 on the CPU."""
    if dtype == "auto":
        return "float32" if device == "cpu" else "float16"
    if dtype not in DTYPES:
        raise InvalidOption(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return dtype


def _moved(array: np.ndarray, entry: Entry) -> tuple[np.ndarray, ...]:
    """The official array in the shape(s) of its PyTorch target(s)."""
    if entry.kind == "linear":
        return (array.reshape(entry.shape[:2]),)
    if entry.kind == "split3":
        return tuple(np.split(array, 3, axis=0))
    return (array,)


def random_official(config: WukongConfig, seed: int) -> dict[str, np.ndarray]:
    """The official arrays that `core.diffusion.checkpoint.randomize` draws for `seed`, in its order:
    the same seed gives the same weights on both engines.

    Weights ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02), norms scale 1 shift 0, biases 0."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for entry in official_layout(config):
        name, shape = entry.name, entry.shape
        if name.endswith(".gamma"):
            array = np.ones(shape, np.float32)
        elif name.endswith((".beta", ".bias")):
            array = np.zeros(shape, np.float32)
        elif name.endswith(("embedding_table", "positional_embedding")):
            array = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            array = rng.standard_normal(shape, dtype=np.float32) * np.float32(fan_in**-0.5)
        out[name] = array
    return out


def _states(
    take: Callable[[str], np.ndarray], config: WukongConfig, dtype: torch.dtype
) -> dict[str, dict[str, torch.Tensor]]:
    """Every PyTorch tensor, filled from official arrays by the layout (each array read once)."""
    states: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for entry in official_layout(config):
        if entry.part is None:
            continue
        for key, array in zip(entry.targets, _moved(take(entry.name), entry), strict=True):
            states[entry.part][key] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    return states


class TorchWukongPipeline(GuidedSampling):
    """The Wukong-Huahua text-to-image model on PyTorch: weights, tokenizer and noise schedule together."""

    def __init__(
        self,
        modules: TorchModules,
        config: WukongConfig,
        tokenizer: WordPieceTokenizer | None,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        random_weights: bool = False,
        compile: bool = False,
        channels_last: bool | None = None,
    ) -> None:
        self.modules = modules
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.random_weights = random_weights
        self.schedule = NoiseSchedule.official()
        self._device = torch.device(device)
        self._dtype = _TORCH_DTYPES[dtype]
        # cuDNN's fastest convolutions read NHWC; `channels_last` forces it either way (tests, other GPUs)
        self._channels_last = self._device.type == "cuda" if channels_last is None else channels_last
        if self._channels_last:
            modules.unet.to(memory_format=torch.channels_last)
            modules.vae.to(memory_format=torch.channels_last)
        sharing.install(modules.unet)
        self._unet: Callable[..., Any] = modules.unet
        self.compiled = compile
        if compile:
            self._unet = torch.compile(modules.unet)
        self.decode_batch = DECODE_BATCH.get(self._device.type, 1)

    # construction

    @classmethod
    def load(
        cls,
        ckpt_path: str | Path,
        vocab_path: str | Path | None,
        config: WukongConfig | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        compile: bool = False,
        channels_last: bool | None = None,
    ) -> TorchWukongPipeline:
        """The model with weights from the official `.ckpt` / `.safetensors`, or from a folder that
        `huahua model convert --to torch` wrote (then the mapping is skipped)."""
        path = Path(ckpt_path)
        device = resolve_device(device)
        dtype = resolve_dtype(device, dtype)
        tokenizer = None if vocab_path is None else WordPieceTokenizer.from_file(vocab_path)
        if files.is_converted(path):
            config, states = cls._converted_states(path, config, _TORCH_DTYPES[dtype])
        else:
            config = config or WukongConfig()
            states = cls._official_states(path, config, _TORCH_DTYPES[dtype])
        pipe = cls._built(
            states, config, tokenizer, device, dtype, compile=compile, channels_last=channels_last
        )
        logger.info("loaded %s on %s (%s) with PyTorch %s", path.name, device, dtype, torch.__version__)
        return pipe

    @classmethod
    def random(
        cls,
        config: WukongConfig | None = None,
        vocab_path: str | Path | WordPieceTokenizer | None = None,
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        compile: bool = False,
        channels_last: bool | None = None,
    ) -> TorchWukongPipeline:
        """The same model with random weights drawn from numpy: the same `seed` gives the same weights
        as `WukongPipeline.random` (so the same pictures)."""
        config = config or WukongConfig()
        device = resolve_device(device)
        dtype = resolve_dtype(device, dtype)
        if vocab_path is None or isinstance(vocab_path, WordPieceTokenizer):
            tokenizer = vocab_path
        else:
            tokenizer = WordPieceTokenizer.from_file(vocab_path)
        arrays = random_official(config, seed)
        states = _states(arrays.__getitem__, config, _TORCH_DTYPES[dtype])
        return cls._built(
            states,
            config,
            tokenizer,
            device,
            dtype,
            random_weights=True,
            compile=compile,
            channels_last=channels_last,
        )

    @staticmethod
    def _official_states(
        path: Path, config: WukongConfig, dtype: torch.dtype
    ) -> dict[str, dict[str, torch.Tensor]]:
        source = files.open_official(path)
        try:
            report = compare(str(path), official_shapes(config), source.shapes())
            if not report.ok:
                raise CheckpointError(report.problem())
            if report.extra:
                logger.info(
                    "ignoring %d unknown checkpoint entries (e.g. %s)",
                    len(report.extra),
                    ", ".join(report.extra[:3]),
                )
            return _states(lambda name: files.take(source, name), config, dtype)
        finally:
            source.close()

    @staticmethod
    def _converted_states(
        folder: Path, config: WukongConfig | None, dtype: torch.dtype
    ) -> tuple[WukongConfig, dict[str, dict[str, torch.Tensor]]]:
        from safetensors.torch import load_file

        stored = config_from(files.read_marker(folder)["config"])
        if config is not None and config != stored:
            raise CheckpointError(f"The converted model in {folder.name} was made for another configuration.")
        expected = torch_shapes(stored)
        found = files.converted_shapes(folder)
        states: dict[str, dict[str, torch.Tensor]] = {}
        for part in PARTS:
            report = compare(str(folder / files.WEIGHT_FILES[part]), expected[part], found[part])
            if not report.ok:
                raise CheckpointError(report.problem())
            state = load_file(str(folder / files.WEIGHT_FILES[part]))
            bare = {files.bare_key(k): v for k, v in state.items()}
            states[part] = {k: v.to(dtype) for k, v in bare.items() if k in expected[part]}
        return stored, states

    @classmethod
    def _built(
        cls,
        states: dict[str, dict[str, torch.Tensor]],
        config: WukongConfig,
        tokenizer: WordPieceTokenizer | None,
        device: str,
        dtype: str,
        **options: Any,
    ) -> TorchWukongPipeline:
        """The pipeline of modules filled from `states` (already in `dtype`), moved to `device`;
        `options` are the constructor's keywords (`compile`, `channels_last`, `random_weights`)."""
        modules = fill_modules(build_modules(config), states, config)
        for part in PARTS:
            modules.part(part).to(device=device)
        return cls(modules, config, tokenizer, device=device, dtype=dtype, **options)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Official parameter name -> shape."""
        return official_shapes(self.config)

    def save_converted(self, folder: str | Path, source: Path | None = None) -> Path:
        """Write the PyTorch weights (safetensors, float32) and configs: diffusers' folder layout
        (`unet/`, `vae/`, `text_encoder/`) plus `wukong.json`, which `load` reads to skip the mapping."""
        if self.dtype != "float32":
            raise InvalidOption("Convert from a float32 model, so the converted weights are exact.")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for part in PARTS:
            module = self.modules.part(part)
            module.save_pretrained(str(folder / part), safe_serialization=True)
        marker = {
            "format": 1,
            "config": asdict(self.config),
            "source": files.source_state(source) if source is not None else None,
            "note": "diffusers/transformers folders; the UNet's feed-forward gate is GELU's tanh form",
        }
        (folder / files.CONVERTED_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        return folder

    # text

    @torch.inference_mode()
    def encode_tokens(self, ids: np.ndarray) -> np.ndarray:
        """The text condition (n, context_length, text_width) float32."""
        array = np.asarray(ids)
        cfg = self.config
        if array.ndim != 2 or array.shape[1] != cfg.context_length or array.shape[0] == 0:
            raise InvalidOption(f"Token ids must have shape (n, {cfg.context_length}), not {array.shape}.")
        if not np.issubdtype(array.dtype, np.integer):
            raise InvalidOption("Token ids must be whole numbers.")
        if array.min() < 0 or array.max() >= cfg.vocab_size:
            raise InvalidOption(f"Token ids must lie in [0, {cfg.vocab_size}).")
        tokens = torch.from_numpy(array.astype(np.int64)).to(self._device)
        out = self.modules.text_encoder(input_ids=tokens).last_hidden_state
        return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    # noise prediction and sampling

    def _tensor(self, array: np.ndarray, image: bool = False) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self._device, self._dtype)
        if image and self._channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    @property
    def share_rates(self) -> tuple[int, ...]:
        """Downsampling rates that have transformers, in the order of `predict_noise`'s share indices
        (as `core.diffusion.unet.UNetModel.share_rates`: the attention rates, and the middle block's)."""
        cfg = self.config
        rates = {2**level for level in range(len(cfg.unet_channel_mult))}
        deepest = 2 ** (len(cfg.unet_channel_mult) - 1)
        return tuple(sorted({r for r in cfg.unet_attention_rates if r in rates} | {deepest}))

    @torch.inference_mode()
    def predict_noise(
        self,
        x: np.ndarray,
        t: np.ndarray,
        ctx: np.ndarray,
        *,
        share: tuple[np.ndarray, Sequence[np.ndarray]] | None = None,
        regions: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The UNet's noise estimate eps(x_t, t, ctx): (n, 4, h, w) float32.

        `share` = (weights (k,), one int32 index array per rate of `share_rates`): the first k rows'
        self-attention also reads those tokens of the batch (see `core.diffusion.consistency`).
        `regions` (with `share`) = (tokens (k, L, r) 0/1, prompt rows (k,)): reference row k + j is read
        mostly where the tokens [:, :, j] of prompt row rows[i] draw the cross-attention."""
        cfg = self.config
        x = float_array(x, "latents", 4)
        ctx = float_array(ctx, "text condition", 3)
        n, c, h, w = x.shape
        if c != cfg.latent_channels:
            raise InvalidOption(f"The latents must have {cfg.latent_channels} channels, not {c}.")
        if h % cfg.unet_multiple or w % cfg.unet_multiple:
            raise InvalidOption(f"The latent height and width must be multiples of {cfg.unet_multiple}.")
        if ctx.shape[0] != n or ctx.shape[2] != cfg.context_dim:
            raise InvalidOption(f"The text condition must have shape ({n}, L, {cfg.context_dim}).")
        steps = np.asarray(t).reshape(-1)
        if steps.shape != (n,) or not np.issubdtype(steps.dtype, np.integer):
            raise InvalidOption(f"The timesteps must be {n} whole numbers.")
        if steps.min() < 0 or steps.max() >= self.schedule.num_train_steps:
            raise InvalidOption(f"The timesteps must lie in [0, {self.schedule.num_train_steps}).")
        timesteps = torch.from_numpy(steps.astype(np.int64)).to(self._device)
        if share is None and regions is not None:
            raise InvalidOption("Character regions weight shared tokens: give them with `share`.")
        extra = {}
        if share is not None:
            extra["cross_attention_kwargs"] = {"share": self._share(share, x.shape, regions, ctx.shape[1])}
        eps = self._unet(
            self._tensor(x, image=True),
            timesteps,
            encoder_hidden_states=self._tensor(ctx),
            return_dict=False,
            **extra,
        )[0]
        return np.asarray(eps.float().cpu().numpy(), dtype=np.float32)

    def _share(
        self,
        share: tuple[np.ndarray, Sequence[np.ndarray]],
        shape: tuple[int, ...],
        regions: tuple[np.ndarray, np.ndarray] | None,
        context_length: int,
    ) -> sharing.Share:
        """Checked `share` tensors: weights (k, 1, 1) in the model's dtype, the indices by token count,
        and with `regions` the region tokens (k, L, r) float32 and their prompt rows (k,)."""
        weights, indices = share
        w = np.asarray(weights, np.float32).reshape(-1)
        n, _, h, width = shape
        rates = self.share_rates
        if not 1 <= w.size <= n or not np.isfinite(w).all():
            raise InvalidOption(f"Sharing needs 1 to {n} finite reader weights, not {w.size}.")
        if len(indices) != len(rates):
            raise InvalidOption(f"Sharing needs one token index per UNet resolution ({len(rates)}).")
        by_tokens: dict[int, torch.Tensor] = {}
        for rate, index in zip(rates, indices, strict=True):
            flat = np.asarray(index).reshape(-1)
            per_row = (h // rate) * (width // rate)
            if flat.size == 0 or flat.size % w.size or not np.issubdtype(flat.dtype, np.integer):
                raise InvalidOption("Each shared token index must hold whole numbers, as many per reader.")
            if flat.min() < 0 or flat.max() >= n * per_row:
                raise InvalidOption(f"Shared token indices must lie in [0, {n * per_row}).")
            by_tokens[per_row] = torch.from_numpy(flat.astype(np.int64)).to(self._device)
        if regions is None:
            return sharing.Share(self._tensor(w.reshape(-1, 1, 1)), by_tokens)
        tokens, rows = check_regions(regions, w.size, n, context_length)
        return sharing.Share(
            self._tensor(w.reshape(-1, 1, 1)),
            by_tokens,
            torch.from_numpy(tokens).to(self._device),
            torch.from_numpy(rows.astype(np.int64)).to(self._device),
        )

    # images

    @torch.inference_mode()
    def decode_latents(self, z: np.ndarray) -> np.ndarray:
        """Latents (n, 4, h, w) -> images (n, 3, 8h, 8w) in [-1, 1]."""
        z = float_array(z, "latents", 4)
        if z.shape[1] != self.config.latent_channels:
            raise InvalidOption(f"The latents must have {self.config.latent_channels} channels.")
        s = self.config.latent_scale
        images = np.empty((z.shape[0], 3, z.shape[2] * s, z.shape[3] * s), np.float32)
        for i in range(0, z.shape[0], self.decode_batch):
            scaled = self._tensor(z[i : i + self.decode_batch] / np.float32(self.config.scale_factor), True)
            out = self.modules.vae.decode(scaled, return_dict=False)[0]
            images[i : i + self.decode_batch] = out.float().cpu().numpy()
        return np.clip(images, -1.0, 1.0, out=images)

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Images (n, 3, H, W) in [-1, 1] -> latents (n, 4, H/8, W/8): posterior mean times 0.18215."""
        images = float_array(images, "images", 4)
        s = self.config.latent_scale
        if images.shape[1] != 3 or images.shape[2] % s or images.shape[3] % s:
            raise InvalidOption(f"Images must have shape (n, 3, H, W) with H and W multiples of {s}.")
        posterior = self.modules.vae.encode(self._tensor(images, True), return_dict=False)[0]
        mean = posterior.mean.float().cpu().numpy()
        return np.asarray(mean, dtype=np.float32) * np.float32(self.config.scale_factor)

    def warm_up(self, height: int | None = None, width: int | None = None) -> None:
        """One guided UNet step at this size (compiles it when `compile` is on) and one decode."""
        cfg = self.config
        h = (height or cfg.image_size) // cfg.latent_scale
        w = (width or cfg.image_size) // cfg.latent_scale
        ctx = np.zeros((2, cfg.context_length, cfg.context_dim), np.float32)
        x = np.zeros((2, cfg.latent_channels, h, w), np.float32)
        self.predict_noise(x, np.array([999, 999]), ctx)
        self.decode_latents(x[:1])
