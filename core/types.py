"""Typed values that cross module boundaries: requests, images, jobs and their events."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

SAMPLERS = ("dpm++2m", "ddim", "plms")


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class JobKind(enum.StrEnum):
    IMAGINE = "imagine"
    REROLL = "reroll"
    VARIATION = "variation"
    UPSCALE = "upscale"
    SCENE = "scene"


class Action(enum.StrEnum):
    """What a button under a result asks for."""

    REROLL = "reroll"
    VARIATION = "variation"
    UPSCALE = "upscale"
    CANCEL = "cancel"
    CHOOSE = "choose"
    """⭐: a story picture becomes the book's panel."""


@dataclass(frozen=True)
class ImagineOptions:
    """What a user asked for, before validation: the text and the raw option values.

    `aspect_ratio` stays a string ("3:2") until validation; None means "not given".
    """

    text: str
    aspect_ratio: str | None = None
    seed: int | None = None
    steps: int | None = None
    n: int | None = None
    negative: str | None = None
    style: str | None = None
    guidance_scale: float | None = None


@dataclass(frozen=True)
class BuiltPrompt:
    """The Chinese prompt handed to the model, and how it was made."""

    prompt: str
    negative_prompt: str
    language: str
    source_text: str
    token_count: int
    cut: tuple[str, ...] = ()
    unknown_words: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """One call to an engine. `init_image` (PNG bytes) and `strength` > 0 make it image-to-image."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    n: int = 1
    sampler: str = "dpm++2m"
    init_image: bytes | None = field(default=None, repr=False)
    strength: float = 0.0
    references: tuple[str, ...] = ()
    """Digests of reference pictures (a story's cast) the drawing keeps its characters consistent with."""
    consistency: float = 0.0
    """How strongly the references are followed (0 off, 1 full, up to 2); see core.diffusion.consistency."""
    reference_images: tuple[bytes, ...] = field(default=(), repr=False)
    """The references' image bytes, loaded where the job runs (never stored: the digests are)."""
    reference_words: tuple[str, ...] = ()
    """Per reference, the words by which the prompts name its character ("" for none): where the engine
    can tell which part of a picture those words occupy, the reference applies mostly there."""
    panels: tuple[str, ...] = ()
    """A story's panels drawn together as one batch: picture i from prompt `panels[i]` with seed
    `seed + i` (`prompt` is the first, `n` their count); each panel's self-attention also reads a sample
    of the other panels' tokens, at `panel_rate`, so the panels share their characters' looks."""
    panel_rate: float = 0.0
    """The fraction of each other panel's tokens a panel reads (0: drawn together without sharing)."""

    @property
    def prompts(self) -> tuple[str, ...]:
        """The prompt of each picture's panel (the one prompt, for a request that draws no panels)."""
        return self.panels or (self.prompt,)

    def panel(self, index: int) -> GenerationRequest:
        """Picture `index` of this request on its own: its panel's prompt and seed, one picture."""
        if not self.panels:
            return replace(self, n=1, seed=self.seed + index)
        return replace(
            self, prompt=self.panels[index], seed=self.seed + index, n=1, panels=(), panel_rate=0.0
        )


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes = field(repr=False)
    width: int
    height: int
    seed: int


@dataclass(frozen=True)
class Job:
    """A queued generation. `user` and `chat` are platform-qualified ids ("web:alice", "tg:-100123")."""

    id: str
    user: str
    chat: str
    kind: JobKind
    source_text: str
    request: GenerationRequest
    status: JobStatus = JobStatus.QUEUED
    progress: float = 0.0
    error: str | None = None
    images: tuple[str, ...] = ()
    init_image: str | None = None
    parent_id: str | None = None
    parent_index: int | None = None
    notes: tuple[str, ...] = ()
    engine_label: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    meta: dict[str, str] = field(default_factory=dict)
    attempt: int = 0
    """How many times a worker has started this job; finishing is fenced on the current attempt."""


class EventType(enum.StrEnum):
    QUEUED = "queued"
    POSITION = "position"
    STARTED = "started"
    PROGRESS = "progress"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (EventType.DONE, EventType.FAILED, EventType.CANCELLED)


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    type: EventType
    progress: float = 0.0
    position: int | None = None
    step: int = 0
    total_steps: int = 0
    error: str | None = None


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    """Gave up after the last attempt; kept for the operator."""


@dataclass(frozen=True)
class Delivery:
    """One finished job's result (or failure) owed to a platform chat: the outbox record.

    `platform` is the chat id's prefix ("tg", "dc"); `message_id` is the platform's id of the posted
    message once `state` is SENT. A claim (`claimed_by` until `claim_until`) keeps two processes from
    posting it at once.
    """

    id: int
    job_id: str
    platform: str
    state: DeliveryState = DeliveryState.PENDING
    attempts: int = 0
    next_at: float = 0.0
    claimed_by: str | None = None
    claim_until: float | None = None
    message_id: str | None = None
    error: str | None = None
    created_at: float = 0.0
    sent_at: float | None = None
