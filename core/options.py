"""/imagine option parsing (`--ar 3:2 --seed 7 ...`) and validation into ResolvedOptions.

Image size rule: for an aspect ratio r = w:h and a target area A (settings.image_area, or
settings.tiny_image_area for the tiny engine), the ideal sides are sqrt(A*r) and sqrt(A/r). Each is
rounded to the nearest multiple of 64 (at least 64); if the longer side then exceeds 1024 it becomes 1024
and the other side is recomputed from the ratio and rounded the same way. So 1:1 -> 512x512,
3:2 -> 640x448, 16:9 -> 704x384, 4:1 -> 1024x256 at the default area.
"""

from __future__ import annotations

import math
import re
import secrets
import unicodedata
from dataclasses import dataclass

from core.errors import EmptyPrompt, InvalidOption
from core.prompting.styles import StyleBook
from core.settings import Settings
from core.types import ImagineOptions

MAX_SIDE = 1024
SIDE_STEP = 64
MAX_RATIO = 4.0
MAX_SEED = 2**32 - 1
MAX_IMAGES = 4
GUIDANCE_RANGE = (1.0, 20.0)

_OPTION = re.compile(r"(?<!\S)(?:--|—{1,2}|–{1,2}|－{2}|―{1,2})([A-Za-zＡ-Ｚａ-ｚ]+)")
_NAMES = {
    "ar": "ar",
    "aspect": "ar",
    "seed": "seed",
    "steps": "steps",
    "n": "n",
    "no": "no",
    "negative": "no",
    "style": "style",
    "guidance": "guidance",
    "cfg": "guidance",
}
_RATIO = re.compile(r"^\s*(\d{1,3})\s*:\s*(\d{1,3})\s*$")

AR_RULE = "--ar must look like 3:2, with each side between 1 and 4 times the other."
SEED_RULE = f"--seed must be a whole number from 0 to {MAX_SEED}."
N_RULE = f"--n must be a whole number from 1 to {MAX_IMAGES}."
GUIDANCE_RULE = "--guidance must be a number from 1 to 20, such as 7.5."


def _steps_rule(max_steps: int) -> str:
    return f"--steps must be a whole number from 1 to {max_steps}."


@dataclass(frozen=True)
class ResolvedOptions:
    """Validated generation options; `text` is the user's description exactly as typed."""

    text: str
    width: int
    height: int
    seed: int
    steps: int
    n: int
    guidance_scale: float
    style: str | None = None
    negative: str | None = None
    aspect_ratio: str = "1:1"
    seed_given: bool = False


def parse_imagine(text: str) -> ImagineOptions:
    """Split `description --option value ...` into ImagineOptions; InvalidOption for malformed options."""
    matches = list(_OPTION.finditer(text))
    description = (text[: matches[0].start()] if matches else text).strip()
    values: dict[str, str] = {}
    unknown: list[str] = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        raw_name = unicodedata.normalize("NFKC", match.group(1)).lower()
        name = _NAMES.get(raw_name)
        if name is None:
            unknown.append(f"--{raw_name}")
            continue
        if name in values:
            raise InvalidOption(f"--{name} was given more than once; please give it once.")
        value = text[match.end() : end].strip()
        if not value:
            raise InvalidOption(f"--{name} needs a value, for example {_EXAMPLES[name]}.")
        values[name] = value
    if unknown:
        known = ", ".join(f"--{name}" for name in dict.fromkeys(_NAMES.values()))
        raise InvalidOption(f"Unknown option {', '.join(unknown)}; the options are {known}.")
    return ImagineOptions(
        text=description,
        aspect_ratio=_half_width(values["ar"]) if "ar" in values else None,
        seed=_integer(values, "seed", SEED_RULE),
        steps=_integer(values, "steps", _steps_rule(200)),
        n=_integer(values, "n", N_RULE),
        negative=values.get("no"),
        style=values.get("style"),
        guidance_scale=_number(values, "guidance", GUIDANCE_RULE),
    )


