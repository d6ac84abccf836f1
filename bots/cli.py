"""`huahua` console script: web, telegram, discord, serve, worker, imagine, model, db."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
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


ONE_SHOT_QUIET = ("imagine",)
"""Commands whose output is the answer itself: they log warnings only, unless HUAHUA_LOG_LEVEL is set."""
_VALUE_OPTIONS = ("--engine", "--data-dir", "-o", "--output")
"""Options of `imagine` that take a value; every other word after `imagine` is part of its text."""


def _version() -> str:
    try:
        return importlib.metadata.version("huahua")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _common() -> argparse.ArgumentParser:
    """Options every command takes, before or after its name: `huahua imagine … --engine tiny`."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    # SUPPRESS: a command's own parser must not overwrite a value given before the command's name
    common.add_argument(
        "--engine",
        choices=["wukong", "tiny", "http"],
        default=argparse.SUPPRESS,
        help="which engine draws: the official model, the tiny test model, or a remote worker "
        "(overrides HUAHUA_ENGINE)",
    )
    common.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="where the database and the pictures live (overrides HUAHUA_DATA_DIR)",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="huahua",
        description=__doc__,
        parents=[common],
        allow_abbrev=False,
        epilog="Settings come from HUAHUA_* variables and .env (see .env.example); "
        "`huahua COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"huahua {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=help, parents=[common], allow_abbrev=False, **kwargs
        )

    web = command("web", "the local web chat")
    web.add_argument("--host", help="address to listen on (overrides HUAHUA_WEB_HOST)")
    web.add_argument("--port", type=int, help="port to listen on (overrides HUAHUA_WEB_PORT)")
    command("telegram", "the Telegram bot (HUAHUA_TELEGRAM_TOKEN)")
    command("discord", "the Discord bot (HUAHUA_DISCORD_TOKEN)")
    command("serve", "the web chat and every adapter with a token, in one process")
    command(
        "jobs",
        "only run jobs from the shared queue on this host's engine (no web chat, no bots); "
        "needs HUAHUA_QUEUE=redis",
    )
    worker = command("worker", "serve the engine over HTTP for `HUAHUA_ENGINE=http` bots")
    worker.add_argument("--host", help="address to listen on (overrides HUAHUA_WORKER_HOST)")
    worker.add_argument("--port", type=int, help="port to listen on (overrides HUAHUA_WORKER_PORT)")
    imagine = command(
        "imagine",
        "one picture, no chat: huahua imagine 一只猫在月亮上 --ar 3:2 -o out.png",
        epilog="Every /imagine option works here (--ar --seed --steps --n --no --style --guidance); "
        "the words and those options may come in any order, quoted or not.",
    )
    imagine.add_argument("text", nargs="+", help="what to draw, with any /imagine options")
    imagine.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("huahua.png"),
        metavar="FILE",
        help="where to save the picture (several pictures: FILE-1.png, FILE-2.png, …); default huahua.png",
    )
    model = command("model", "fetch or check the official weights")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    fetch = model_sub.add_parser(
        "fetch",
        help="download the checkpoint and the vocabulary into HUAHUA_MODEL_DIR",
        parents=[common],
        allow_abbrev=False,
    )
    fetch.add_argument(
        "--vocab-only", action="store_true", help="only vocab_zh.txt (the tiny engine has a built-in one)"
    )
    check = model_sub.add_parser(
        "check", help="is this file a usable Wukong-Huahua checkpoint?", parents=[common], allow_abbrev=False
    )
    check.add_argument(
        "path",
        nargs="?",
        type=Path,
        help="a .ckpt or .safetensors file (default: HUAHUA_MODEL_DIR/HUAHUA_CHECKPOINT)",
    )
    convert = model_sub.add_parser(
        "convert",
        help="write the checkpoint as PyTorch weights for HUAHUA_ENGINE=torch",
        parents=[common],
        allow_abbrev=False,
    )
    convert.add_argument("path", nargs="?", type=Path, help="the checkpoint (default: HUAHUA_CHECKPOINT)")
    convert.add_argument(
        "--to", choices=["torch"], required=True, help="the layout to write: torch (diffusers folders)"
    )
    convert.add_argument("--out", type=Path, help="folder (default: HUAHUA_MODEL_DIR/wukong-huahua-torch)")
    db = command("db", "database tools")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    migrate_to = db_sub.add_parser(
        "migrate-to",
        help="copy jobs, settings, stories and counters into a PostgreSQL database",
        parents=[common],
        allow_abbrev=False,
    )
    migrate_to.add_argument("url", help="postgresql://user:password@host:5432/db, or - to read it from stdin")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; `imagine` keeps every word that is not one of its options, in order."""
    parser = _parser()
    words = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(words)
    if args.command == "imagine":
        args.text = _imagine_text(words[words.index("imagine") + 1 :])
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _imagine_text(words: list[str]) -> str:
    kept: list[str] = []
    skip_value = False
    for word in words:
        if skip_value:
            skip_value = False
        elif word in _VALUE_OPTIONS:
            skip_value = True
        elif word.split("=", 1)[0] in _VALUE_OPTIONS or (word.startswith("-o") and not word.startswith("--")):
            pass  # --output=FILE, -oFILE
        else:
            kept.append(word)
    return " ".join(kept)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "engine", None):
        overrides["engine"] = args.engine
    if getattr(args, "data_dir", None):
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
    args = _parse(argv)
    try:
        settings = _settings(args)
    except Exception as err:  # pydantic's ValidationError: show it without a stack
        print(f"huahua: invalid settings: {err}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if args.command in ONE_SHOT_QUIET and "log_level" not in settings.model_fields_set:
        logging.getLogger().setLevel(logging.WARNING)
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
    if command == "serve":
        for bot, variable in (("Telegram", "HUAHUA_TELEGRAM_TOKEN"), ("Discord", "HUAHUA_DISCORD_TOKEN")):
            if not getattr(settings, variable.removeprefix("HUAHUA_").lower()):
                logger.info("the %s bot is off: %s is not set", bot, variable)
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
        if reply.job is None:
            for text in reply.texts:
                print(f"huahua: {text}", file=sys.stderr)
            return 1
        # the queued reply (position, prompt) is not shown: the prompt comes once, with the result
        await _follow(service, reply.job)
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


async def _follow(service: Any, job: Any) -> None:
    """A progress bar with the time left, from the job's events until it ends."""
    from tqdm import tqdm

    from core.types import EventType

    bar = tqdm(total=job.request.steps, desc="starting", unit="step", file=sys.stderr, dynamic_ncols=True)
    drawing = False
    try:
        async for event in service.subscribe(job.id):
            if event.type != EventType.PROGRESS or not event.total_steps:
                continue
            if not drawing:  # the clock starts with the first step: loading the engine is not drawing
                bar.reset(total=event.total_steps)
                bar.set_description("drawing")
                drawing = True
            bar.update(event.step - bar.n)
    finally:
        bar.close()


def _numbered(path: Path, number: int) -> Path:
    return path.with_name(f"{path.stem}-{number}{path.suffix}")


async def _model(args: argparse.Namespace, settings: Settings) -> int:
    from core.model_files import check_model, fetch_model

    if args.model_command == "fetch":
        await fetch_model(settings, vocab_only=args.vocab_only)
        return 0
    if args.model_command == "convert":
        from core.engines.pytorch import convert_to_torch

        out = await asyncio.to_thread(convert_to_torch, settings, args.path, args.out)
        print(f"wrote {out}; HUAHUA_ENGINE=torch loads it from there")
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
