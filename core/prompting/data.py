"""Where the editable prompt data lives, and the error raised when one of its files is malformed."""

from __future__ import annotations

from pathlib import Path

from core.errors import HuahuaError

DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"


class PromptDataError(HuahuaError):
    """A file under prompts/ is missing or malformed; the message names the file and the line."""

    code = "prompt_data"


def read_data_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise PromptDataError(f"The prompt data file {path} is missing.") from err
    except UnicodeDecodeError as err:
        raise PromptDataError(f"The prompt data file {path} is not valid UTF-8 text.") from err
    except OSError as err:
        raise PromptDataError(f"The prompt data file {path} cannot be read: {err.strerror}.") from err


def data_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped line) for every line that is neither blank nor a # comment."""
    lines = []
    for number, raw in enumerate(read_data_file(path).splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append((number, line))
    return lines
