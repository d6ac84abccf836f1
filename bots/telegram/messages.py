"""Telegram's text limits and the status message text built from the core presenter."""

from __future__ import annotations

import logging
from dataclasses import replace

from core import presenter
from core.types import EventType, Job, JobEvent, JobStatus

logger = logging.getLogger(__name__)

CAPTION_LIMIT = 1024
MESSAGE_LIMIT = 4096
PHOTO_MAX_BYTES = 10 * 1024 * 1024
PHOTO_MAX_SIDES = 10_000
ELLIPSIS = "…"


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def truncate(text: str, limit: int) -> str:
    """Cut `text` to at most `limit` UTF-16 code units (how Telegram counts), marking the cut with …."""
    if _utf16_len(text) <= limit:
        return text
    budget = limit - _utf16_len(ELLIPSIS)
    out: list[str] = []
    used = 0
    for char in text:
        size = _utf16_len(char)
        if used + size > budget:
            break
        out.append(char)
        used += size
    return "".join(out) + ELLIPSIS


def split(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split a long reply into messages of at most `limit` code units, preferring line breaks."""
    chunks: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while _utf16_len(line) > limit:
            head = truncate(line, limit + 1)[:-1]
            if current:
                chunks.append(current)
                current = ""
            chunks.append(head)
            line = line[len(head) :]
        if _utf16_len(current + line) > limit:
            chunks.append(current)
            current = ""
        current += line
    if current.strip():
        chunks.append(current)
    return [chunk.rstrip("\n") for chunk in chunks if chunk.strip()]


def status_text(job: Job, event: JobEvent) -> str:
    """The status message for a job event: presenter's status line, a progress bar, the prompt, notes."""
    status = {
        EventType.QUEUED: JobStatus.QUEUED,
        EventType.POSITION: JobStatus.QUEUED,
        EventType.STARTED: JobStatus.RUNNING,
        EventType.PROGRESS: JobStatus.RUNNING,
        EventType.DONE: JobStatus.DONE,
        EventType.FAILED: JobStatus.FAILED,
        EventType.CANCELLED: JobStatus.CANCELLED,
    }[event.type]
    now = replace(job, status=status, progress=event.progress, error=event.error or job.error)
    lines = [presenter.status_line(now, event.position)]
    if status == JobStatus.RUNNING:
        lines.append(presenter.progress_bar(event.progress))
    if not status.finished:
        lines.extend(presenter.prompt_lines(job.request))
        lines.extend(job.notes)
    return truncate("\n".join(lines), MESSAGE_LIMIT)


def fits_as_photo(size_bytes: int, width: int, height: int) -> bool:
    """Telegram's photo limits: 10 MB and a width plus height of at most 10000 px."""
    return size_bytes <= PHOTO_MAX_BYTES and width + height <= PHOTO_MAX_SIDES
