"""Checkpoint files without MindSpore: the official `.ckpt` (read here) and `.safetensors`, and the
converted PyTorch folder that `huahua model convert --to torch` writes.

A MindSpore `.ckpt` is one protobuf message: `Checkpoint { repeated Value value = 1 }`, each `Value`
holding `tag = 1` (the name) and `tensor = 2` (`TensorProto { repeated int64 dims = 1; string
tensor_type = 2; bytes tensor_content = 3 }`); a tensor may be split over consecutive values with the
same tag. The file is mapped into memory and each tensor is read from it only when taken, so the
4.3 GB official file never sits in memory twice.
"""

from __future__ import annotations

import json
import logging
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import CheckpointError
from core.torch_engine.layout import PARTS, Shape

logger = logging.getLogger(__name__)

CONVERTED_MARKER = "wukong.json"
"""The file that marks a converted folder: the WukongConfig and the source checkpoint it came from."""
WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_CKPT_TYPES: dict[str, Any] = {
    "Float32": np.float32,
    "Float16": np.float16,
    "Float64": np.float64,
    "BFloat16": "bfloat16",
    "Int8": np.int8,
    "UInt8": np.uint8,
    "Uint8": np.uint8,
    "Int16": np.int16,
    "Int32": np.int32,
    "Int64": np.int64,
    "Bool": np.bool_,
}


def looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with a little-endian u64 header length and a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= _MAX_SAFETENSORS_HEADER and head[8:9] == b"{"


# protobuf wire format, the three field kinds a checkpoint uses


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end or value) for each field of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("field runs past the end of its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire == 1:
            yield number, wire, pos, pos + 8
            pos += 8
        elif wire == 5:
            yield number, wire, pos, pos + 4
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


@dataclass
class _Piece:
    dims: tuple[int, ...]
    dtype: str
    start: int
    end: int


def _parse_tensor(buf: Any, start: int, end: int) -> _Piece:
    dims: list[int] = []
    dtype, content = "", (0, 0)
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1 and wire == 0:
            dims.append(a)
        elif number == 1 and wire == 2:  # packed dims
            pos = a
            while pos < b:
                value, pos = _varint(buf, pos)
                dims.append(value)
        elif number == 2 and wire == 2:
            dtype = bytes(buf[a:b]).decode("ascii")
        elif number == 3 and wire == 2:
            content = (a, b)
    return _Piece(tuple(dims), dtype, *content)


class MindSporeCheckpoint:
    """Names, shapes and (one at a time) arrays of a MindSpore `.ckpt`, read without MindSpore."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pieces: dict[str, list[_Piece]] = {}
        buf = memoryview(self._map)
        try:
            last = ""
            for number, wire, a, b in _fields(buf, 0, len(buf)):
                if number != 1 or wire != 2:
                    continue
                tag, tensor = "", None
                for n2, w2, c, d in _fields(buf, a, b):
                    if n2 == 1 and w2 == 2:
                        tag = bytes(buf[c:d]).decode("utf-8")
                    elif n2 == 2 and w2 == 2:
                        tensor = _parse_tensor(buf, c, d)
                if not tag or tensor is None:
                    continue
                if tag in self._pieces and tag != last:
                    raise ValueError(f"parameter {tag} appears twice")
                self._pieces.setdefault(tag, []).append(tensor)
                last = tag
        finally:
            buf.release()

    def shapes(self) -> dict[str, Shape]:
        return {name: pieces[-1].dims for name, pieces in self._pieces.items()}

    def take(self, name: str) -> np.ndarray:
        pieces = self._pieces[name]
        kind = _CKPT_TYPES.get(pieces[-1].dtype)
        if kind is None:
            raise ValueError(f"unsupported tensor type {pieces[-1].dtype}")
        raw = b"".join(self._map[p.start : p.end] for p in pieces)
        if kind == "bfloat16":
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, kind).copy()
        return array.reshape(pieces[-1].dims)

    def close(self) -> None:
        self._map.close()


class SafetensorsCheckpoint:
    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        self._file: Any = safe_open(str(path), framework="np")

    def shapes(self) -> dict[str, Shape]:
        return {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}

    def take(self, name: str) -> np.ndarray:
        return np.asarray(self._file.get_tensor(name))

    def close(self) -> None:
        self._file = None


OfficialFile = MindSporeCheckpoint | SafetensorsCheckpoint


def open_official(path: Path) -> OfficialFile:
    """An official-layout checkpoint (.ckpt or .safetensors); CheckpointError if it cannot be read."""
    if not path.exists():
        raise CheckpointError(f"The checkpoint {path} does not exist.")
    if not path.is_file():
        raise CheckpointError(f"The checkpoint {path} is not a file.")
    try:
        source: OfficialFile
        if looks_like_safetensors(path):
            source = SafetensorsCheckpoint(path)
        else:
            source = MindSporeCheckpoint(path)
        shapes = source.shapes()
    except Exception as exc:  # any parse error means the file is unusable
        logger.warning("cannot read checkpoint %s: %s: %s", path, type(exc).__name__, exc)
        raise CheckpointError(
            f"The checkpoint {path.name} could not be read: it is truncated, corrupt or not a checkpoint."
        ) from None
    if not shapes:
        raise CheckpointError(f"The checkpoint {path.name} holds no parameters.")
    return source


def take(source: OfficialFile, name: str) -> np.ndarray:
    """One tensor as float32, with a CheckpointError naming it when it cannot be read or is not finite."""
    try:
        array = source.take(name)
    except Exception as exc:
        logger.warning("cannot read %s from %s: %s", name, source.path, exc)
        raise CheckpointError(
            f"The checkpoint {source.path.name} is corrupt: parameter {name} cannot be read."
        ) from None
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise CheckpointError(
            f"The checkpoint {source.path.name} is corrupt: parameter {name} holds NaN or infinite values."
        )
    return array


# the converted folder


def is_converted(path: Path) -> bool:
    return path.is_dir() and (path / CONVERTED_MARKER).is_file()


def read_marker(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / CONVERTED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(
            f"The converted model in {folder} has an unreadable {CONVERTED_MARKER}."
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise CheckpointError(f"The converted model in {folder} has no Wukong configuration.")
    return data


def converted_shapes(folder: Path) -> dict[str, dict[str, Shape]]:
    """Per part, the key -> shape of each weights file in a converted folder (numpy, no torch)."""
    from safetensors import safe_open

    out: dict[str, dict[str, Shape]] = {}
    for part in PARTS:
        path = folder / WEIGHT_FILES[part]
        if not path.is_file():
            raise CheckpointError(f"The converted model in {folder} lacks {WEIGHT_FILES[part]}.")
        try:
            f = safe_open(str(path), framework="np")
            out[part] = {bare_key(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception:
            raise CheckpointError(f"The converted model file {path} could not be read.") from None
    return out


def bare_key(key: str) -> str:
    """A state-dict key without transformers 4's `text_model.` level (the layout's naming)."""
    return key.removeprefix("text_model.")


def source_state(path: Path) -> dict[str, Any]:
    """What identifies a source checkpoint: its name, size and modification time."""
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
