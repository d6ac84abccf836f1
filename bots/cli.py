"""`huahua` console script: web, telegram, discord, serve, worker, imagine, model, db."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from core.errors import HuahuaError
from core.logs import configure_logging
from core.settings import Settings

logger = logging.getLogger("huahua")

Runner = Callable[[Any, Settings], Awaitable[None]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="huahua", description=__doc__)
    parser.add_argument("--engine", choices=["wukong", "tiny", "http"], help="override HUAHUA_ENGINE")
    parser.add_argument("--data-dir", type=Path, help="override HUAHUA_DATA_DIR")
    sub = parser.add_subparsers(dest="command", required=True)
    web = sub.add_parser("web", help="the local web chat")
    web.add_argument("--host")
    web.add_argument("--port", type=int)
    sub.add_parser("telegram", help="the Telegram bot (HUAHUA_TELEGRAM_TOKEN)")
    sub.add_parser("discord", help="the Discord bot (HUAHUA_DISCORD_TOKEN)")
    sub.add_parser("serve", help="the web chat and every adapter with a token, in one process")
    sub.add_parser(
        "jobs",
        help="only run jobs from the shared queue on this host's engine (no web chat, no bots); "
        "needs HUAHUA_QUEUE=redis",
    )
    worker = sub.add_parser("worker", help="serve the engine over HTTP for `HUAHUA_ENGINE=http` bots")
    worker.add_argument("--host")
    worker.add_argument("--port", type=int)
    imagine = sub.add_parser(
        "imagine", help="one picture, no chat: huahua imagine 'text --ar 3:2' -o out.png"
    )
    imagine.add_argument("text")
    imagine.add_argument("-o", "--output", type=Path, default=Path("huahua.png"))
    model = sub.add_parser("model", help="fetch or check the official weights")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    fetch = model_sub.add_parser(
        "fetch", help="download the checkpoint and the vocabulary into HUAHUA_MODEL_DIR"
    )
    fetch.add_argument(
        "--vocab-only", action="store_true", help="only vocab_zh.txt (the tiny engine has a built-in one)"
    )
    check = model_sub.add_parser("check", help="is this file a usable Wukong-Huahua checkpoint?")
    check.add_argument("path", nargs="?", type=Path)
    db = sub.add_parser("db", help="database tools")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    migrate_to = db_sub.add_parser(
        "migrate-to", help="copy jobs, settings, stories and counters into a PostgreSQL database"
    )
    migrate_to.add_argument("url", help="postgresql://user:password@host:5432/db, or - to read it from stdin")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if args.engine:
        overrides["engine"] = args.engine
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.command == "web":
        if args.host:
            overrides["web_host"] = args.host
        if args.port:
            overrides["web_port"] = args.port
    if args.command == "worker":
        if args.host:
            overrides["worker_host"] = args.host
        if args.port:
            overrides["worker_port"] = args.port
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except Exception as err:  # pydantic's ValidationError: show it without a stack
        print(f"huahua: invalid settings: {err}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        return asyncio.run(_run(args, settings))
    except KeyboardInterrupt:
        return 130
    except HuahuaError as err:
        print(f"huahua: {err.message}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "model":
        return await _model(args, settings)
    if args.command == "worker":
        from core.worker_server import serve_worker

        await _until_signal(serve_worker(settings))
        return 0
    if args.command == "imagine":
        return await _imagine(args, settings)
    if args.command == "db":
        return await _db(args, settings)
    if args.command == "jobs" and (settings.queue != "redis" or settings.workers < 1):
        raise HuahuaError(
            "`huahua jobs` takes work from a shared queue: set HUAHUA_QUEUE=redis (with "
            "HUAHUA_REDIS_URL) and HUAHUA_WORKERS to 1 or more."
        )
    runners = _runners(args.command, settings)
    from core.app import build_service

    service = await build_service(settings)
    adapters = asyncio.gather(*(runner(service, settings) for runner in runners))
    # Let each adapter register its event listeners before recovered jobs start emitting events.
    await asyncio.sleep(0)
    try:
        await service.start()
        await _until_signal(adapters if runners else asyncio.Event().wait())
    finally:
        adapters.cancel()
        await service.stop()
    return 0


def _runners(command: str, settings: Settings) -> list[Runner]:
    runners: list[Runner] = []
    if command in ("web", "serve"):
        from bots.web.app import run_web

        runners.append(run_web)
    if command == "telegram" or (command == "serve" and settings.telegram_token):
        if not settings.telegram_token:
            raise HuahuaError("Set HUAHUA_TELEGRAM_TOKEN to the token @BotFather gave you.")
        from bots.telegram.bot import run_telegram

        runners.append(run_telegram)
    if command == "discord" or (command == "serve" and settings.discord_token):
        if not settings.discord_token:
            raise HuahuaError("Set HUAHUA_DISCORD_TOKEN to your Discord application's bot token.")
        from bots.discord.bot import run_discord

        runners.append(run_discord)
    return runners


async def _until_signal(work: Awaitable[Any]) -> None:
    """Run until the work ends or SIGINT/SIGTERM arrives, then cancel it for a graceful shutdown."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _imagine(args: argparse.Namespace, settings: Settings) -> int:
    from core.app import build_service
    from core.types import JobStatus

    service = await build_service(settings)
    await service.start(recover=False)  # other processes' unfinished jobs are theirs to finish
    try:
        reply = await service.handle_message("cli:local", "cli:local", f"/imagine {args.text}")
        for text in reply.texts:
            print(text)
        if reply.job is None:
            return 1
        async for event in service.subscribe(reply.job.id):
            if event.total_steps:
                print(f"\rstep {event.step}/{event.total_steps}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        job = await service.get_job(reply.job.id)
        if job.status != JobStatus.DONE:
            print(job.error or f"The job ended {job.status}.", file=sys.stderr)
            return 1
        for index, digest in enumerate(job.images):
            path = args.output if len(job.images) == 1 else _numbered(args.output, index + 1)
            path.write_bytes(await service.image(digest))
            print(f"saved {path}")
        from core.presenter import describe

        print(describe(job))
        return 0
    finally:
        await service.stop()


def _numbered(path: Path, number: int) -> Path:
    return path.with_name(f"{path.stem}-{number}{path.suffix}")


async def _model(args: argparse.Namespace, settings: Settings) -> int:
    from core.model_files import check_model, fetch_model

    if args.model_command == "fetch":
        await fetch_model(settings, vocab_only=args.vocab_only)
        return 0
    report = await asyncio.to_thread(check_model, args.path or settings.checkpoint_path, settings)
    print(report.text if hasattr(report, "text") else report)
    return 0 if report.ok else 1


async def _db(args: argparse.Namespace, settings: Settings) -> int:
    """`huahua db migrate-to URL`: copy the current store into PostgreSQL (see core/storage/transfer.py)."""
    from core.app import open_store
    from core.storage.transfer import migrate_to

    url = sys.stdin.readline().strip() if args.url == "-" else args.url
    source = await open_store(settings)
    try:
        for line in await migrate_to(source, url, settings):
            print(line)
    finally:
        await source.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
