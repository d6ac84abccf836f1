"""The one place that turns settings into an Engine."""

from __future__ import annotations

import logging

from core.engine import Engine
from core.engines.http import HttpEngine
from core.engines.local import LocalEngine, tiny_engine, wukong_engine
from core.engines.pytorch import torch_engine
from core.settings import Settings

logger = logging.getLogger(__name__)


def build_local_engine(settings: Settings) -> LocalEngine:
    """The engine a worker runs: `tiny` or `torch` when configured, the official model on MindSpore
    otherwise."""
    if settings.engine == "torch":
        return torch_engine(settings)
    return tiny_engine(settings) if settings.engine == "tiny" else wukong_engine(settings)


def build_engine(settings: Settings) -> Engine:
    """Choose wukong (in process), torch (in process, PyTorch), tiny (in process, random weights) or http
    (a remote worker)."""
    if settings.engine == "http":
        logger.info("using the remote image worker at %s", settings.worker_url)
        return HttpEngine.from_settings(settings)
    return build_local_engine(settings)
