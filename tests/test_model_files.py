import hashlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from core.errors import CheckpointError, EngineUnavailable
from core.model_files import DownloadInterrupted, check_model, download, fetch_model, sha256_file
from core.settings import Settings
from core.vocabulary import builtin_vocabulary_text

VOCAB = builtin_vocabulary_text().encode("utf-8")
"""A vocabulary to serve: the built-in one, checked by its own sha256 (the official file is not here)."""
VOCAB_SHA256 = hashlib.sha256(VOCAB).hexdigest()


@dataclass
class FileServer:
    """A loopback download server with Range support that can cut a response short."""

    files: dict[str, bytes]
    drop_after: dict[str, int] = field(default_factory=dict)
    honour_range: bool = True
    ranges: list[str | None] = field(default_factory=list)
    server: TestServer | None = None

    def url(self, name: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(f"/{name}"))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in self.files:
            raise web.HTTPNotFound()
        data = self.files[name]
        header = request.headers.get("Range")
        self.ranges.append(header)
        start = 0
        status = 200
        headers = {}
        if header and self.honour_range:
            start = int(header.removeprefix("bytes=").removesuffix("-"))
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        cut = self.drop_after.pop(name, None)
        if cut is not None:
            await response.write(body[:cut])
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(body)
        await response.write_eof()
        return response


@pytest.fixture
async def files() -> AsyncIterator[FileServer]:
    state = FileServer(files={})
    app = web.Application()
    app.router.add_get("/{name}", state.handle)
    state.server = TestServer(app, host="127.0.0.1")
    await state.server.start_server()
    yield state
    await state.server.close()


PAYLOAD = bytes(range(256)) * 4000  # about 1 MB


async def test_download_resumes_after_a_dropped_connection(files: FileServer, tmp_path: Path) -> None:
    files.files["blob"] = PAYLOAD
    files.drop_after["blob"] = 300_000
    dest = tmp_path / "blob"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(DownloadInterrupted, match="huahua model fetch"):
            await download(session, files.url("blob"), dest, progress=False, retries=0)
        part = dest.with_name("blob.part")
        partial = part.stat().st_size
        assert 0 < partial < len(PAYLOAD)
        assert part.read_bytes() == PAYLOAD[:partial]
        assert await download(session, files.url("blob"), dest, progress=False, retries=0) == part
    assert part.read_bytes() == PAYLOAD
    assert files.ranges == [None, f"bytes={partial}-"]


async def test_download_retries_by_itself(files: FileServer, tmp_path: Path) -> None:
    files.files["blob"] = PAYLOAD
    files.drop_after["blob"] = 100_000
    async with aiohttp.ClientSession() as session:
        part = await download(session, files.url("blob"), tmp_path / "blob", progress=True, retries=2)
    assert part.read_bytes() == PAYLOAD
    assert files.ranges[0] is None and files.ranges[1] is not None and len(files.ranges) == 2


async def test_server_without_range_support_restarts_from_zero(files: FileServer, tmp_path: Path) -> None:
    files.files["blob"] = PAYLOAD
    files.honour_range = False
    (tmp_path / "blob.part").write_bytes(b"stale bytes that are not the start of the file")
    async with aiohttp.ClientSession() as session:
        part = await download(session, files.url("blob"), tmp_path / "blob", progress=False)
    assert part.read_bytes() == PAYLOAD


async def test_complete_part_file_is_not_downloaded_again(files: FileServer, tmp_path: Path) -> None:
    files.files["blob"] = PAYLOAD
    (tmp_path / "blob.part").write_bytes(PAYLOAD)
    async with aiohttp.ClientSession() as session:
        part = await download(session, files.url("blob"), tmp_path / "blob", progress=False)
    assert part.read_bytes() == PAYLOAD
    assert files.ranges == [f"bytes={len(PAYLOAD)}-"]


