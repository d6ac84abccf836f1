"""Model files: download the official weights and vocabulary (resumable), and check a checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from core.errors import CheckpointError, EngineUnavailable, EngineUnreachable
from core.settings import Settings

logger = logging.getLogger(__name__)

CHECKPOINT_URL = "https://download.mindspore.cn/toolkits/minddiffusion/wukong-huahua/wukong-huahua-ms.ckpt"
VOCAB_URL = (
    "https://raw.githubusercontent.com/mindspore-lab/minddiffusion/main/"
    "vision/wukong-huahua/ldm/models/clip_zh/vocab_zh.txt"
)
VOCAB_SHA256 = "45bbac6b341c319adc98a532532882e91a9cefc0329aa57bac9ae761c27b291c"
CHUNK_BYTES = 1 << 20
MAX_PROBLEM_LINES = 10
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class ModelReport:
    """Whether a file is a usable checkpoint, as lines a person can read."""

    path: Path
    ok: bool
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class FetchResult:
    checkpoint: Path
    vocab: Path
    downloaded: tuple[Path, ...]
    """The files that were fetched this time (already present files are left alone)."""


class DownloadInterrupted(CheckpointError):
    """A download stopped partway; the `.part` file stays so the next fetch resumes it."""


def check_model(path: Path | str, settings: Settings | None = None, *, config: Any = None) -> ModelReport:
    """Report whether `path` is a checkpoint with every parameter of the model, in the right shape."""
    path = Path(path)
    from core.diffusion.config import WukongConfig
    from core.torch_engine.files import is_converted

    if is_converted(path):
        return _check_converted(path)
    if path.is_dir():
        return ModelReport(path, False, _directory_lines(path, settings))
    if not path.is_file():
        return ModelReport(path, False, (f"{path}: no such file.",))
    check: Any = _check_official_without_mindspore  # no MindSpore: read it as the torch engine does
    try:
        from core.diffusion.checkpoint import check_checkpoint as check
    except ImportError:
        pass
    cfg = config if config is not None else WukongConfig()
    try:
        report = check(path, cfg)
    except CheckpointError as exc:
        return ModelReport(path, False, (f"{path}: {exc.message}",))
    missing, mismatched, extra = list(report.missing), list(report.mismatched), list(report.extra)
    size_mb = path.stat().st_size / 1e6
    lines = [f"{path} ({size_mb:,.1f} MB)"]
    lines += _section("missing parameter", missing)
    lines += _section("parameter with the wrong shape", [_shapes(item) for item in mismatched])
    if extra:
        lines.append(f"{len(extra)} extra entries (ignored), e.g. {_name(extra[0])}")
    ok = bool(report.ok)
    lines.append("OK: every parameter is present with the expected shape." if ok else "NOT usable.")
    return ModelReport(path, ok, tuple(lines))


def _check_official_without_mindspore(path: Path, config: Any) -> Any:
    """The official layout's names and shapes, read without MindSpore (`core.torch_engine.files`)."""
    from core.torch_engine.files import open_official
    from core.torch_engine.layout import compare, official_shapes

    source = open_official(path)
    try:
        return compare(str(path), official_shapes(config), source.shapes())
    finally:
        source.close()


def _check_converted(folder: Path) -> ModelReport:
    """A folder written by `huahua model convert --to torch`: each part's keys and shapes."""
    from core.torch_engine.files import converted_shapes, read_marker
    from core.torch_engine.layout import PARTS, compare, torch_shapes
    from core.torch_engine.pipeline_config import config_from

    lines = [f"{folder} (converted for the torch engine)"]
    try:
        config = config_from(read_marker(folder)["config"])
        found = converted_shapes(folder)
    except CheckpointError as exc:
        return ModelReport(folder, False, (*lines, exc.message, "NOT usable."))
    expected = torch_shapes(config)
    ok = True
    for part in PARTS:
        report = compare(f"{folder}/{part}", expected[part], found[part])
        ok = ok and report.ok
        lines += _section(f"missing {part} parameter", list(report.missing))
        lines += _section(f"{part} parameter with the wrong shape", [_shapes(i) for i in report.mismatched])
    lines.append("OK: every parameter is present with the expected shape." if ok else "NOT usable.")
    return ModelReport(folder, ok, tuple(lines))


