import io
import logging
from collections.abc import Iterator

import pytest
from aiohttp.http_exceptions import BadHttpMessage

from core.logs import ClientErrorsBriefly, RateLimit, configure_logging, log_handler
from core.settings import Settings

TOKEN = "123456789:AAE-secret-token-value-abcdefghijklmnop"
API_KEY = "sk-very-secret-key"


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger printing through the entry points' real handler into a string."""
    monkeypatch.setenv("HUAHUA_TELEGRAM_TOKEN", TOKEN)
    monkeypatch.setenv("HUAHUA_LLM_API_KEY", API_KEY)
    out = io.StringIO()
    handler = log_handler(Settings(_env_file=None), out)  # type: ignore[call-arg]
    logger = logging.getLogger("test.logs.redact")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, out
    logger.removeHandler(handler)
    logger.propagate = True


def _fail_with(text: str) -> None:
    raise RuntimeError(f"POST https://api.telegram.org/bot{TOKEN}/getUpdates failed: {text}")


def test_tracebacks_are_redacted(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = logged
    try:
        try:
            _fail_with(API_KEY)
        except RuntimeError as inner:
            raise ConnectionError(f"while using key {API_KEY}") from inner
    except ConnectionError:
        logger.exception("polling failed")
    text = out.getvalue()
    assert "Traceback" in text and "RuntimeError" in text and "ConnectionError" in text
    assert "_fail_with" in text  # the traceback is whole, only the secrets are gone
    assert TOKEN not in text and API_KEY not in text and "AAE-secret" not in text
    assert text.count("***") >= 3


def test_arguments_and_stack_info_are_redacted(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = logged
    logger.warning("request %s with %r", f"https://x/{API_KEY}", {"token": TOKEN})
    logger.info("plain line with no secrets %d", 3)
    logger.info("key %s", API_KEY, stack_info=True)
    text = out.getvalue()
    assert TOKEN not in text and API_KEY not in text
    assert "request https://x/*** with {'token': '***'}" in text
    assert "plain line with no secrets 3" in text
    assert "Stack (most recent call last)" in text


def test_a_bad_format_string_still_logs_and_redacts(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = logged
    logger.error("%d items for %s", "not a number", API_KEY)
    assert API_KEY not in out.getvalue() and "items for" in out.getvalue()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited() -> Iterator[tuple[logging.Logger, list[logging.LogRecord], Clock]]:
    clock = Clock()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("test.logs.limited")
    logger.addFilter(RateLimit(60, clock=clock))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, records, clock
    logger.removeHandler(handler)
    logger.filters.clear()
    logger.propagate = True


def test_rate_limit_lets_one_line_a_minute_through_and_counts_the_rest(
    limited: tuple[logging.Logger, list[logging.LogRecord], Clock],
) -> None:
    logger, records, clock = limited
    for number in range(100):
        logger.warning("refused a request from %s", f"10.0.0.{number}")
        clock.now += 0.1
    logger.warning("another kind of line")
    assert [r.getMessage() for r in records] == ["refused a request from 10.0.0.0", "another kind of line"]
    clock.now += 60
    logger.warning("refused a request from %s", "10.0.0.7")
    assert records[-1].getMessage() == (
        "refused a request from 10.0.0.7 [99 more like this in the last 70 s not logged]"
    )
    clock.now += 61
    logger.warning("refused a request from %s", "10.0.0.8")
    assert records[-1].getMessage() == "refused a request from 10.0.0.8"


def test_rate_limit_keeps_levels_and_exception_types_apart(
    limited: tuple[logging.Logger, list[logging.LogRecord], Clock],
) -> None:
    logger, records, _ = limited
    for error in (ValueError("a"), ValueError("b"), KeyError("c"), KeyError("d")):
        logger.error("handler failed", exc_info=error)
    logger.info("handler failed")
    logger.info("handler failed")
    kinds = [(r.levelname, type(r.exc_info[1]).__name__ if r.exc_info else None) for r in records]
    assert kinds == [("ERROR", "ValueError"), ("ERROR", "KeyError"), ("INFO", None)]


def test_client_errors_lose_their_traceback_but_bugs_keep_it() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("test.logs.client")
    logger.addFilter(ClientErrorsBriefly((BadHttpMessage,)))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise BadHttpMessage("Invalid header\r\nX-Injected: yes 100%")
        except BadHttpMessage as exc:
            logger.exception("Error handling request from %s", "10.0.0.1", exc_info=exc)
        try:
            raise ZeroDivisionError("a real bug")
        except ZeroDivisionError as exc:
            logger.exception("Error handling request from %s", "10.0.0.2", exc_info=exc)
    finally:
        logger.removeHandler(handler)
        logger.filters.clear()
        logger.propagate = True
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Error handling request from 10.0.0.1: BadHttpMessage: 400, message:")
    assert "Invalid header X-Injected: yes 100%" in lines[0]  # one line: the client cannot inject lines
    assert lines[1] == "Error handling request from 10.0.0.2"
    assert lines[2] == "Traceback (most recent call last):" and lines[-1] == "ZeroDivisionError: a real bug"


def test_configure_logging_quiets_chatty_libraries() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    levels = {name: logging.getLogger(name).level for name in ("httpx", "fontTools")}
    try:
        configure_logging(Settings(_env_file=None))  # type: ignore[call-arg]
        assert root.isEnabledFor(logging.INFO)
        assert not logging.getLogger("fontTools.subset").isEnabledFor(logging.INFO)
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
