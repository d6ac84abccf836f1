"""Job <-> JSON-ready dict, shared by the SQLite store and the Redis queue.

`GenerationRequest.init_image` and `reference_images` bytes are never encoded: the job's `init_image`
field and the request's `references` hold the image hashes, and the bytes are loaded from the image
store when the job runs. Everything else round-trips exactly. Decoding checks every field's type and
raises `StorageError` for a malformed record.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from typing import Any

from core.errors import StorageError
from core.types import GenerationRequest, Job, JobKind, JobStatus

logger = logging.getLogger(__name__)

_REQUEST_FIELDS = tuple(
    f.name for f in fields(GenerationRequest) if f.name not in ("init_image", "reference_images")
)


def job_to_dict(job: Job) -> dict[str, Any]:
    """A plain dict of JSON types; enums become their string values, tuples become lists."""
    return {
        "id": job.id,
        "user": job.user,
        "chat": job.chat,
        "kind": job.kind.value,
        "source_text": job.source_text,
        "request": {
            name: list(value) if isinstance(value := getattr(job.request, name), tuple) else value
            for name in _REQUEST_FIELDS
        },
        "status": job.status.value,
        "progress": job.progress,
        "error": job.error,
        "images": list(job.images),
        "init_image": job.init_image,
        "parent_id": job.parent_id,
        "parent_index": job.parent_index,
        "notes": list(job.notes),
        "engine_label": job.engine_label,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "meta": dict(job.meta),
        "attempt": job.attempt,
    }


def job_from_dict(data: Any) -> Job:
    """Rebuild a Job from `job_to_dict` output; raises StorageError when a field is missing or mistyped."""
    record = _Record(data, "job")
    request = _Record(record.raw("request"), "job request")
    return Job(
        id=record.text("id"),
        user=record.text("user"),
        chat=record.text("chat"),
        kind=record.enum("kind", JobKind),
        source_text=record.text("source_text"),
        request=GenerationRequest(
            prompt=request.text("prompt"),
            negative_prompt=request.text("negative_prompt"),
            width=request.integer("width"),
            height=request.integer("height"),
            steps=request.integer("steps"),
            guidance_scale=request.number("guidance_scale"),
            seed=request.integer("seed"),
            n=request.integer("n"),
            sampler=request.text("sampler"),
            strength=request.number("strength"),
            # records from before consistency have neither field
            references=request.texts("references") if "references" in request else (),
            consistency=request.number("consistency") if "consistency" in request else 0.0,
            # records from before regions and panels drawn together have none of these
            reference_words=request.texts("reference_words") if "reference_words" in request else (),
            panels=request.texts("panels") if "panels" in request else (),
            panel_rate=request.number("panel_rate") if "panel_rate" in request else 0.0,
        ),
        status=record.enum("status", JobStatus),
        progress=record.number("progress"),
        error=record.optional_text("error"),
        images=record.texts("images"),
        init_image=record.optional_text("init_image"),
        parent_id=record.optional_text("parent_id"),
        parent_index=record.optional_integer("parent_index"),
        notes=record.texts("notes"),
        engine_label=record.text("engine_label"),
        created_at=record.number("created_at"),
        started_at=record.optional_number("started_at"),
        finished_at=record.optional_number("finished_at"),
        meta=record.text_dict("meta"),
        attempt=record.integer_or("attempt", 0),
    )


def job_to_json(job: Job) -> str:
    return json.dumps(job_to_dict(job), ensure_ascii=False, separators=(",", ":"))


def job_from_json(text: str | bytes) -> Job:
    try:
        data = json.loads(text)
    except (ValueError, TypeError) as err:
        raise StorageError("A stored job is not valid JSON.") from err
    return job_from_dict(data)


class _Record:
    """Typed reads from one decoded dict, each failing with a StorageError that names the field."""

    def __init__(self, data: Any, what: str) -> None:
        if not isinstance(data, dict):
            raise StorageError(f"A stored {what} is not a JSON object.")
        self._data = data
        self._what = what

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def raw(self, key: str) -> Any:
        if key not in self._data:
            raise StorageError(f"A stored {self._what} has no '{key}' field.")
        return self._data[key]

    def _bad(self, key: str, expected: str) -> StorageError:
        return StorageError(f"A stored {self._what} has a malformed '{key}' field (expected {expected}).")

    def text(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            raise self._bad(key, "text")
        return value

    def optional_text(self, key: str) -> str | None:
        return None if self.raw(key) is None else self.text(key)

    def integer(self, key: str) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        return value

    def optional_integer(self, key: str) -> int | None:
        return None if self.raw(key) is None else self.integer(key)

    def integer_or(self, key: str, default: int) -> int:
        """For fields added later: `default` when a record written before them lacks the field."""
        return default if key not in self._data else self.integer(key)

    def number(self, key: str) -> float:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, "a number")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        return None if self.raw(key) is None else self.number(key)

    def enum(self, key: str, kind: type[JobKind] | type[JobStatus]) -> Any:
        value = self.text(key)
        try:
            return kind(value)
        except ValueError as err:
            raise self._bad(key, "one of " + ", ".join(member.value for member in kind)) from err

    def texts(self, key: str) -> tuple[str, ...]:
        value = self.raw(key)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self._bad(key, "a list of text")
        return tuple(value)

    def text_dict(self, key: str) -> dict[str, str]:
        value = self.raw(key)
        if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
            raise self._bad(key, "an object of text values")
        return dict(value)
