"""The `huahua` console script, run through `main()` as a user runs it (real service, tiny engine)."""

import argparse
import asyncio
import io
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import discord
import pytest
from PIL import Image

from bots.cli import _parse, _parser, _runners, main
from core.settings import Settings
from tests.fake_discord import FakeDiscord, api  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No HUAHUA_* from the caller's shell or .env; logging as it was before `main()` set it up."""
    for name in list(os.environ):
        if name.startswith("HUAHUA_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HUAHUA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HUAHUA_MODEL_DIR", str(tmp_path / "models"))
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# options -----------------------------------------------------------------------------------------


def test_global_options_work_after_the_command_too() -> None:
    after = _parse(
        ["imagine", "一只猫", "--ar", "3:2", "--engine", "tiny", "-o", "cat.png", "--data-dir", "d"]
    )
    assert (after.engine, after.data_dir, after.output) == ("tiny", Path("d"), Path("cat.png"))
    assert after.text == "一只猫 --ar 3:2"
    before = _parse(["--engine", "tiny", "--data-dir", "d", "imagine", "一只猫 --ar 3:2"])
    assert (before.engine, before.data_dir, before.text) == ("tiny", Path("d"), "一只猫 --ar 3:2")
    # the words keep their order around the CLI's own options, in any form
    mixed = _parse(
        ["imagine", "--seed", "7", "--output=x.png", "一只", "--engine=http", "猫", "--no", "文字"]
    )
    assert (mixed.text, mixed.output, mixed.engine) == ("--seed 7 一只 猫 --no 文字", Path("x.png"), "http")
    assert _parse(["model", "check", "--engine", "tiny", "ck.safetensors"]).engine == "tiny"
    assert _parse(["web", "--port", "9000", "--data-dir", "w"]).data_dir == Path("w")
    assert not hasattr(_parse(["web"]), "engine")