_EXAMPLES = {
    "ar": "--ar 3:2",
    "seed": "--seed 7",
    "steps": "--steps 30",
    "n": "--n 2",
    "no": "--no 模糊, 文字",
    "style": "--style 水墨画",
    "guidance": "--guidance 7.5",
}


def _half_width(value: str) -> str:
    return unicodedata.normalize("NFKC", value).strip()


def _integer(values: dict[str, str], name: str, rule: str) -> int | None:
    if name not in values:
        return None
    value = _half_width(values[name])
    if not re.fullmatch(r"[+-]?\d{1,30}", value):
        raise InvalidOption(rule)
    return int(value)


def _number(values: dict[str, str], name: str, rule: str) -> float | None:
    if name not in values:
        return None
    value = _half_width(values[name])
    if not re.fullmatch(r"[+-]?(\d{1,6}(\.\d{0,6})?|\.\d{1,6})", value):
        raise InvalidOption(rule)
    return float(value)


def resolve(options: ImagineOptions, settings: Settings, styles: StyleBook) -> ResolvedOptions:
    """Validate every option against the settings; a random seed (from `secrets`) when none is given."""
    text = options.text.strip()
    if not text:
        raise EmptyPrompt("Please describe the picture before the options, for example: 一只猫 --ar 3:2.")
    if len(text) > settings.max_text_length:
        raise InvalidOption(
            f"The description is too long: please keep it under {settings.max_text_length} characters."
        )
    ratio_text = options.aspect_ratio or "1:1"
    area = settings.tiny_image_area if settings.engine == "tiny" else settings.image_area
    width, height = size_for_ratio(ratio_text, area)
    steps = settings.default_steps if options.steps is None else options.steps
    if not 1 <= steps <= settings.max_steps:
        raise InvalidOption(_steps_rule(settings.max_steps))
    n = 1 if options.n is None else options.n
    if not 1 <= n <= MAX_IMAGES:
        raise InvalidOption(N_RULE)
    guidance = settings.default_guidance if options.guidance_scale is None else options.guidance_scale
    if not GUIDANCE_RANGE[0] <= guidance <= GUIDANCE_RANGE[1]:
        raise InvalidOption(GUIDANCE_RULE)
    seed = secrets.randbelow(MAX_SEED + 1) if options.seed is None else options.seed
    if not 0 <= seed <= MAX_SEED:
        raise InvalidOption(SEED_RULE)
    style = styles.get(options.style).name if options.style else None
    negative = options.negative.strip() if options.negative and options.negative.strip() else None
    return ResolvedOptions(
        text=options.text,
        width=width,
        height=height,
        seed=seed,
        steps=steps,
        n=n,
        guidance_scale=float(guidance),
        style=style,
        negative=negative,
        aspect_ratio=ratio_text,
        seed_given=options.seed is not None,
    )


def size_for_ratio(ratio: str, area: int) -> tuple[int, int]:
    """(width, height) in multiples of 64 for "w:h" near `area` pixels; InvalidOption for a bad ratio."""
    match = _RATIO.match(_half_width(ratio))
    if not match:
        raise InvalidOption(AR_RULE)
    w, h = int(match.group(1)), int(match.group(2))
    if w == 0 or h == 0 or max(w, h) / min(w, h) > MAX_RATIO:
        raise InvalidOption(AR_RULE)
    r = w / h
    width, height = _round_side(math.sqrt(area * r)), _round_side(math.sqrt(area / r))
    if width > MAX_SIDE:
        width, height = MAX_SIDE, _round_side(MAX_SIDE / r)
    if height > MAX_SIDE:
        width, height = _round_side(MAX_SIDE * r), MAX_SIDE
    return width, height


def _round_side(side: float) -> int:
    return max(SIDE_STEP, round(side / SIDE_STEP) * SIDE_STEP)
