"""Test helpers: a deterministic engine (tests only) and a service on a real SQLite file in a temp dir."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path
from typing import Any

from PIL import Image

from core.engine import CancelToken, Engine, ProgressCallback
from core.errors import JobCancelled
from core.settings import Settings
from core.types import GeneratedImage, GenerationRequest

REPO = Path(__file__).resolve().parents[1]
VOCAB = REPO.parent / "shared" / "wukong" / "vocab_zh.txt"
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


class PatternEngine(Engine):
    """Draws a flat colour derived from (prompt, seed): deterministic and instant.

    `step_delay` slows each step down; `gate`, when given, holds every job at its first step until set,
    so tests can observe queued and running states.
    """

    name = "pattern"
    label = "test pattern"

    def __init__(self, step_delay: float = 0.0, gate: asyncio.Event | None = None) -> None:
        self.step_delay = step_delay
        self.gate = gate
        self.requests: list[GenerationRequest] = []

    async def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        self.requests.append(request)
        for step in range(1, request.steps + 1):
            if cancel.cancelled:
                raise JobCancelled()
            if self.gate is not None:
                await self.gate.wait()
            if self.step_delay:
                await asyncio.sleep(self.step_delay)
            on_progress(step, request.steps)
        return [self._draw(request, request.seed + i) for i in range(request.n)]

    @staticmethod
    def _draw(request: GenerationRequest, seed: int) -> GeneratedImage:
        digest = hashlib.sha256(f"{request.prompt}|{seed}|{request.init_image is not None}".encode()).digest()
        image = Image.new("RGB", (request.width, request.height), tuple(digest[:3]))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return GeneratedImage(png=buffer.getvalue(), width=request.width, height=request.height, seed=seed)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "model_dir": tmp_path / "models",
        "vocab_path": VOCAB if VOCAB.exists() else None,
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
