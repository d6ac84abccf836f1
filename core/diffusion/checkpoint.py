"""The official parameter tree and its files: build it, fill it (random or from a checkpoint), check, save.

Names follow the official checkpoint: `model.diffusion_model.` (UNet), `first_stage_model.` (VAE) and
`cond_stage_model.transformer.` (text encoder). Two formats are read: MindSpore `.ckpt` and safetensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn
from mindspore.nn.utils import no_init_parameters

from core.diffusion.config import WukongConfig
from core.diffusion.text_encoder import TextEncoder
from core.diffusion.unet import UNetModel
from core.diffusion.vae import AutoencoderKL
from core.errors import CheckpointError

logger = logging.getLogger(__name__)

_SAFETENSORS_MAGIC_MAX_HEADER = 100 * 1024 * 1024
_SHOWN = 5


class _Named(nn.Cell):
    """One name level in the tree, e.g. `model.` above `diffusion_model.`."""

    def __init__(self, name: str, cell: nn.Cell) -> None:
        super().__init__()
        setattr(self, name, cell)


class WukongModel(nn.Cell):
    """The three networks under their official prefixes."""

    def __init__(self, config: WukongConfig) -> None:
        super().__init__()
        self.unet = UNetModel(config)
        self.vae = AutoencoderKL(config)
        self.text_encoder = TextEncoder(config)
        self.model = _Named("diffusion_model", self.unet)
        self.first_stage_model = self.vae
        self.cond_stage_model = _Named("transformer", self.text_encoder)

    def named_parameters(self) -> dict[str, Parameter]:
        """Official name -> Parameter (each parameter once, under its official name)."""
        prefixes: dict[str, nn.Cell] = {
            "model.diffusion_model.": self.unet,
            "first_stage_model.": self.vae,
            "cond_stage_model.transformer.": self.text_encoder,
        }
        return {
            prefix + name: param
            for prefix, cell in prefixes.items()
            for name, param in cell.parameters_and_names()
        }


def build_model(config: WukongConfig) -> WukongModel:
    """The parameter tree with no weights allocated yet (fill it with `randomize` or `load_weights`)."""
    with no_init_parameters():
        return WukongModel(config)


def expected_shapes(config: WukongConfig) -> dict[str, tuple[int, ...]]:
    """Every official parameter name and its shape for `config`, without allocating weights."""
    return {name: tuple(p.shape) for name, p in build_model(config).named_parameters().items()}


def _is_norm(name: str) -> bool:
    return name.endswith((".gamma", ".beta"))


def _assign(name: str, param: Parameter, array: np.ndarray, dtype: str) -> None:
    """Give `param` the values of `array`, in float16 for non-norm weights when dtype is float16."""
    half = dtype == "float16" and not _is_norm(name)
    ms_type = ms.float16 if half else ms.float32
    if param.dtype != ms_type:
        param.set_dtype(ms_type)
    param.set_data(Tensor.from_numpy(np.ascontiguousarray(array, dtype=np.float16 if half else np.float32)))


def randomize(model: WukongModel, seed: int, dtype: str = "float32") -> None:
    """Fill every parameter from numpy's generator: the same seed gives the same weights everywhere.

    Weights ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02), norms scale 1 shift 0, biases 0.
    """
    rng = np.random.default_rng(seed)
    for name, param in model.named_parameters().items():
        shape = tuple(param.shape)
        if name.endswith(".gamma"):
            array = np.ones(shape, np.float32)
        elif name.endswith((".beta", ".bias")):
            array = np.zeros(shape, np.float32)
        elif name.endswith("embedding_table") or name.endswith("positional_embedding"):
            array = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            array = rng.standard_normal(shape, dtype=np.float32) * np.float32(fan_in**-0.5)
        _assign(name, param, array, dtype)


@dataclass(frozen=True)
class CheckpointReport:
    """How a checkpoint file matches the model: what is missing, of the wrong shape, or unknown."""

    path: str
    ok: bool
    expected: int
    found: int
    matched: int
    missing: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    extra: tuple[str, ...] = ()

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
        return f"The checkpoint {Path(self.path).name} does not match the model: " + ", ".join(parts) + "."


class _Source:
    """Names, shapes and (one at a time) arrays of a checkpoint file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._safetensors: Any = None
        self._ckpt: dict[str, Parameter] = {}
        if not path.exists():
            raise CheckpointError(f"The checkpoint {path} does not exist.")
        if not path.is_file():
            raise CheckpointError(f"The checkpoint {path} is not a file.")
        try:
            if _looks_like_safetensors(path):
                from safetensors import safe_open

                self._safetensors = safe_open(str(path), framework="np")
            else:
                self._ckpt = ms.load_checkpoint(str(path))
        except CheckpointError:
            raise
        except Exception as exc:  # any framework error means the file is unusable
            logger.warning("cannot read checkpoint %s: %s: %s", path, type(exc).__name__, exc)
            raise CheckpointError(
                f"The checkpoint {path.name} could not be read: it is truncated, corrupt or not a checkpoint."
            ) from None
        if not self.shapes():
            raise CheckpointError(f"The checkpoint {path.name} holds no parameters.")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._safetensors is not None:
            return {k: tuple(self._safetensors.get_slice(k).get_shape()) for k in self._safetensors.keys()}
        return {k: tuple(v.shape) for k, v in self._ckpt.items()}

    def take(self, name: str) -> np.ndarray:
        """The array stored under `name`; a .ckpt entry is released once taken."""
        try:
            if self._safetensors is not None:
                return np.asarray(self._safetensors.get_tensor(name))
            return self._ckpt.pop(name).asnumpy()
        except Exception as exc:
            logger.warning("cannot read %s from %s: %s", name, self.path, exc)
            raise CheckpointError(
                f"The checkpoint {self.path.name} is corrupt: parameter {name} cannot be read."
            ) from None


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with a little-endian u64 header length and a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= _SAFETENSORS_MAGIC_MAX_HEADER and head[8:9] == b"{"


