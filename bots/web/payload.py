"""Request bodies of the web API: JSON objects read safely (size, nesting depth, valid Unicode)."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from bots.web.errors import BadRequest

MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32
"""Far more than any request needs; the JSON parser recurses once per level (RecursionError near 1,000)."""

_SIGNIFICANT = re.compile(rb'["\\\[\]{}]')
_INVISIBLE_START = "\ufeff\u200b\u200c\u200d\u2060"
"""A byte-order mark and zero-width characters some editors and keyboards put before a text."""


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, found without recursion.

    Brackets inside strings do not count; for malformed input the answer is only an estimate, which
    is enough: the parser refuses such input anyway."""
    depth = deepest = 0
    in_string = False
    escaped_until = -1
    for match in _SIGNIFICANT.finditer(raw):
        at = match.start()
        if at < escaped_until:
            continue
        token = raw[at]
        if in_string:
            if token == 0x5C:  # a backslash escapes the next byte
                escaped_until = at + 2
            elif token == 0x22:
                in_string = False
        elif token == 0x22:
            in_string = True
        elif token in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_object(raw: bytes) -> dict[str, Any]:
    """A JSON object from request bytes, or BadRequest with one sentence."""
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise BadRequest(f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels).")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("The request body must be a JSON object.") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    _check_unicode(data)
    return data


def _check_unicode(value: Any) -> None:
    """Refuse lone UTF-16 surrogates (`"\\ud800"` is valid JSON but no character): nothing can store them.

    The depth was checked before parsing, so this recursion is bounded."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(
                "The text contains an invalid character (a lone UTF-16 surrogate); please type it again."
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; 413 above MAX_BODY_BYTES, 400 for anything malformed."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadRequest("That request is too large.", status=413, code="too_large")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest("That request is too large.", status=413, code="too_large") from None
    return parse_object(raw)


def text_field(data: dict[str, Any], name: str, *, max_length: int | None = None) -> str:
    value = data.get(name)
    if value is None:
        raise BadRequest(f"The field {name!r} is missing.")
    if not isinstance(value, str):
        raise BadRequest(f"The field {name!r} must be text.")
    if max_length is not None and len(value) > max_length:
        raise BadRequest(f"The field {name!r} must be at most {max_length} characters.")
    return value


def int_field(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if value is None:
        raise BadRequest(f"The field {name!r} is missing.")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"The field {name!r} must be a whole number.")
    return value


def without_invisible_start(text: str) -> str:
    """The text without a leading byte-order mark or zero-width characters, and surrounding spaces."""
    return text.strip().lstrip(_INVISIBLE_START).strip()


def refuse_user_field(data: dict[str, Any]) -> None:
    """The user is the browser's signed identity; a `user` in the body would let anyone be anyone."""
    if "user" in data:
        raise BadRequest("Leave out 'user': the web chat knows who you are from your browser's cookie.")
