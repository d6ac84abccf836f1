"""Engine implementations behind the port in core.engine: local (MindSpore) and http (remote worker)."""

from core.engines.factory import build_engine, build_local_engine
from core.engines.http import HttpEngine
from core.engines.local import LocalEngine, tiny_engine, wukong_engine

__all__ = ["HttpEngine", "LocalEngine", "build_engine", "build_local_engine", "tiny_engine", "wukong_engine"]
