from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from core.errors import InvalidOption, NotFound
from core.storage.images import PNG_SIGNATURE, FileImageStore

PNG = PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR fake but signed"


async def test_images_dedupe_atomic_and_traversal(tmp_path: Path) -> None:
    store = FileImageStore(tmp_path / "images")
    digest = await store.put(PNG)
    assert digest == hashlib.sha256(PNG).hexdigest()
    path = store.path(digest)
    assert path == tmp_path / "images" / digest[:2] / f"{digest}.png"
    assert path.read_bytes() == PNG
    mtime = path.stat().st_mtime_ns
    assert await store.put(PNG) == digest
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    assert await store.get(digest) == PNG

    many = await asyncio.gather(*(store.put(PNG + bytes([i % 3])) for i in range(12)))
    assert len(set(many)) == 3
    for h in set(many):
        assert (await store.get(h)).startswith(PNG)

    with pytest.raises(NotFound):
        await store.get("0" * 64)
    for hostile in ("../../etc/passwd", "A" * 64, "0" * 63, "0" * 64 + "/x", "", 123):
        with pytest.raises(NotFound):
            store.path(hostile)  # type: ignore[arg-type]
        with pytest.raises(NotFound):
            await store.get(hostile)  # type: ignore[arg-type]
    for bad in (b"", b"GIF89a...", "text"):
        with pytest.raises(InvalidOption):
            await store.put(bad)  # type: ignore[arg-type]


async def test_exists(tmp_path: Path) -> None:
    store = FileImageStore(tmp_path / "images")
    digest = await store.put(PNG)
    assert await store.exists(digest)
    assert not await store.exists("0" * 64)
    assert not await store.exists("../x")
