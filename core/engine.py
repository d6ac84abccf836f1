"""The engine port: turn a GenerationRequest into images, reporting progress and honouring cancel."""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from typing import Any

from core.types import GeneratedImage, GenerationRequest

ProgressCallback = Callable[[int, int], None]
"""Called on the event loop thread with (step, total_steps) after each sampling step."""


class CancelToken:
    """Set from the event loop, read from the thread that samples."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Engine(abc.ABC):
    """Generates images. Implementations never block the event loop."""

    name: str = "engine"
    label: str = ""
    """Shown beside every picture, e.g. "untrained test model"; empty for the real model."""

    @abc.abstractmethod
    async def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        """Run one request; raise JobCancelled when cancelled, EngineUnavailable when it cannot run."""

    async def start(self) -> None:
        """Load weights or open connections; must not raise for missing weights (see `ready`)."""
        return None

    async def ensure_ready(self) -> None:
        """Raise EngineUnavailable (saying how to fix it) when `generate` cannot run now."""
        return None

    async def close(self) -> None:
        """Release resources."""
        return None

    async def health(self) -> dict[str, Any]:
        return {"engine": self.name, "ready": True}