def _compare(
    path: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
) -> CheckpointReport:
    missing = tuple(n for n in expected if n not in found)
    mismatched = tuple((n, s, found[n]) for n, s in expected.items() if n in found and found[n] != s)
    extra = tuple(n for n in found if n not in expected)
    return CheckpointReport(
        path=str(path),
        ok=not missing and not mismatched,
        expected=len(expected),
        found=len(found),
        matched=len(expected) - len(missing) - len(mismatched),
        missing=missing,
        mismatched=mismatched,
        extra=extra,
    )


def check_checkpoint(path: str | Path, config: WukongConfig | None = None) -> CheckpointReport:
    """Compare a checkpoint's names and shapes with the model; raises CheckpointError if unreadable."""
    path = Path(path)
    source = _Source(path)
    return _compare(path, expected_shapes(config or WukongConfig()), source.shapes())


def load_weights(model: WukongModel, path: str | Path, dtype: str = "float32") -> CheckpointReport:
    """Fill `model` from a checkpoint, one tensor at a time; CheckpointError names what does not fit."""
    path = Path(path)
    source = _Source(path)
    params = model.named_parameters()
    report = _compare(path, {n: tuple(p.shape) for n, p in params.items()}, source.shapes())
    if not report.ok:
        raise CheckpointError(report.problem())
    if report.extra:
        logger.info(
            "ignoring %d unknown checkpoint entries (e.g. %s)", len(report.extra), ", ".join(report.extra[:3])
        )
    for name, param in params.items():
        array = source.take(name)
        if not np.isfinite(array).all():
            raise CheckpointError(
                f"The checkpoint {path.name} is corrupt: parameter {name} holds NaN or infinite values."
            )
        _assign(name, param, array, dtype)
    return report


def save_checkpoint(pipe: Any, path: str | Path) -> Path:
    """Write a pipeline's (or a WukongModel's) weights; `.safetensors` by suffix, else MindSpore `.ckpt`."""
    path = Path(path)
    model: WukongModel = getattr(pipe, "model", pipe)
    arrays = _float32_arrays(model)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(dict(arrays), str(path))
    else:
        ms.save_checkpoint([{"name": n, "data": Tensor(a)} for n, a in arrays], str(path))
    return path


def _float32_arrays(model: WukongModel) -> Iterator[tuple[str, np.ndarray]]:
    for name, param in model.named_parameters().items():
        yield name, np.ascontiguousarray(param.asnumpy(), dtype=np.float32)
