"""The remote engine: talks to `huahua worker` over HTTP, plus the wire format both sides share.

`POST /v1/generate` takes the GenerationRequest fields as JSON (`init_image` and each of
`reference_images` base64; `references` are the pictures' digests) and answers
newline-delimited JSON: `{"type":"progress","step":i,"total":n}` lines, then one
`{"type":"result","images":[...]}` or `{"type":"error","code":...,"message":...}` line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import Annotated, Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core import errors
from core.engine import (
    MAX_IMAGES_PER_REQUEST,
    MAX_REFERENCES,
    CancelToken,
    Engine,
    EngineLimits,
    ProgressCallback,
    configured_limits,
)
from core.errors import EngineUnavailable, EngineUnreachable, HuahuaError, InvalidOption, JobCancelled
from core.settings import Settings
from core.types import GeneratedImage, GenerationRequest

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-Huahua-Secret"
MAX_INIT_IMAGE_B64 = 28 * 1024 * 1024
CANCEL_POLL_S = 0.05
MAX_LINE_BYTES = 256 * 1024 * 1024
HEALTH_TIMEOUT_S = 10.0
LIMITS_TTL_S = 60.0
"""How long the worker's limits are trusted before `fetch_limits` asks again (a worker may restart
with another engine)."""


# wire format


class WireRequest(BaseModel):
    """The JSON body of `POST /v1/generate`, parsed strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=10_000)
    negative_prompt: str = Field("", max_length=10_000)
    width: int = Field(512, ge=8, le=4096)
    height: int = Field(512, ge=8, le=4096)
    steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0, le=100)
    seed: int = Field(0, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=16)
    sampler: str = Field("dpm++2m", max_length=32)
    init_image: str | None = Field(None, max_length=MAX_INIT_IMAGE_B64)
    strength: float = Field(0.0, ge=0, le=1)
    references: list[str] = Field(default_factory=list, max_length=MAX_REFERENCES)
    consistency: float = Field(0.0, ge=0, le=2)
    reference_images: list[str] = Field(default_factory=list, max_length=MAX_REFERENCES)
    reference_words: list[Annotated[str, Field(max_length=1_000)]] = Field(
        default_factory=list, max_length=MAX_REFERENCES
    )
    panels: list[Annotated[str, Field(max_length=10_000)]] = Field(
        default_factory=list, max_length=MAX_IMAGES_PER_REQUEST
    )
    panel_rate: float = Field(0.0, ge=0, le=1)

    @field_validator("references", "reference_images")
    @classmethod
    def _short_entries(cls, values: list[str]) -> list[str]:
        if any(len(value) > MAX_INIT_IMAGE_B64 for value in values):
            raise ValueError("an entry is too long")
        return values

    @field_validator("guidance_scale", "strength", "consistency", "panel_rate", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def request_to_wire(request: GenerationRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "guidance_scale": float(request.guidance_scale),
        "seed": request.seed,
        "n": request.n,
        "sampler": request.sampler,
        "strength": float(request.strength),
    }
    if request.init_image is not None:
        body["init_image"] = base64.b64encode(request.init_image).decode("ascii")
    if request.references or request.reference_images or request.consistency:
        body["references"] = list(request.references)
        body["consistency"] = float(request.consistency)
        body["reference_images"] = [base64.b64encode(png).decode("ascii") for png in request.reference_images]
    if request.reference_words:
        body["reference_words"] = list(request.reference_words)
    if request.panels:  # only then: a worker from before panels refuses no plain request
        body["panels"] = list(request.panels)
        body["panel_rate"] = float(request.panel_rate)
    return body


def request_from_wire(body: Any) -> GenerationRequest:
    """Parse a decoded JSON body; raise InvalidOption naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidOption("The request body must be a JSON object.")
    try:
        wire = WireRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidOption(f"Invalid field {where!r}: {first['msg']}.") from None
    init_image = None
    if wire.init_image is not None:
        try:
            init_image = base64.b64decode(wire.init_image, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidOption("Invalid field 'init_image': not base64.") from None
    references = []
    for text in wire.reference_images:
        try:
            references.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidOption("Invalid field 'reference_images': not base64.") from None
    values = wire.model_dump(exclude={"init_image", "reference_images"})
    for name in ("references", "reference_words", "panels"):
        values[name] = tuple(values[name])
    return GenerationRequest(**values, init_image=init_image, reference_images=tuple(references))


def image_to_wire(image: GeneratedImage) -> dict[str, Any]:
    return {
        "png": base64.b64encode(image.png).decode("ascii"),
        "width": image.width,
        "height": image.height,
        "seed": image.seed,
    }


def image_from_wire(item: Any) -> GeneratedImage:
    try:
        return GeneratedImage(
            png=base64.b64decode(item["png"], validate=True),
            width=int(item["width"]),
            height=int(item["height"]),
            seed=int(item["seed"]),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise EngineUnavailable("The image worker sent a malformed image.") from exc


def error_to_wire(exc: HuahuaError) -> dict[str, Any]:
    return {"type": "error", "code": exc.code, "message": exc.message}


def _error_classes() -> dict[str, type[HuahuaError]]:
    found: dict[str, type[HuahuaError]] = {}
    pending: list[type[HuahuaError]] = [HuahuaError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == errors.__name__:
            found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def error_from_wire(line: dict[str, Any]) -> HuahuaError:
    """Map a worker's error code back to the matching core.errors class."""
    code = str(line.get("code", "error"))
    message = str(line.get("message") or "The image worker failed.")
    cls = _error_classes().get(code, EngineUnavailable)
    if cls is JobCancelled:
        return JobCancelled(message)
    return cls(message)


# the client engine


class HttpEngine(Engine):
    """Sends each request to a remote `huahua worker`; the worker does the model work."""

    name = "http"

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        timeout_s: float = 600.0,
        fallback_limits: EngineLimits | None = None,
    ) -> None:
        """`fallback_limits` size requests until the worker reports its own (an older worker never does)."""
        self.url = url.rstrip("/")
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
        self._session: aiohttp.ClientSession | None = None
        if fallback_limits is not None:
            self.limits = fallback_limits
        self._limits_at: float | None = None
        self._limits_lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpEngine:
        secret = settings.worker_secret.get_secret_value() if settings.worker_secret else None
        return cls(
            settings.worker_url,
            secret=secret,
            timeout_s=settings.worker_timeout_s,
            fallback_limits=configured_limits(settings),
        )

    def _headers(self) -> dict[str, str]:
        return {SECRET_HEADER: self._secret} if self._secret else {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers())
        return self._session

    def _unreachable(self) -> EngineUnreachable:
        return EngineUnreachable(
            f"The image worker at {self.url} cannot be reached; is `huahua worker` running there?"
        )

    async def start(self) -> None:
        info = await self.health()
        if info.get("ready"):
            self.label = str(info.get("label") or "")
        else:
            logger.warning("image worker at %s is not ready: %s", self.url, info.get("error"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch_limits(self) -> EngineLimits:
        """The worker's limits (asked at most every LIMITS_TTL_S); the last known ones when it is away."""
        async with self._limits_lock:
            if self._limits_at is None or time.monotonic() - self._limits_at > LIMITS_TTL_S:
                await self.health()
        return self.limits

    async def health(self) -> dict[str, Any]:
        try:
            timeout = aiohttp.ClientTimeout(
                total=min(HEALTH_TIMEOUT_S, self._timeout.total or HEALTH_TIMEOUT_S)
            )
            async with self._client().get(f"{self.url}/v1/health", timeout=timeout) as resp:
                if resp.status == 401:
                    return {"engine": self.name, "ready": False, "error": _SECRET_REFUSED}
                info = await resp.json()
        except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError):
            return {"engine": self.name, "ready": False, "error": self._unreachable().message}
        if not isinstance(info, dict):
            return {"engine": self.name, "ready": False, "error": "The image worker sent a malformed health."}
        limits = EngineLimits.from_dict(info.get("limits"))
        if limits is not None:
            if limits != self.limits:
                logger.info("image worker at %s: %s", self.url, limits)
            self.limits, self._limits_at = limits, time.monotonic()
        return {
            **info,
            "engine": self.name,
            "worker_engine": info.get("engine"),
            "limits": self.limits.to_dict(),
        }

    async def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        if cancel.cancelled:
            raise JobCancelled()
        exchange = asyncio.create_task(self._exchange(request, on_progress, cancel))
        watcher = asyncio.create_task(_wait_for_cancel(cancel))
        try:
            await asyncio.wait({exchange, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # cancelling the exchange closes the connection: the worker sees it and stops sampling
            watcher.cancel()
            if not exchange.done():
                exchange.cancel()
            await asyncio.gather(exchange, watcher, return_exceptions=True)
        if exchange.cancelled():
            raise JobCancelled()
        return exchange.result()

    async def _exchange(
        self, request: GenerationRequest, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        body = request_to_wire(request)
        try:
            async with self._client().post(f"{self.url}/v1/generate", json=body) as resp:
                if resp.status != 200:
                    raise await _error_response(resp)
                return await _read_stream(resp, on_progress)
        except HuahuaError:
            raise
        except TimeoutError:
            raise EngineUnreachable("The image worker took too long to answer.") from None
        except aiohttp.ClientConnectorError:
            raise self._unreachable() from None
        except aiohttp.ClientError:
            if cancel.cancelled:
                raise JobCancelled() from None
            raise EngineUnreachable("The connection to the image worker broke off.") from None


async def _read_stream(resp: aiohttp.ClientResponse, on_progress: ProgressCallback) -> list[GeneratedImage]:
    while True:
        raw = await resp.content.readuntil(b"\n", max_size=MAX_LINE_BYTES)
        if not raw:
            raise EngineUnreachable("The image worker stopped before sending a result.")
        line = _parse_line(raw)
        kind = line.get("type")
        if kind == "progress":
            on_progress(int(line.get("step", 0)), int(line.get("total", 0)))
        elif kind == "result":
            return [image_from_wire(item) for item in line.get("images") or []]
        elif kind == "error":
            raise error_from_wire(line)


async def _wait_for_cancel(cancel: CancelToken) -> None:
    # the token is a threading.Event (set from any thread), so it is polled rather than awaited
    while not cancel.cancelled:  # noqa: ASYNC110
        await asyncio.sleep(CANCEL_POLL_S)


_SECRET_REFUSED = "The image worker refused our secret; set the same HUAHUA_WORKER_SECRET on both sides."


def _parse_line(raw: bytes) -> dict[str, Any]:
    try:
        line = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EngineUnavailable("The image worker sent something that is not JSON.") from None
    if not isinstance(line, dict):
        raise EngineUnavailable("The image worker sent something that is not a JSON object.")
    return line


async def _error_response(resp: aiohttp.ClientResponse) -> HuahuaError:
    if resp.status == 401:
        return EngineUnavailable(_SECRET_REFUSED)
    try:
        line = await resp.json(content_type=None)
    except (json.JSONDecodeError, aiohttp.ClientError, UnicodeDecodeError):
        line = None
    if isinstance(line, dict) and "code" in line:
        return error_from_wire(line)
    return EngineUnavailable(f"The image worker answered with HTTP status {resp.status}.")
