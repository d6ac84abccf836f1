"""Settings: every field documented in .env.example, environment parsing, secrets hidden."""

from __future__ import annotations

import logging
import re

import pytest
from pydantic import ValidationError

from core.logs import RedactSecrets, secret_values
from core.settings import Settings
from tests.support import REPO


def test_every_setting_is_documented_in_env_example():
    documented = set(re.findall(r"HUAHUA_([A-Z0-9_]+)=", (REPO / ".env.example").read_text()))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "add these to .env.example"
    assert documented - fields == set(), "remove these from .env.example"


def test_environment_is_read_with_the_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("HUAHUA_ENGINE", "tiny")
    monkeypatch.setenv("HUAHUA_WEB_PORT", "9123")
    monkeypatch.setenv("HUAHUA_DATA_DIR", str(tmp_path))
    settings = Settings(_env_file=None)
    assert (settings.engine, settings.web_port) == ("tiny", 9123)
    assert settings.database_path == tmp_path / "huahua.sqlite3"


def test_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("HUAHUA_ENGINE", "dall-e")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


def test_secrets_never_reach_log_lines(monkeypatch, caplog):
    token = "123456789:AAE-secret-token-value-abcdefghijklmnop"
    monkeypatch.setenv("HUAHUA_TELEGRAM_TOKEN", token)
    monkeypatch.setenv("HUAHUA_LLM_API_KEY", "sk-very-secret")
    settings = Settings(_env_file=None)
    assert token not in repr(settings) and "sk-very-secret" not in str(settings)
    redact = RedactSecrets(secret_values(settings))
    logger = logging.getLogger("test.redact")
    logger.addFilter(redact)
    try:
        with caplog.at_level(logging.INFO, logger="test.redact"):
            logger.info("POST https://api.telegram.org/bot%s/getUpdates", token)
            logger.info("key=%s", "sk-very-secret")
            logger.info("other bot 987654321:%s", "B" * 35)
    finally:
        logger.removeFilter(redact)
    text = caplog.text
    assert token not in text and "sk-very-secret" not in text and "B" * 35 not in text
    assert text.count("***") == 3
