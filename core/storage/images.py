"""The image store port and its file implementation: PNG pictures addressed by their sha256 digest.

Keys are content hashes, so storing the same picture twice is a no-op and any process or host that
shares the store reads the same bytes under the same key.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import os
import re
import tempfile
from pathlib import Path

from core.errors import InvalidOption, NotFound, StorageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DIGEST = re.compile(r"[0-9a-f]{64}")


class ImageStore(abc.ABC):
    """Content-addressed PNG storage."""

    @abc.abstractmethod
    async def put(self, png: bytes) -> str:
        """Store PNG bytes; returns their sha256 hex digest. Storing the same bytes twice is a no-op."""

    @abc.abstractmethod
    async def get(self, digest: str) -> bytes:
        """The PNG bytes; NotFound if absent or if `digest` is not 64 lowercase hex digits."""

    @abc.abstractmethod
    async def exists(self, digest: str) -> bool:
        """Whether a picture with this digest is stored (False for a malformed digest)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections, if any."""


def check_png(png: object) -> bytes:
    """The bytes of a PNG file; InvalidOption for anything else."""
    if not isinstance(png, (bytes, bytearray)) or not png.startswith(PNG_SIGNATURE):
        raise InvalidOption("Only PNG images can be stored.")
    return bytes(png)


def check_digest(digest: object) -> str:
    """A well-formed digest, or NotFound (a malformed one can name no stored picture)."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise NotFound("There is no image with that id.")
    return digest


class FileImageStore(ImageStore):
    """PNG files under `root/<h[:2]>/<h>.png`, written atomically (temporary file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"Cannot create the image directory: {err.strerror}.") from err

    def path(self, digest: str) -> Path:
        digest = check_digest(digest)
        return self.root / digest[:2] / f"{digest}.png"

    async def put(self, png: bytes) -> str:
        data = check_png(png)
        digest = hashlib.sha256(data).hexdigest()
        try:
            await asyncio.to_thread(_write_atomically, self.path(digest), data)
        except OSError as err:
            raise StorageError(f"The image could not be saved: {err.strerror or err}.") from err
        return digest

    async def get(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError as err:
            raise NotFound("That image is no longer stored.") from err

    async def exists(self, digest: str) -> bool:
        try:
            return await asyncio.to_thread(self.path(digest).is_file)
        except NotFound:
            return False

    async def close(self) -> None:
        """Files hold no connection."""


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it; skip if it already exists."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