def _directory_lines(path: Path, settings: Settings | None) -> tuple[str, ...]:
    """`model check` was given a folder: say so, and which file in it is the checkpoint."""
    name = settings.checkpoint_path.name if settings else str(Settings.model_fields["checkpoint"].default)
    inside = path / name
    lines = [
        f"{path} is a directory; `huahua model check` reads one checkpoint file (.ckpt or .safetensors)."
    ]
    if inside.is_file():
        lines.append(f"It holds {name}: huahua model check {inside}")
    else:
        lines.append(f"The expected file is {name} (HUAHUA_CHECKPOINT) and it is not in there.")
    return tuple(lines)


def _shapes(item: Any) -> str:
    """A mismatched parameter as `name: expected 320×4×3×3, found 32×4×3×3`."""
    try:
        name, expected, found = item
    except (TypeError, ValueError):
        return _name(item)
    return f"{name}: expected {_shape(expected)}, found {_shape(found)}"


def _shape(shape: Any) -> str:
    if isinstance(shape, tuple | list):
        return "×".join(str(side) for side in shape) if shape else "a scalar"
    return str(shape)


def _section(what: str, items: list[Any]) -> list[str]:
    if not items:
        return []
    lines = [f"{len(items)} {what}{'s' if len(items) != 1 else ''}:"]
    lines += [f"  {_name(item)}" for item in items[:MAX_PROBLEM_LINES]]
    if len(items) > MAX_PROBLEM_LINES:
        lines.append(f"  ... and {len(items) - MAX_PROBLEM_LINES} more")
    return lines


def _name(item: Any) -> str:
    if isinstance(item, tuple | list):
        return " ".join(str(part) for part in item)
    return str(item)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


async def fetch_model(
    settings: Settings,
    progress: bool = True,
    *,
    checkpoint_url: str = CHECKPOINT_URL,
    vocab_url: str = VOCAB_URL,
    vocab_sha256: str = VOCAB_SHA256,
    config: Any = None,
    retries: int = 3,
    vocab_only: bool = False,
) -> FetchResult:
    """Download the vocabulary and the weights into `settings.model_dir` (skipping present files).

    `vocab_only` fetches just the official tokenizer vocabulary (the `tiny` engine has a built-in one).

    Each file is written to `<name>.part` and resumed with an HTTP Range request after a break; it
    becomes `<name>` only once checked (vocabulary by sha256, checkpoint by parameter names and shapes).
    """
    checkpoint, vocab = settings.checkpoint_path, settings.resolved_vocab_path
    downloaded: list[Path] = []
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(sock_connect=30, sock_read=120)
    ) as session:
        if not vocab.is_file() or sha256_file(vocab) != vocab_sha256:
            with _by_hand(vocab_url, vocab, "HUAHUA_VOCAB_PATH"):
                await download(session, vocab_url, vocab, progress=progress, retries=retries)
            _finish(vocab, _vocab_problem(vocab, vocab_sha256))
            downloaded.append(vocab)
        if not vocab_only and not checkpoint.is_file():
            with _by_hand(checkpoint_url, checkpoint, "HUAHUA_MODEL_DIR and HUAHUA_CHECKPOINT"):
                await download(session, checkpoint_url, checkpoint, progress=progress, retries=retries)
            # readers pick the format by suffix, so the file is checked under `<stem>.checking<suffix>`
            checking = checkpoint.with_name(f"{checkpoint.stem}.checking{checkpoint.suffix}")
            _part(checkpoint).replace(checking)
            report = await asyncio.to_thread(check_model, checking, settings, config=config)
            if not report.ok:
                checking.unlink(missing_ok=True)
                raise CheckpointError(
                    f"The downloaded {checkpoint.name} is not usable, so it was deleted:\n{report}"
                )
            checking.replace(checkpoint)
            logger.info("installed %s", checkpoint)
            downloaded.append(checkpoint)
    return FetchResult(checkpoint, vocab, tuple(downloaded))


