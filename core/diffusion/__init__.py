"""The Wukong-Huahua model in MindSpore (the only package that imports mindspore).

`WukongConfig` and the numpy samplers import without MindSpore; the pipeline and the checkpoint
functions load it on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from core.diffusion.config import WukongConfig

if TYPE_CHECKING:
    from core.diffusion.checkpoint import CheckpointReport, check_checkpoint, save_checkpoint
    from core.diffusion.pipeline import WukongPipeline

_LAZY = {
    "WukongPipeline": "core.diffusion.pipeline",
    "CheckpointReport": "core.diffusion.checkpoint",
    "check_checkpoint": "core.diffusion.checkpoint",
    "save_checkpoint": "core.diffusion.checkpoint",
}

__all__ = ["CheckpointReport", "WukongConfig", "WukongPipeline", "check_checkpoint", "save_checkpoint"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'core.diffusion' has no attribute {name!r}")
    return getattr(import_module(module), name)
