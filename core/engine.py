"""The engine port: turn a GenerationRequest into images, reporting progress and honouring cancel.

Sizes: every engine has EngineLimits, the one source of truth for what it accepts. The /imagine size
rule (core.options) picks new pictures inside `area_band`, the engine refuses requests that do not
`fit`, and the upscale button asks `fits` before doubling a picture; `for_area` leaves room for one
2x upscale of every picture the size rule can make.
"""

from __future__ import annotations

import abc
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from core.errors import InvalidOption
from core.images import validate_upload
from core.settings import Settings
from core.types import SAMPLERS, GeneratedImage, GenerationRequest

ProgressCallback = Callable[[int, int], None]
"""Called on the event loop thread with (step, total_steps) after each sampling step."""

TILE = 64
"""New pictures have sides in multiples of this; the area band is counted in TILE x TILE tiles."""
AREA_TOLERANCE = 0.25
"""New pictures keep within +-25% of the target area..."""
MIN_TOLERANCE_TILES = 2
"""...widened to +-2 tiles for small targets (128x128 is only 4 tiles: 3:2 needs 6)."""
MAX_NEW_SIDE = 1024
"""The longest side of a new picture; an upscale may double it."""
UPSCALE_FACTOR = 2
MAX_IMAGES_PER_REQUEST = 8
MAX_REFERENCES = 4
"""Reference pictures one request may follow (each costs one more UNet pass per shared step)."""


def area_band(image_area: int) -> tuple[int, int]:
    """(smallest, largest) area of a new picture for a target area: +-25%, at least +-2 tiles, >= 1 tile."""
    tile = TILE * TILE
    slack = max(AREA_TOLERANCE * image_area, MIN_TOLERANCE_TILES * tile)
    return max(tile, math.ceil(image_area - slack)), math.floor(image_area + slack)


@dataclass(frozen=True)
class EngineLimits:
    """What one engine accepts; a worker reports its own in `/v1/health` under "limits"."""

    image_area: int
    """New pictures aim at about this many pixels (HUAHUA_IMAGE_AREA, HUAHUA_TINY_IMAGE_AREA)."""
    max_area: int
    """The most pixels (width x height) a request may have, upscales included."""
    max_side: int
    """The longest side a request may have, upscales included."""
    max_steps: int = 50
    multiple: int = TILE
    """Sides must be multiples of this."""

    @classmethod
    def for_area(cls, image_area: int, *, max_steps: int = 50, multiple: int = TILE) -> EngineLimits:
        """Limits for a target area, with room for one 2x upscale of any new picture."""
        return cls(
            image_area=image_area,
            max_area=UPSCALE_FACTOR**2 * area_band(image_area)[1],
            max_side=UPSCALE_FACTOR * MAX_NEW_SIDE,
            max_steps=max_steps,
            multiple=multiple,
        )

    def fits(self, width: int, height: int) -> bool:
        """Whether a picture of this size is small enough for the engine."""
        return max(width, height) <= self.max_side and width * height <= self.max_area

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> EngineLimits | None:
        """Limits read from a worker's health JSON; None when missing or malformed."""
        if not isinstance(data, Mapping):
            return None
        values: dict[str, int] = {}
        for name in ("image_area", "max_area", "max_side", "max_steps", "multiple"):
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                return None
            values[name] = value
        return cls(**values)


DEFAULT_LIMITS = EngineLimits.for_area(512 * 512)


def configured_limits(settings: Settings) -> EngineLimits:
    """The limits the settings give: the tiny area for the tiny engine, HUAHUA_IMAGE_AREA otherwise
    (a remote engine's fallback until its worker says)."""
    area = settings.tiny_image_area if settings.engine == "tiny" else settings.image_area
    return EngineLimits.for_area(area, max_steps=settings.max_steps)


