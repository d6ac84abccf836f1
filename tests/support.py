"""Test helpers: a deterministic engine (tests only) and a service on a real SQLite file in a temp dir."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import os
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest
from PIL import Image

from core.engine import (
    CancelToken,
    Engine,
    EngineLimits,
    ProgressCallback,
    configured_limits,
    validate_request,
)
from core.errors import JobCancelled
from core.model_files import VOCAB_SHA256
from core.settings import Settings
from core.tokenizer import WordPieceTokenizer
from core.types import GeneratedImage, GenerationRequest
from core.vocabulary import builtin_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR_VARIABLE = "HUAHUA_TEST_SHARED_DIR"
CHROMIUM = Path("/usr/bin/chromium")
"""Debian's chromium, installed by .ci/run; page tests skip without it."""
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def shared_dir() -> Path:
    """The project's `shared/` beside the checkout (model facts kept outside the repository; a fresh
    clone has none). HUAHUA_TEST_SHARED_DIR overrides it: a missing folder runs the tests as a fresh
    clone would. No test may need it: tests that can use a file from it have a fallback or skip."""
    return Path(os.environ.get(SHARED_DIR_VARIABLE) or REPO.parent / "shared")


@functools.cache
def official_vocab() -> Path | None:
    """The official vocab_zh.txt when this machine has it (HUAHUA_VOCAB_PATH, else shared/wukong/),
    checked by its sha256; None otherwise (then tests use the built-in vocabulary)."""
    for candidate in (os.environ.get("HUAHUA_VOCAB_PATH"), shared_dir() / "wukong" / "vocab_zh.txt"):
        if candidate and Path(candidate).is_file():
            if hashlib.sha256(Path(candidate).read_bytes()).hexdigest() == VOCAB_SHA256:
                return Path(candidate)
    return None


def vocabularies() -> list[str]:
    """The vocabularies to run tokenizer-dependent tests on: the built-in one everywhere, the official
    one too where this machine has it (it is not part of the repository)."""
    return ["built-in", *(["official"] if official_vocab() else [])]


def vocabulary(name: str) -> WordPieceTokenizer:
    """The tokenizer of one of `vocabularies()`."""
    if name == "official":
        path = official_vocab()
        assert path is not None
        return WordPieceTokenizer.from_file(path)
    return builtin_tokenizer()


def needs(what: str, how: str) -> str:
    """The one sentence every skip gives: what the test needs that this machine lacks, and the remedy:
    "needs MindSpore (pip install 'huahua[worker]')"."""
    return f"needs {what} ({how})"


def skip_needing(what: str, how: str) -> NoReturn:
    """Skip the running test because `what` is absent (hardware, a system package, weights)."""
    __tracebackhide__ = True  # the skip is reported at the caller's line
    pytest.skip(needs(what, how))


def skip_unless(present: bool, what: str, how: str) -> pytest.MarkDecorator:
    """A mark that skips unless `present`, with the same sentence as `skip_needing`."""
    return pytest.mark.skipif(not present, reason=needs(what, how))


def import_or_skip(module: str, what: str, how: str) -> ModuleType:
    """Import `module`, or skip the test (module) with the same sentence as `skip_needing`."""
    return pytest.importorskip(module, reason=needs(what, how))


INSTALL_MINDSPORE = "pip install 'huahua[worker]'"
INSTALL_DEV = "pip install -e '.[dev]'"
NO_MINDSPORE = needs("MindSpore", INSTALL_MINDSPORE)
NO_TELEGRAM = needs("python-telegram-bot", "pip install 'huahua[telegram]'")
"""Reasons for `pytest.importorskip` at the top of a module (where ruff allows imports after it)."""


class PatternEngine(Engine):
    """Draws a flat colour derived from (prompt, seed): deterministic and instant.

    It refuses what a real engine refuses, by the same check (`validate_request`) and the same limits:
    by default the tiny engine's under default settings; `limits=engine_limits("wukong")` for the
    official model's. `step_delay` slows each step down; `gate`, when given, holds every job at its
    first step until set, so tests can observe queued and running states.
    """

    name = "pattern"
    label = "test pattern"

    def __init__(
        self,
        step_delay: float = 0.0,
        gate: asyncio.Event | None = None,
        *,
        limits: EngineLimits | None = None,
    ) -> None:
        self.step_delay = step_delay
        self.gate = gate
        self.limits = limits or engine_limits("tiny")
        self.requests: list[GenerationRequest] = []

    async def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        validate_request(request, self.limits)
        self.requests.append(request)
        for step in range(1, request.steps + 1):
            if cancel.cancelled:
                raise JobCancelled()
            if self.gate is not None:
                await self.gate.wait()
            if self.step_delay:
                await asyncio.sleep(self.step_delay)
            on_progress(step, request.steps)
        return [
            self._draw(request, request.prompts[i % len(request.prompts)], request.seed + i)
            for i in range(request.n)
        ]

    @staticmethod
    def _draw(request: GenerationRequest, prompt: str, seed: int) -> GeneratedImage:
        """Panels drawn together: picture i from panel i's prompt, as the real engines draw them."""
        digest = hashlib.sha256(f"{prompt}|{seed}|{request.init_image is not None}".encode()).digest()
        image = Image.new("RGB", (request.width, request.height), tuple(digest[:3]))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return GeneratedImage(png=buffer.getvalue(), width=request.width, height=request.height, seed=seed)


def engine_limits(engine: str, **settings: Any) -> EngineLimits:
    """The limits the real engine named `engine` ("wukong", "tiny") has under these settings."""
    return configured_limits(Settings(_env_file=None, engine=engine, **settings))  # type: ignore[call-arg]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "model_dir": tmp_path / "models",
        "vocab_path": None,  # the tiny engine's built-in vocabulary, the same on every machine
        "engine": "tiny",
        "default_steps": 4,
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


async def make_service(  # type: ignore[no-untyped-def]
    tmp_path: Path, engine: Engine | None = None, *, engine_name: str | None = None, **overrides: Any
):
    """A started service on a real SQLite file; the caller stops it. `engine_name` sets HUAHUA_ENGINE."""
    from core.app import build_service

    if engine_name is not None:
        overrides["engine"] = engine_name
    service = await build_service(make_settings(tmp_path, **overrides), engine=engine)
    await service.start()
    return service


async def until(check: Any, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Poll an async predicate every 50 ms (stores and platforms are updated by listeners)."""
    for _ in range(int(timeout / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met in time: {check.__name__}")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width`×`height`: a decompression bomb as far as sizes go."""
    import struct
    import zlib

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def jpeg_picture(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (96, 64)) -> bytes:
    """A small plain-coloured JPEG, as a user's photo."""
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()
