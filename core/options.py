"""/imagine option parsing (`--ar 3:2 --seed 7 ...`) and validation into ResolvedOptions.

Image size rule: for an aspect ratio r = w:h and an engine's limits (core.engine.EngineLimits, whose
target area A is HUAHUA_IMAGE_AREA, HUAHUA_TINY_IMAGE_AREA for the tiny engine, or what a remote worker
reports), the size is the one in multiples of 64, each side at most 1024, whose ratio is nearest r
(compared as |log(w/h) - log r|) among those whose area lies in the band A +-25% (at least +-2 tiles of
64x64, so small targets have shapes to choose from: 128x128 gives 2 to 6 tiles); ties go to the area
nearest A. When r cannot reach A within 1024 a side (4:1 of a large A), the band is around the largest
area r reaches. So at 512x512: 1:1 -> 512x512, 3:2 -> 576x384, 16:9 -> 704x384, 2:1 -> 768x384,
4:1 -> 1024x256; at 128x128: 3:2 -> 192x128, 2:1 and 16:9 -> 128x64, 4:1 -> 256x64.

Numbers are written with the digits 0-9 (full-width digits count as such); other scripts' digits
(`--seed ١٢٣`) are refused with a sentence saying so rather than read silently.
"""

from __future__ import annotations

import math
import re
import secrets
import unicodedata
from dataclasses import dataclass

from core.engine import MAX_NEW_SIDE, TILE, EngineLimits, area_band, configured_limits
from core.errors import EmptyPrompt, EngineUnavailable, InvalidOption
from core.prompting.styles import StyleBook
from core.settings import Settings
from core.types import ImagineOptions

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
_RATIO = re.compile(r"^\s*([0-9]{1,3})\s*:\s*([0-9]{1,3})\s*$")
SHOWN_UNKNOWN = 3
"""How many unknown option names a refusal lists before "and N more"."""

AR_RULE = "--ar must look like 3:2, with each side between 1 and 4 times the other."
SEED_RULE = f"--seed must be a whole number from 0 to {MAX_SEED}."
N_RULE = f"--n must be a whole number from 1 to {MAX_IMAGES}."
GUIDANCE_RULE = "--guidance must be a number from 1 to 20, such as 7.5."


STEPS_FORMAT = "--steps must be a whole number, such as 30."
UNREADABLE = "Part of your message could not be read (a broken character); please type it again."


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
    _check_readable(text)
    matches = list(_OPTION.finditer(text))
    description = (text[: matches[0].start()] if matches else text).strip()
    values: dict[str, str] = {}
    unknown: list[str] = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        raw_name = unicodedata.normalize("NFKC", match.group(1)).lower()
        name = _NAMES.get(raw_name)
        if name is None:
            if f"--{raw_name}" not in unknown:
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
        named = ", ".join(unknown[:SHOWN_UNKNOWN])
        if len(unknown) > SHOWN_UNKNOWN:
            named += f" and {len(unknown) - SHOWN_UNKNOWN} more"
        raise InvalidOption(f"Unknown option {named}; the options are {known}.")
    return ImagineOptions(
        text=description,
        aspect_ratio=_half_width(values["ar"]) if "ar" in values else None,
        seed=_integer(values, "seed", SEED_RULE),
        steps=_integer(values, "steps", STEPS_FORMAT),
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


def _check_readable(value: str) -> None:
    """Lone UTF-16 surrogates (a broken emoji or character) cannot be encoded, so say so now."""
    if any("\ud800" <= char <= "\udfff" for char in value):
        raise InvalidOption(UNREADABLE)


def _check_digits(name: str, value: str) -> None:
    """Refuse digits of other scripts (Arabic-Indic, Devanagari...): only 0-9 are read as numbers."""
    if any(char.isdigit() and char not in "0123456789" for char in value):
        raise InvalidOption(f"Please write --{name} with the digits 0-9, for example {_EXAMPLES[name]}.")


def _integer(values: dict[str, str], name: str, rule: str) -> int | None:
    if name not in values:
        return None
    value = _half_width(values[name])
    _check_digits(name, value)
    if not re.fullmatch(r"[+-]?[0-9]{1,30}", value):
        raise InvalidOption(rule)
    return int(value)


def _number(values: dict[str, str], name: str, rule: str) -> float | None:
    if name not in values:
        return None
    value = _half_width(values[name])
    _check_digits(name, value)
    if not re.fullmatch(r"[+-]?([0-9]{1,6}(\.[0-9]{0,6})?|\.[0-9]{1,6})", value):
        raise InvalidOption(rule)
    return float(value)


def resolve(
    options: ImagineOptions, settings: Settings, styles: StyleBook, limits: EngineLimits | None = None
) -> ResolvedOptions:
    """Validate every option against the settings and the engine's limits (by default those the
    settings give); a random seed (from `secrets`) when none is given."""
    limits = limits or configured_limits(settings)
    for value in (options.text, options.aspect_ratio, options.negative, options.style):
        if value is not None:
            _check_readable(value)
    text = options.text.strip()
    if not text:
        raise EmptyPrompt("Please describe the picture before the options, for example: 一只猫 --ar 3:2.")
    if len(text) > settings.max_text_length:
        raise InvalidOption(
            f"The description is too long: please keep it under {settings.max_text_length} characters."
        )
    ratio_text = options.aspect_ratio or "1:1"
    width, height = size_for_ratio(ratio_text, limits)
    max_steps = min(settings.max_steps, limits.max_steps)
    steps = min(settings.default_steps, max_steps) if options.steps is None else options.steps
    if not 1 <= steps <= max_steps:
        raise InvalidOption(_steps_rule(max_steps))
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


def size_for_ratio(ratio: str, limits: EngineLimits) -> tuple[int, int]:
    """(width, height) for "w:h" by the size rule in the module docstring; InvalidOption for a bad ratio."""
    value = _half_width(ratio)
    _check_digits("ar", value)
    match = _RATIO.match(value)
    if not match:
        raise InvalidOption(AR_RULE)
    w, h = int(match.group(1)), int(match.group(2))
    if w == 0 or h == 0 or max(w, h) / min(w, h) > MAX_RATIO:
        raise InvalidOption(AR_RULE)
    r = w / h
    step = math.lcm(TILE, limits.multiple)
    cap = min(MAX_NEW_SIDE, limits.max_side) // step * step
    sides = range(step, cap + 1, step)
    fitting = [(x, y) for x in sides for y in sides if limits.fits(x, y)]
    if not fitting:
        raise EngineUnavailable(
            "The image engine reports limits too small for any picture; check its settings."
        )
    target = min(limits.image_area, cap * cap * min(r, 1 / r))
    low, high = area_band(math.floor(target))
    choices = [(x, y) for x, y in fitting if low <= x * y <= high] or fitting

    def distance(size: tuple[int, int]) -> tuple[float, float, int]:
        x, y = size
        return (round(abs(math.log(x / y / r)), 9), round(abs(math.log(x * y / target)), 9), x)

    return min(choices, key=distance)