async def test_missing_file_and_unreachable_server_are_friendly(files: FileServer, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        with pytest.raises(EngineUnavailable, match="HTTP 404"):
            await download(session, files.url("nope"), tmp_path / "nope", progress=False)
        with pytest.raises(EngineUnavailable, match=r"Cannot reach 127\.0\.0\.1") as info:
            await download(session, f"http://127.0.0.1:{closed_port}/x?token=s3cret", tmp_path / "x")
    assert "s3cret" not in str(info.value)


def _settings(tmp_path: Path) -> Settings:
    return Settings(model_dir=tmp_path / "models", _env_file=None)  # type: ignore[call-arg]


async def test_vocab_is_checked_by_sha256(files: FileServer, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    files.files["vocab.txt"] = VOCAB[:-10] + b"tampered\n"
    with pytest.raises(CheckpointError, match="sha256"):
        await fetch_model(
            settings,
            False,
            vocab_url=files.url("vocab.txt"),
            vocab_sha256=VOCAB_SHA256,
            checkpoint_url=files.url("ck"),
        )
    assert list((tmp_path / "models").iterdir()) == []


async def test_present_files_are_not_fetched_again(files: FileServer, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    settings.model_dir.mkdir()
    settings.resolved_vocab_path.write_bytes(VOCAB)
    settings.checkpoint_path.write_bytes(b"already here")
    result = await fetch_model(
        settings,
        False,
        vocab_url=files.url("vocab.txt"),
        vocab_sha256=VOCAB_SHA256,
        checkpoint_url=files.url("ck"),
    )
    assert result.downloaded == ()
    assert files.ranges == []
    assert sha256_file(settings.resolved_vocab_path) == VOCAB_SHA256


def test_check_model_on_a_missing_file(tmp_path: Path) -> None:
    report = check_model(tmp_path / "absent.ckpt")
    assert not report.ok
    assert "no such file" in str(report)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from core.diffusion import WukongConfig, WukongPipeline, save_checkpoint

    path = tmp_path_factory.mktemp("ck") / "tiny.ckpt"
    save_checkpoint(WukongPipeline.random(WukongConfig.tiny(), None, seed=0), path)
    return path.read_bytes()


async def test_fetch_installs_checked_files_and_resumes(
    files: FileServer, tmp_path: Path, tiny_checkpoint: bytes
) -> None:
    from core.diffusion import WukongConfig

    settings = _settings(tmp_path)
    files.files["vocab.txt"] = VOCAB
    files.files["tiny.ckpt"] = tiny_checkpoint
    files.drop_after["tiny.ckpt"] = len(tiny_checkpoint) // 3
    result = await fetch_model(
        settings,
        False,
        vocab_url=files.url("vocab.txt"),
        vocab_sha256=VOCAB_SHA256,
        checkpoint_url=files.url("tiny.ckpt"),
        config=WukongConfig.tiny(),
    )
    assert result.downloaded == (settings.resolved_vocab_path, settings.checkpoint_path)
    assert settings.checkpoint_path.read_bytes() == tiny_checkpoint
    assert settings.resolved_vocab_path.read_bytes() == VOCAB
    assert sorted(p.name for p in settings.model_dir.iterdir()) == ["vocab_zh.txt", "wukong-huahua-ms.ckpt"]
    resumed_at = int(str(files.ranges[-1]).removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(tiny_checkpoint) // 3  # the second request continued the first
    report = check_model(settings.checkpoint_path, settings, config=WukongConfig.tiny())
    assert report.ok and "OK" in report.text


async def test_a_checkpoint_for_another_model_is_refused_and_deleted(
    files: FileServer, tmp_path: Path, tiny_checkpoint: bytes
) -> None:
    settings = _settings(tmp_path)
    files.files["vocab.txt"] = VOCAB
    files.files["tiny.ckpt"] = tiny_checkpoint
    with pytest.raises(CheckpointError, match="wrong shape"):
        await fetch_model(
            settings,
            False,
            vocab_url=files.url("vocab.txt"),
            vocab_sha256=VOCAB_SHA256,
            checkpoint_url=files.url("tiny.ckpt"),
        )
    assert not settings.checkpoint_path.exists()
    assert sorted(p.name for p in settings.model_dir.iterdir()) == ["vocab_zh.txt"]
    assert settings.resolved_vocab_path.is_file()


def test_check_model_reports_problems_by_name(tmp_path: Path, tiny_checkpoint: bytes) -> None:
    path = tmp_path / "tiny.ckpt"
    path.write_bytes(tiny_checkpoint)
    report = check_model(path)  # against the official model
    assert not report.ok
    assert "wrong shape" in report.text and "model.diffusion_model." in report.text
    assert report.text.endswith("NOT usable.")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00\x01garbage" * 1000)
    report = check_model(garbage)
    assert not report.ok and "corrupt" in report.text
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(tiny_checkpoint[: len(tiny_checkpoint) // 2])
    assert not check_model(truncated).ok


async def test_vocab_only_fetches_just_the_vocabulary(files: FileServer, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    files.files["vocab.txt"] = VOCAB
    result = await fetch_model(
        settings,
        False,
        vocab_url=files.url("vocab.txt"),
        vocab_sha256=VOCAB_SHA256,
        checkpoint_url=files.url("ck"),
        vocab_only=True,
    )
    assert result.downloaded == (settings.resolved_vocab_path,)
    assert sorted(p.name for p in settings.model_dir.iterdir()) == ["vocab_zh.txt"]


def test_check_model_on_a_directory_names_the_file_it_expects(tmp_path: Path) -> None:
    report = check_model(tmp_path)
    assert not report.ok and "no such file" not in report.text
    assert (
        report.lines[0] == f"{tmp_path} is a directory; `huahua model check` reads one checkpoint file "
        "(.ckpt or .safetensors)."
    )
    assert "wukong-huahua-ms.ckpt (HUAHUA_CHECKPOINT)" in report.text
    (tmp_path / "wukong-huahua-ms.ckpt").write_bytes(b"weights")
    report = check_model(tmp_path, Settings(model_dir=tmp_path, _env_file=None))  # type: ignore[call-arg]
    assert (
        report.lines[-1]
        == f"It holds wukong-huahua-ms.ckpt: huahua model check {tmp_path / 'wukong-huahua-ms.ckpt'}"
    )


def test_check_model_labels_the_expected_and_the_found_shape(tmp_path: Path, tiny_checkpoint: bytes) -> None:
    import re

    path = tmp_path / "tiny.ckpt"
    path.write_bytes(tiny_checkpoint)
    lines = check_model(path).lines
    shapes = [line for line in lines if ": expected " in line]
    assert shapes, lines
    name, _, sizes = shapes[0].strip().partition(": ")
    assert name.startswith("model.") and " " not in name
    expected, found = sizes.removeprefix("expected ").split(", found ")
    assert expected != found
    assert re.fullmatch(r"\d+(×\d+)*", expected) and re.fullmatch(r"\d+(×\d+)*", found)


async def test_offline_fetch_says_how_to_place_the_files_by_hand(tmp_path: Path) -> None:
    from core.errors import EngineUnreachable

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://user:pw@127.0.0.1:{sock.getsockname()[1]}"
    settings = _settings(tmp_path)
    with pytest.raises(EngineUnreachable) as vocab_error:
        await fetch_model(settings, False, vocab_url=f"{closed}/vocab_zh.txt?token=s3cret", retries=0)
    message = vocab_error.value.message
    assert message.startswith("Cannot reach 127.0.0.1 to download vocab_zh.txt (")
    assert f"download {closed.replace('user:pw@', '')}/vocab_zh.txt on a machine that can" in message
    assert str(settings.resolved_vocab_path.resolve()) in message and "HUAHUA_VOCAB_PATH" in message
    assert "s3cret" not in message and "pw@" not in message

    settings.resolved_vocab_path.parent.mkdir(parents=True, exist_ok=True)
    settings.resolved_vocab_path.write_text("[PAD]\n")
    with pytest.raises(EngineUnreachable) as checkpoint_error:
        await fetch_model(
            settings,
            False,
            vocab_url=f"{closed}/vocab_zh.txt",
            vocab_sha256=hashlib.sha256(b"[PAD]\n").hexdigest(),
            checkpoint_url=f"{closed}/wukong-huahua-ms.ckpt",
            retries=0,
        )
    message = checkpoint_error.value.message
    assert "download wukong-huahua-ms.ckpt (" in message
    assert str(settings.checkpoint_path.resolve()) in message
    assert "HUAHUA_MODEL_DIR and HUAHUA_CHECKPOINT" in message
