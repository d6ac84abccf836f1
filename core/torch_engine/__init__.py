"""The Wukong-Huahua model on PyTorch (diffusers and transformers): NVIDIA GPUs, Apple GPUs, CPUs.

The only package besides `core.diffusion` that imports a deep-learning framework, and it does so
lazily: `core.torch_engine.layout` and `core.torch_engine.files` need neither torch nor MindSpore, the
pipeline loads torch, diffusers and transformers on first use (`pip install 'huahua[torch]'`).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.torch_engine.pipeline import TorchWukongPipeline

__all__ = ["TorchWukongPipeline"]


def __getattr__(name: str) -> Any:
    if name == "TorchWukongPipeline":
        return import_module("core.torch_engine.pipeline").TorchWukongPipeline
    raise AttributeError(f"module 'core.torch_engine' has no attribute {name!r}")