def validate_request(request: GenerationRequest, limits: EngineLimits) -> None:
    """Raise InvalidOption with one friendly sentence when the request cannot run on these limits."""
    if not isinstance(request.prompt, str) or not isinstance(request.negative_prompt, str):
        raise InvalidOption("The prompt must be text.")
    if not 1 <= request.steps <= limits.max_steps:
        raise InvalidOption(f"Steps must be between 1 and {limits.max_steps}.")
    if not 1 <= request.n <= MAX_IMAGES_PER_REQUEST:
        raise InvalidOption(f"You can ask for 1 to {MAX_IMAGES_PER_REQUEST} images at a time.")
    if request.sampler not in SAMPLERS:
        raise InvalidOption(f"Unknown sampler {request.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if not math.isfinite(request.guidance_scale) or not 0 <= request.guidance_scale <= 50:
        raise InvalidOption("Guidance scale must be between 0 and 50.")
    multiple = limits.multiple
    if request.width % multiple or request.height % multiple or min(request.width, request.height) < multiple:
        raise InvalidOption(f"Width and height must be positive multiples of {multiple}.")
    if not limits.fits(request.width, request.height):
        side = int(math.sqrt(limits.max_area))
        raise InvalidOption(
            f"The image is too large for this engine: at most {limits.max_side} pixels a side"
            f" and about {side}×{side} pixels in all."
        )
    _validate_panels(request)
    if request.init_image is not None:
        if not 0.0 < request.strength <= 1.0:
            raise InvalidOption("Strength must be above 0 and at most 1 for image-to-image.")
        validate_upload(request.init_image, decode=False)  # sizes from the header: no decoding here
    if not isinstance(request.consistency, int | float) or not 0.0 <= request.consistency <= 2.0:
        raise InvalidOption("Consistency strength must be between 0 and 2.")
    if len(request.references) > MAX_REFERENCES or len(request.reference_images) > MAX_REFERENCES:
        raise InvalidOption(f"A picture can follow at most {MAX_REFERENCES} reference pictures.")
    for reference in request.reference_images:  # header sizes only: decoded on the engine's thread
        validate_upload(reference, decode=False)
    if request.reference_words and len(request.reference_words) != len(request.references):
        raise InvalidOption("Give the words of each reference picture, or none.")
    if not all(isinstance(words, str) for words in request.reference_words):
        raise InvalidOption("The words of the reference pictures must be text.")
    if not 0 <= request.seed < 2**63:
        raise InvalidOption("The seed must be a non-negative whole number.")


def _validate_panels(request: GenerationRequest) -> None:
    if isinstance(request.panel_rate, bool) or not isinstance(request.panel_rate, int | float):
        raise InvalidOption("The panel sampling rate must be a number.")
    if not 0.0 <= request.panel_rate <= 1.0:
        raise InvalidOption("The panel sampling rate must be between 0 and 1.")
    if not request.panels:
        if request.panel_rate:
            raise InvalidOption("A panel sampling rate needs panels drawn together.")
        return
    if not all(isinstance(prompt, str) for prompt in request.panels):
        raise InvalidOption("The panels' prompts must be text.")
    if len(request.panels) < 2 or request.n != len(request.panels) or request.prompt != request.panels[0]:
        raise InvalidOption("Panels drawn together need two or more prompts, one picture each.")
    if request.init_image is not None:
        raise InvalidOption("Panels drawn together start from noise, not from a picture.")


class CancelToken:
    """Set from the event loop, read from the thread that samples."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Engine(abc.ABC):
    """Generates images. Implementations never block the event loop."""

    name: str = "engine"
    label: str = ""
    """Shown beside every picture, e.g. "untrained test model"; empty for the real model."""
    limits: EngineLimits = DEFAULT_LIMITS
    """The sizes and steps this engine accepts, as last known (see `fetch_limits`)."""

    @abc.abstractmethod
    async def generate(
        self, request: GenerationRequest, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        """Run one request; raise JobCancelled when cancelled, EngineUnavailable when it cannot run."""

    async def fetch_limits(self) -> EngineLimits:
        """The limits to size a new request by; a remote engine asks its worker."""
        return self.limits

    async def start(self) -> None:
        """Load weights or open connections; must not raise for missing weights (see `ready`)."""
        return None

    async def ensure_ready(self) -> None:
        """Raise EngineUnavailable (saying how to fix it) when `generate` cannot run now."""
        return None

    async def close(self) -> None:
        """Release resources."""
        return None

    async def health(self) -> dict[str, Any]:
        return {"engine": self.name, "ready": True, "limits": self.limits.to_dict()}
