"""Logging set-up for entry points, with a filter that keeps every configured secret out of log lines."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from core.settings import Settings

REDACTED = "***"
_TELEGRAM_TOKEN = re.compile(r"\d{5,}:[A-Za-z0-9_-]{30,}")


class RedactSecrets(logging.Filter):
    """Replaces secret values (and anything shaped like a bot token) in the formatted message."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = tuple(sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return _TELEGRAM_TOKEN.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def secret_values(settings: Settings) -> list[str]:
    """Every secret setting's value and, for URLs such as HUAHUA_DATABASE_URL, the password inside it."""
    values = [
        value.get_secret_value()
        for value in settings.__dict__.values()
        if isinstance(value, SecretStr) and value.get_secret_value()
    ]
    return values + [password for value in values for password in _url_passwords(value)]


def _url_passwords(value: str) -> list[str]:
    if "://" not in value:
        return []
    try:
        password = urlsplit(value).password
    except ValueError:
        return []
    return [password, unquote(password)] if password else []


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secret_values(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # httpx logs every request URL at INFO; Telegram URLs carry the token, so keep it quieter.
    logging.getLogger("httpx").setLevel(logging.WARNING)