def test_unknown_options_are_refused_outside_imagine(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(["web", "--ar", "3:2"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --ar 3:2" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert re.fullmatch(r"huahua \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def _actions(parser: argparse.ArgumentParser, path: str = "huahua") -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _actions(child, f"{path} {name}")
        else:
            yield path, action


def test_every_argument_has_help() -> None:
    undocumented = [
        f"{path} {action.dest}" for path, action in _actions(_parser()) if not (action.help or "").strip()
    ]
    assert undocumented == []
    commands = {path for path, _ in _actions(_parser())}
    assert {"huahua imagine", "huahua model check", "huahua db migrate-to", "huahua web"} <= commands


# imagine -----------------------------------------------------------------------------------------


def test_imagine_shows_a_progress_bar_and_the_prompt_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "cat.png"
    code = main(["imagine", "一只猫 --steps 3", "--ar", "2:1", "--engine", "tiny", "-o", str(out_file)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    image = Image.open(io.BytesIO(out_file.read_bytes()))
    assert image.format == "PNG" and image.width == 2 * image.height
    assert captured.out.count("提示词: 一只猫") == 1
    assert captured.out.startswith(f"saved {out_file}\n")
    assert "steps" in captured.out and "untrained test model" in captured.out
    assert "Queued" not in captured.out + captured.err and "position" not in captured.out + captured.err
    bars = captured.err.replace("\r", "\n")
    assert re.search(r"drawing: 100%\|.*\| 3/3 \[\d\d:\d\d<\d\d:\d\d", bars), bars  # elapsed<left
    assert " INFO " not in captured.err  # a one-shot command logs warnings only


def test_imagine_refused_says_why_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["imagine", "一只猫", "--steps", "1000", "--engine", "tiny"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert [line for line in captured.err.splitlines() if line.startswith("huahua:")] == [
        line for line in captured.err.splitlines() if line.strip()
    ]
    assert "steps" in captured.err.lower() and "Traceback" not in captured.err


# model -------------------------------------------------------------------------------------------


def test_model_check_on_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "is a directory" in out and "wukong-huahua-ms.ckpt" in out and "no such file" not in out


# serve and the bots ------------------------------------------------------------------------------


def test_serve_without_tokens_says_which_bots_are_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="huahua")
    runners = _runners("serve", Settings(_env_file=None))  # type: ignore[call-arg]
    assert [runner.__name__ for runner in runners] == ["run_web"]
    assert caplog.messages == [
        "the Telegram bot is off: HUAHUA_TELEGRAM_TOKEN is not set",
        "the Discord bot is off: HUAHUA_DISCORD_TOKEN is not set",
    ]
    caplog.clear()
    with_token = Settings(discord_token="x", _env_file=None)  # type: ignore[call-arg]
    assert [runner.__name__ for runner in _runners("serve", with_token)] == ["run_web", "run_discord"]
    assert caplog.messages == ["the Telegram bot is off: HUAHUA_TELEGRAM_TOKEN is not set"]


def _only_sentence(err: str) -> str:
    assert "Traceback" not in err, err
    sentences = [line for line in err.splitlines() if line.startswith("huahua:")]
    assert len(sentences) == 1, err
    return sentences[0]


def test_discord_without_network_says_so_in_one_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{_closed_port()}/api/v10")
    monkeypatch.setenv("HUAHUA_DISCORD_TOKEN", "some-token")
    assert main(["discord", "--engine", "tiny"]) == 1
    err = capsys.readouterr().err
    assert _only_sentence(err) == "huahua: I can't reach Discord at 127.0.0.1; is the network up?"
    assert "some-token" not in err


async def test_discord_with_a_wrong_token_says_so_in_one_sentence(
    api: FakeDiscord,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HUAHUA_DISCORD_TOKEN", "not-the-token")
    # main() runs its own event loop; the fake Discord keeps answering on this one
    assert await asyncio.to_thread(main, ["discord", "--engine", "tiny"]) == 1
    err = capsys.readouterr().err
    assert _only_sentence(err) == "huahua: Discord refused the bot token: check HUAHUA_DISCORD_TOKEN."
    assert api.find("GET", "/users/@me")


# huahua jobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["web", "worker"])
def test_a_port_in_use_is_one_sentence(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second `huahua web` (or worker) on the same port: which address, why, and what to change."""
    prefix = "WEB" if command == "web" else "WORKER"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv(f"HUAHUA_{prefix}_PORT", str(port))
        assert main([command, "--engine", "tiny"]) == 1
    what = "The web chat" if command == "web" else "The worker"
    assert _only_sentence(capsys.readouterr().err) == (
        f"huahua: {what} cannot listen: 127.0.0.1:{port} is already in use (is another huahua running?). "
        f"Choose another with HUAHUA_{prefix}_HOST and HUAHUA_{prefix}_PORT."
    )


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_a_host_that_is_not_this_machines_is_one_sentence(
    host: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HUAHUA_WEB_HOST", host)
    monkeypatch.setenv("HUAHUA_WEB_PORT", str(_closed_port()))
    assert main(["web", "--engine", "tiny"]) == 1
    assert f"{host} is not a name or address of this machine" in _only_sentence(capsys.readouterr().err)


def test_jobs_needs_a_shared_queue(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["jobs"]) == 1
    assert "set HUAHUA_QUEUE=redis" in capsys.readouterr().err


async def test_jobs_runs_the_shared_queue_and_stops_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    """A real `huahua jobs` process draws a job that a front process (no workers) queued."""
    import signal
    import sys

    from core.types import JobStatus
    from tests.support import make_service, until

    shared = {"queue": "redis", "redis_url": redis_url}
    front = await make_service(tmp_path, workers=0, **shared)
    env = {
        **os.environ,
        "HUAHUA_QUEUE": "redis",
        "HUAHUA_REDIS_URL": redis_url,
        "HUAHUA_ENGINE": "tiny",
        "HUAHUA_DEFAULT_STEPS": "4",
        "HUAHUA_DATA_DIR": str(tmp_path / "data"),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bots.cli", "jobs", env=env, cwd=REPO
    )
    try:
        reply = await front.handle_message("web:room", "web:alice", "/imagine 一只猫 --seed 3")
        assert reply.job is not None

        async def done() -> bool:
            return (await front.get_job(reply.job.id)).status == JobStatus.DONE  # type: ignore[union-attr]

        await until(done, timeout=120.0)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await front.stop()
