"""Multipart form uploads (a cast member's picture): read as a stream under their own size limits, since
the app-wide body limit (`payload.MAX_BODY_BYTES`) is for JSON and far too small for a picture."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import BodyPartReader, web

from bots.web.errors import BadRequest
from core.images import MAX_UPLOAD_BYTES

logger = logging.getLogger(__name__)

MAX_FIELD_BYTES = 4 * 1024
"""A text field of a form (a room, a name, a description): far more than any of them needs."""
MAX_PARTS = 8
FORM_OVERHEAD_BYTES = 64 * 1024
"""Room for the text fields and the multipart boundaries around the file."""
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Form:
    fields: dict[str, str]
    files: dict[str, bytes]


async def read_form(
    request: web.Request,
    *,
    file_fields: frozenset[str],
    text_fields: frozenset[str],
    max_file_bytes: int = MAX_UPLOAD_BYTES,
) -> Form:
    """The text fields and files of a multipart/form-data body, each read no further than its limit.

    A file over `max_file_bytes` is a 413 with the same sentence as the core's upload check; a body
    whose Content-Length already says it is too large is refused before any of it is read."""
    if request.content_type != "multipart/form-data":
        raise BadRequest(
            "Send the picture as multipart/form-data (a form with a file field).",
            status=415,
            code="unsupported_media_type",
        )
    limit = max_file_bytes * len(file_fields) + FORM_OVERHEAD_BYTES
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(max_file_bytes)
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError):
        raise BadRequest("The form could not be read: send it as multipart/form-data.") from None
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    parts = 0
    while True:
        try:
            part = await reader.next()
        except ValueError:
            raise BadRequest("The form could not be read: send it as multipart/form-data.") from None
        if part is None:
            break
        parts += 1
        if parts > MAX_PARTS or not isinstance(part, BodyPartReader):
            raise BadRequest("The form has too many parts.")
        name = part.name or ""
        if name in file_fields:
            files[name] = await _bounded(part, max_file_bytes, _too_large(max_file_bytes))
        elif name in text_fields:
            raw = await _bounded(part, MAX_FIELD_BYTES, BadRequest(f"The field {name!r} is too long."))
            try:
                fields[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(f"The field {name!r} must be UTF-8 text.") from None
        else:
            raise BadRequest(f"The form has an unexpected field {name!r}.")
    return Form(fields, files)


async def _bounded(part: BodyPartReader, limit: int, too_large: BadRequest) -> bytes:
    """A part's bytes, refused with `too_large` as soon as more than `limit` of them arrive."""
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK_BYTES):
        data.extend(chunk)
        if len(data) > limit:
            raise too_large
    return bytes(data)


def _too_large(max_bytes: int) -> BadRequest:
    return BadRequest(
        f"The image is too large: at most {max_bytes // (1024 * 1024)} MB, please.",
        status=413,
        code="too_large",
    )
