"""WukongPipeline: tokenize, encode text, predict noise, sample with guidance, encode and decode images.

Every public method takes and returns numpy arrays (float32 latents and images, int64 token ids), so
callers never touch MindSpore. Classifier-free guidance runs the unconditional and the conditional
inputs as one batch, one UNet call per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor

from core.diffusion.checkpoint import WukongModel, build_model, load_weights, randomize
from core.diffusion.config import WukongConfig
from core.diffusion.consistency import check_regions
from core.diffusion.guided import GuidedSampling, float_array
from core.diffusion.layers import prepare_for_graph
from core.diffusion.samplers import NoiseSchedule
from core.errors import EngineUnavailable, InvalidOption
from core.tokenizer import WordPieceTokenizer

logger = logging.getLogger(__name__)

DEVICES = ("CPU", "GPU", "Ascend")
DTYPES = ("float32", "float16")
COMPILED_SHAPES = 4
"""With `graph=True` the UNet is compiled for at most this many input shapes (batch, height, width and
text length), the first ones it meets; other shapes run eagerly (the same results). On 2 CPU cores a
512x512 compile takes about 10 s, and each compiled shape keeps about 100 MB for the life of the
process, so a bot whose users pick many sizes keeps a bounded footprint."""


def _use_device(device: str) -> None:
    """Select PyNative mode on `device`; MindSpore allows one device target per process."""
    if device not in DEVICES:
        raise InvalidOption(f"Unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    try:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        current = ms.get_context("device_target")
        if current != device:
            ms.set_device(device)
    except Exception as exc:
        logger.warning("cannot use device %s: %s", device, exc)
        raise EngineUnavailable(f"MindSpore cannot run on {device} here.") from None


class WukongPipeline(GuidedSampling):
    """The Wukong-Huahua text-to-image model: weights, tokenizer and noise schedule together."""

    def __init__(
        self,
        model: WukongModel,
        config: WukongConfig,
        tokenizer: WordPieceTokenizer | None,
        *,
        device: str = "CPU",
        dtype: str = "float32",
        random_weights: bool = False,
        graph: bool = False,
    ) -> None:
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.random_weights = random_weights
        self.schedule = NoiseSchedule.official()
        self._ms_dtype = ms.float16 if dtype == "float16" else ms.float32
        # graph=True runs the UNet as a compiled static graph for the first COMPILED_SHAPES input shapes
        # it meets, eagerly for any other: the same results, faster after a compile per shape.
        self.graph = graph
        if graph:
            prepare_for_graph(model.unet)
        self._compiled = ms.jit(model.unet.construct) if graph else None
        self._compiled_shapes: set[tuple[int, ...]] = set()
        model.set_train(False)

    # construction

    @classmethod
    def load(
        cls,
        ckpt_path: str | Path,
        vocab_path: str | Path,
        config: WukongConfig | None = None,
        device: str = "CPU",
        dtype: str = "float32",
        graph: bool = False,
    ) -> WukongPipeline:
        """The model with weights from a MindSpore `.ckpt` or a `.safetensors` file."""
        config = config or WukongConfig()
        cls._check_dtype(dtype)
        tokenizer = WordPieceTokenizer.from_file(vocab_path)
        _use_device(device)
        model = build_model(config)
        load_weights(model, ckpt_path, dtype=dtype)
        logger.info("loaded %s on %s (%s)", Path(ckpt_path).name, device, dtype)
        return cls(model, config, tokenizer, device=device, dtype=dtype, graph=graph)

    @classmethod
    def random(
        cls,
        config: WukongConfig | None = None,
        vocab_path: str | Path | WordPieceTokenizer | None = None,
        seed: int = 0,
        device: str = "CPU",
        dtype: str = "float32",
        graph: bool = False,
    ) -> WukongPipeline:
        """The same model with random weights drawn from numpy (the same `seed` gives the same model).

        `vocab_path` is a vocabulary file or a ready tokenizer (the tiny engine's built-in vocabulary)."""
        config = config or WukongConfig()
        cls._check_dtype(dtype)
        if vocab_path is None or isinstance(vocab_path, WordPieceTokenizer):
            tokenizer = vocab_path
        else:
            tokenizer = WordPieceTokenizer.from_file(vocab_path)
        _use_device(device)
        model = build_model(config)
        randomize(model, seed, dtype=dtype)
        return cls(model, config, tokenizer, device=device, dtype=dtype, random_weights=True, graph=graph)

    @staticmethod
    def _check_dtype(dtype: str) -> None:
        if dtype not in DTYPES:
            raise InvalidOption(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Official parameter name -> shape."""
        return {name: tuple(p.shape) for name, p in self.model.named_parameters().items()}

    # text

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
        out = self.model.text_encoder(Tensor(array.astype(np.int32)))
        return out.astype(ms.float32).asnumpy()

    # noise prediction and sampling

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

        `share` = (weights (k,), one int32 index array per rate of `unet.share_rates`): the first k
        rows' self-attention also reads those tokens of the batch (see `core.diffusion.consistency`).
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
        t_emb = self.model.unet.embed_timesteps(steps, self._ms_dtype)
        if share is None:
            if regions is not None:
                raise InvalidOption("Character regions weight shared tokens: give them with `share`.")
            unet = self._unet_for((*x.shape, *ctx.shape))
            eps = unet(Tensor(x, dtype=self._ms_dtype), t_emb, Tensor(ctx, dtype=self._ms_dtype))
        else:
            tensors = self._share_tensors(share, x.shape, regions, ctx.shape[1])
            unet = self._unet_for((*x.shape, *ctx.shape, *(int(i.shape[-1]) for i in tensors[1:])))
            eps = unet(Tensor(x, dtype=self._ms_dtype), t_emb, Tensor(ctx, dtype=self._ms_dtype), tensors)
        return eps.astype(ms.float32).asnumpy()

    def _share_tensors(
        self,
        share: tuple[np.ndarray, Sequence[np.ndarray]],
        shape: tuple[int, ...],
        regions: tuple[np.ndarray, np.ndarray] | None,
        context_length: int,
    ) -> tuple[Tensor, ...]:
        """Checked `share` tensors: weights (k, 1, 1) in the model's dtype, then the index per rate,
        then, with `regions`, the region tokens (k, L, r) float32 and their prompt rows (k,) int32."""
        weights, indices = share
        w = np.asarray(weights, np.float32).reshape(-1)
        n, _, h, width = shape
        rates = self.model.unet.share_rates
        if not 1 <= w.size <= n or not np.isfinite(w).all():
            raise InvalidOption(f"Sharing needs 1 to {n} finite reader weights, not {w.size}.")
        if len(indices) != len(rates):
            raise InvalidOption(f"Sharing needs one token index per UNet resolution ({len(rates)}).")
        out = [Tensor(w.reshape(-1, 1, 1), dtype=self._ms_dtype)]
        for rate, index in zip(rates, indices, strict=True):
            flat = np.asarray(index).reshape(-1)
            tokens = n * (h // rate) * (width // rate)
            if flat.size == 0 or flat.size % w.size or not np.issubdtype(flat.dtype, np.integer):
                raise InvalidOption("Each shared token index must hold whole numbers, as many per reader.")
            if flat.min() < 0 or flat.max() >= tokens:
                raise InvalidOption(f"Shared token indices must lie in [0, {tokens}).")
            out.append(Tensor(flat.astype(np.int32)))
        if regions is not None:
            region_tokens, rows = check_regions(regions, w.size, n, context_length)
            out += [Tensor(region_tokens), Tensor(rows)]
        # mutable: the index values change every step; as constants each call would compile again
        return ms.mutable(tuple(out))

    def _unet_for(self, shape: tuple[int, ...]) -> Callable[..., Tensor]:
        """The compiled UNet for a shape it is (or may still be) compiled for, else the eager one."""
        if self._compiled is None:
            return self.model.unet
        if shape not in self._compiled_shapes and len(self._compiled_shapes) >= COMPILED_SHAPES:
            return self.model.unet
        self._compiled_shapes.add(shape)
        return self._compiled

    @property
    def share_rates(self) -> tuple[int, ...]:
        return tuple(self.model.unet.share_rates)

    # images

    def decode_latents(self, z: np.ndarray) -> np.ndarray:
        """Latents (n, 4, h, w) -> images (n, 3, 8h, 8w) in [-1, 1]."""
        z = float_array(z, "latents", 4)
        if z.shape[1] != self.config.latent_channels:
            raise InvalidOption(f"The latents must have {self.config.latent_channels} channels.")
        s = self.config.latent_scale
        images = np.empty((z.shape[0], 3, z.shape[2] * s, z.shape[3] * s), np.float32)
        for i in range(z.shape[0]):  # one image at a time: the peak does not grow with the batch
            scaled = Tensor(z[i : i + 1] / np.float32(self.config.scale_factor), dtype=self._ms_dtype)
            images[i : i + 1] = self.model.vae.decode(scaled).astype(ms.float32).asnumpy()
        return np.clip(images, -1.0, 1.0, out=images)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Images (n, 3, H, W) in [-1, 1] -> latents (n, 4, H/8, W/8): posterior mean times 0.18215."""
        images = float_array(images, "images", 4)
        s = self.config.latent_scale
        if images.shape[1] != 3 or images.shape[2] % s or images.shape[3] % s:
            raise InvalidOption(f"Images must have shape (n, 3, H, W) with H and W multiples of {s}.")
        mean = self.model.vae.encode_mean(Tensor(images, dtype=self._ms_dtype))
        return mean.astype(ms.float32).asnumpy() * np.float32(self.config.scale_factor)