@contextlib.contextmanager
def _by_hand(url: str, dest: Path, settings_names: str) -> Iterator[None]:
    """When the host cannot be reached, add to the error how to put the file in place by hand."""
    try:
        yield
    except EngineUnreachable as exc:
        raise EngineUnreachable(
            f"{exc.message} To install it by hand, download {_public(url)} on a machine that can, and "
            f"copy it to {dest.resolve()} (or point {settings_names} at where you put it)."
        ) from None


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _vocab_problem(vocab: Path, expected: str) -> str | None:
    actual = sha256_file(_part(vocab))
    return None if actual == expected else f"the vocabulary's sha256 is {actual}, expected {expected}"


def _finish(dest: Path, problem: str | None) -> None:
    """Rename `<dest>.part` to `dest`, or delete it and raise when the check failed."""
    part = _part(dest)
    if problem:
        part.unlink(missing_ok=True)
        raise CheckpointError(
            f"Download of {dest.name} failed: {problem.rstrip('.')}. It was deleted; try again."
        )
    part.replace(dest)
    logger.info("installed %s", dest)


async def download(
    session: aiohttp.ClientSession, url: str, dest: Path, *, progress: bool = True, retries: int = 3
) -> Path:
    """Fetch `url` into `<dest>.part`, resuming what is there; returns the `.part` path."""
    part = _part(dest)
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            await _download_once(session, url, part, progress)
            return part
        except DownloadInterrupted as exc:
            if attempt == retries:
                raise
            logger.warning("%s; resuming (attempt %d of %d)", exc.message, attempt + 2, retries + 1)
            await asyncio.sleep(min(2**attempt, 10) * 0.1)
    return part


async def _download_once(session: aiohttp.ClientSession, url: str, part: Path, progress: bool) -> None:
    have = _size(part)
    headers = {"Range": f"bytes={have}-"} if have else {}
    name = part.name.removesuffix(".part")
    try:
        async with session.get(url, headers=headers) as resp:
            if resp.status == 416 and have:
                total = _total_from_range(resp.headers.get("Content-Range", ""))
                if total == have:
                    return
                _remove(part)
                raise DownloadInterrupted(f"The partial download of {name} did not fit; starting over.")
            if resp.status not in (200, 206):
                raise EngineUnavailable(f"Download of {name} failed: HTTP {resp.status} from {_host(url)}.")
            start = 0
            if resp.status == 206:
                match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                start = int(match.group(1)) if match else -1
                if start != have:
                    raise EngineUnavailable(f"Download of {name}: the server resumed at the wrong place.")
            expected = (resp.content_length + start) if resp.content_length is not None else None
            await _write_body(resp, part, start, expected, name, progress)
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or str(exc.os_error)
        raise EngineUnreachable(f"Cannot reach {_host(url)} to download {name} ({reason}).") from None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, TimeoutError) as exc:
        got = _size(part)
        raise DownloadInterrupted(
            f"The download of {name} stopped after {got:,} bytes ({type(exc).__name__}); "
            "run `huahua model fetch` again to resume."
        ) from None
    except aiohttp.ClientError as exc:
        raise EngineUnavailable(f"Download of {name} failed: {type(exc).__name__}.") from None


async def _write_body(
    resp: aiohttp.ClientResponse, part: Path, start: int, expected: int | None, name: str, progress: bool
) -> None:
    bar = _progress_bar(name, start, expected) if progress else None
    written = start
    try:
        with part.open("r+b" if start else "wb") as handle:
            handle.seek(start)
            handle.truncate()
            async for block in resp.content.iter_chunked(CHUNK_BYTES):
                await asyncio.to_thread(handle.write, block)
                written += len(block)
                if bar is not None:
                    bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
    if expected is not None and written != expected:
        raise aiohttp.ClientPayloadError(f"got {written} of {expected} bytes")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _progress_bar(name: str, start: int, total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=name)


def _total_from_range(value: str) -> int | None:
    tail = value.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _public(url: str) -> str:
    """The URL without user, password or query (which may carry tokens), for messages."""
    try:
        return str(URL(url).with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return _host(url)


def _host(url: str) -> str:
    """The host only: URLs may carry tokens in their query, which must not reach messages or logs."""
    try:
        return URL(url).host or "the server"
    except (ValueError, TypeError):
        return "the server"
