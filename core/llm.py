"""A small client for any OpenAI-compatible `/chat/completions` endpoint (translation, scene planning)."""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
from pydantic import SecretStr

from core.settings import Settings

logger = logging.getLogger(__name__)


class LlmError(ValueError):
    """The endpoint failed, timed out or answered something unusable; callers fall back offline."""


class ChatClient:
    """One request per call; the API key goes in a Bearer header and never into logs or reprs."""

    def __init__(self, base_url: str, model: str, api_key: SecretStr | None, timeout_s: float = 20.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Settings) -> ChatClient:
        return cls(settings.llm_base_url, settings.llm_model, settings.llm_api_key, settings.llm_timeout_s)

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    async def complete(self, system: str, user: str, *, json_object: bool = False) -> str:
        """The first choice's message content; LlmError for any failure."""
        headers = {"Content-Type": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.get_secret_value()}"
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": 0.2,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
        if json_object:
            body["response_format"] = {"type": "json_object"}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(self.url, json=body, headers=headers) as response,
            ):
                if response.status != 200:
                    raise LlmError(f"HTTP status {response.status}")
                payload = json.loads(await response.text())
        except TimeoutError as err:
            raise LlmError("timed out") from err
        except aiohttp.ClientError as err:
            raise LlmError(f"{type(err).__name__}: {err}") from err
        except json.JSONDecodeError as err:
            raise LlmError("the reply is not JSON") from err
        return _content(payload)


def _content(payload: Any) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise LlmError("the reply has no choices[0].message.content") from err
    if not isinstance(content, str):
        raise LlmError("the reply content is not text")
    return content
