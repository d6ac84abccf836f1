"""Fused float32 CPU kernels (GroupNorm [+ SiLU], LayerNorm, softmax, GEGLU, attention, Winograd transforms)
as MindSpore AOT custom ops.

MindSpore's CPU kernels for these are 10-30x slower than PyTorch's. The C++ source beside this module
(`cpu_kernels.cc`) is compiled once per source, compiler and host CPU (`-march=native`) into a cache
directory and loaded as `ops.Custom(..., func_type="aot")` operators. When no compiler is found or the
build fails, one line is logged, `available()` is False and the layers keep MindSpore's operators.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mindspore import Tensor, ops

from core.diffusion import runtime  # noqa: F401  (process settings before the first operator)

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
COMPILER = "g++"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC", "-pthread")
_COMPILE_TIMEOUT_S = 300


@dataclass(frozen=True)
class _Operators:
    group_norm: ops.Custom
    group_norm_bias: ops.Custom
    layer_norm: ops.Custom
    softmax: ops.Custom
    geglu: ops.Custom
    attention_tokens: ops.Custom
    winograd_input: ops.Custom
    winograd_output: ops.Custom


def available() -> bool:
    """Whether the kernels are built and loaded (built on the first call, then remembered)."""
    return _operators() is not None


def group_norm(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    groups: int,
    eps: float,
    *,
    silu: bool = False,
    bias: Tensor | None = None,
) -> Tensor:
    """GroupNorm of float32 `x` (n, c, ...) with per-channel `gamma` and `beta`; `bias` (n, c), if
    given, is added to `x` first (per sample and channel); `silu` applies SiLU to the result."""
    kernels = _require()
    settings = _settings(float(groups), float(eps), 1.0 if silu else 0.0)
    if bias is None:
        return kernels.group_norm(x, gamma, beta, settings)
    return kernels.group_norm_bias(x, bias, gamma, beta, settings)


def layer_norm(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
    """LayerNorm of float32 `x` over its last axis."""
    return _require().layer_norm(x, gamma, beta, _settings(float(eps)))


def softmax(x: Tensor) -> Tensor:
    """Softmax of float32 `x` over its last axis (-inf entries give 0; a row of only -inf gives zeros)."""
    return _require().softmax(x)


def geglu(h: Tensor, bias: Tensor | None = None) -> Tensor:
    """u[..., :inner] * gelu_tanh(u[..., inner:]) of u = h + bias, float32 `h` (..., 2 * inner) and
    `bias` (2 * inner) if given (the projection's, so its own add is skipped); `h` is read in place."""
    return _require().geglu(h, _zeros(h.shape[-1]) if bias is None else bias)


def attention_tokens(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> Tensor:
    """softmax(scale q k^T) v of every head, float32 q (b, n, width), k and v (b, m, width) in the token
    layout (head j is columns [j * width / heads, (j + 1) * width / heads)), the result (b, n, width)
    likewise: no copies split the heads out or merge them back, and in blocks of queries whose scores
    stay in cache (no score matrix is kept). Check `attention_available()`."""
    return _require().attention_tokens(q, k, v, _settings(float(scale), float(heads)))


@functools.cache
def attention_available() -> bool:
    """Whether `attention_tokens` runs here: it needs the sgemm of the oneDNN library MindSpore loads."""
    if _operators() is None:
        return False
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(3))
    try:
        got = attention_tokens(Tensor(q), Tensor(k), Tensor(v), 1, 0.5).asnumpy()
    except Exception as exc:  # no sgemm found: the kernel reports failure
        logger.info("fused CPU attention unavailable (%s)", exc)
        return False
    scores = 0.5 * q @ k.transpose(0, 2, 1)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (weights / weights.sum(-1, keepdims=True)) @ v
    return bool(np.allclose(got, expected, rtol=1e-4, atol=1e-5))


def winograd_input(x: Tensor, b_t: Tensor) -> Tensor:
    """Winograd input tiles of float32 `x` (n, c, h, w) transformed by `b_t` (alpha, alpha):
    (alpha^2, c, n * rows * cols), tiles of stride alpha - 2 over `x` padded by one zero row and column."""
    return _require().winograd_input(x, b_t)


def winograd_output(products: Tensor, a_t: Tensor, bias: Tensor, n: int, h: int, w: int) -> Tensor:
    """The (n, c, h, w) map from Winograd `products` (alpha^2, c, tiles) transformed by `a_t`
    (m, alpha), plus the per-channel `bias` (c)."""
    return _require().winograd_output(products, a_t, bias, _shape_of(n, h, w))


@functools.cache
def _zeros(width: int) -> Tensor:
    return Tensor(np.zeros(width, np.float32))


@functools.cache
def _shape_of(n: int, h: int, w: int) -> Tensor:
    """A small tensor whose shape (n, 1, h, w) tells the output kernel the map's size."""
    return Tensor(np.zeros((n, 1, h, w), np.float32))


def _require() -> _Operators:
    kernels = _operators()
    if kernels is None:
        raise RuntimeError("the CPU kernels are not available; check cpu_kernels.available() first")
    return kernels


@functools.cache
def _settings(*values: float) -> Tensor:
    """The small float32 tensor that carries a kernel's scalar settings (one per distinct setting)."""
    return Tensor(np.array(values, np.float32))


@functools.cache
def _operators() -> _Operators | None:
    library = build()
    if library is None:
        return None
    try:
        kernels = _load(library)
        probe = Tensor(np.array([[0.0, -np.inf, 0.0]], np.float32))
        if not np.allclose(kernels.softmax(probe).asnumpy(), [[0.5, 0.0, 0.5]]):
            raise RuntimeError("a probe softmax gave wrong values")
    except Exception as exc:  # a library MindSpore cannot load or run: keep its own operators
        logger.warning("CPU kernels unusable (%s); using MindSpore's operators", exc)
        return None
    return kernels


def _load(library: Path) -> _Operators:
    def custom(name: str, out_shape: object) -> ops.Custom:
        return ops.Custom(f"{library}:{name}", out_shape, lambda x, *_: x, func_type="aot")

    def same(x: list[int], *_: object) -> list[int]:
        return x

    def halved(h: list[int], *_: object) -> list[int]:
        return [*h[:-1], h[-1] // 2]

    def input_tiles(x: list[int], b_t: list[int]) -> list[int]:
        m = b_t[0] - 2
        return [b_t[0] * b_t[0], x[1], x[0] * -(-x[2] // m) * -(-x[3] // m)]

    def output_map(products: list[int], a_t: list[int], bias: list[int], shape: list[int]) -> list[int]:
        return [shape[0], products[1], shape[2], shape[3]]

    return _Operators(
        group_norm=custom("GroupNorm", same),
        group_norm_bias=custom("GroupNormBias", same),
        layer_norm=custom("LayerNorm", same),
        softmax=custom("Softmax", same),
        geglu=custom("Geglu", halved),
        attention_tokens=custom("AttentionTokens", same),
        winograd_input=custom("WinogradInput", input_tiles),
        winograd_output=custom("WinogradOutput", output_map),
    )


def build() -> Path | None:
    """The compiled library, built unless the cache holds it; None (and one log line) on failure.

    The name carries a hash of the source, the compiler's version, the target `-march=native` means
    here and the flags, so a changed source, compiler or CPU gets its own build. It is compiled to a
    temporary name and renamed into place, so processes building at once never load a partial file.
    """
    compiler = shutil.which(COMPILER)
    if compiler is None:
        logger.warning("no C++ compiler (%s) found: the UNet runs MindSpore's slower CPU operators", COMPILER)
        return None
    try:
        version = _run([compiler, "--version"])
        target = _run([compiler, *FLAGS[:3], "-dM", "-E", "-x", "c++", os.devnull])
        source = SOURCE.read_bytes()
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("cannot build the CPU kernels (%s): using MindSpore's operators", exc)
        return None
    key = hashlib.sha256(b"\0".join([source, version, target, " ".join(FLAGS).encode()])).hexdigest()[:20]
    directory = _cache_directory()
    if directory is None:
        logger.warning("no writable cache directory for the CPU kernels: using MindSpore's operators")
        return None
    library = directory / f"cpu_kernels-{key}.so"
    if library.exists():
        return library
    partial: str | None = None
    try:
        fd, partial = tempfile.mkstemp(prefix=f".{library.stem}-", suffix=".so", dir=directory)
        os.close(fd)
        # compiled from the bytes just hashed (on stdin), so the library always matches its name
        done = subprocess.run(
            [compiler, *FLAGS, "-x", "c++", "-o", partial, "-"],
            input=source,
            capture_output=True,
            timeout=_COMPILE_TIMEOUT_S,
        )
        if done.returncode != 0:
            last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
            logger.warning("building the CPU kernels failed (%s): using MindSpore's operators", last)
            return None
        os.replace(partial, library)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("building the CPU kernels failed (%s): using MindSpore's operators", exc)
        return None
    finally:
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)
    logger.info("built the CPU kernels: %s", library)
    return library


def _run(command: list[str]) -> bytes:
    return subprocess.run(command, capture_output=True, check=True, timeout=60).stdout


def _cache_directory() -> Path | None:
    """`$XDG_CACHE_HOME/huahua/kernels` (default `~/.cache/huahua/kernels`) if writable, else a
    private folder in the temp directory."""
    candidates = []
    xdg = os.environ.get("XDG_CACHE_HOME")  # the XDG base-directory convention, not one of our settings
    try:
        candidates.append((Path(xdg) if xdg else Path.home() / ".cache") / "huahua" / "kernels")
    except RuntimeError:  # no home directory
        pass
    candidates.append(Path(tempfile.gettempdir()) / f"huahua-kernels-{os.getuid()}")
    for directory in candidates:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if directory.stat().st_uid == os.getuid() and os.access(directory, os.W_OK):
                return directory
        except OSError:
            continue
    return None
