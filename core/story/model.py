"""The story's values: cast, continuity, scenes (panels) and the story itself. Stored as JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from core.types import GenerationRequest, Job

_REQUEST_FIELDS = tuple(
    f.name for f in dataclasses.fields(GenerationRequest) if f.name not in ("init_image", "reference_images")
)
DEFAULT_CONSISTENCY = 1.0
"""A new story keeps its characters consistent at full strength (/story consistency changes it)."""
STORY_META = "story_id"
SCENE_META = "story_scene"
"""A story job's meta: its story, and the panel its first picture is drawn for (picture i of panels
drawn together is for panel first + i; every picture of any other job is for that one panel)."""


def picture_panel(job: Job, index: int) -> int | None:
    """The story panel picture `index` of `job` is drawn for; None for a picture of no story."""
    first = job.meta.get(SCENE_META, "")
    if STORY_META not in job.meta or not first.isdigit():
        return None
    return int(first) + (index if job.request.panels else 0)


@dataclass(frozen=True)
class CastMember:
    """A character: a fixed description injected into every prompt, a fixed seed offset and, once there
    is one, a reference picture every panel they appear in follows."""

    name: str
    description: str
    seed_offset: int
    reference: str | None = None
    """Digest of the reference picture: one given with /cast add, else their first ⭐-chosen solo panel."""
    reference_from: str = ""
    """Where the reference came from: "picture" or "panel <n>"."""


@dataclass(frozen=True)
class Continuity:
    """What carries over from one scene to the next until an excerpt changes it."""

    location: str | None = None
    time_of_day: str | None = None
    season: str | None = None
    last_character: str | None = None


@dataclass(frozen=True)
class ScenePlan:
    characters: tuple[str, ...]
    action: str
    location: str | None = None
    time_of_day: str | None = None
    season: str | None = None
    mood: str | None = None
    language: str = "zh"
    planner: str = "offline"
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scene:
    """One panel and its provenance: re-rendering `request` with `model` reproduces it exactly."""

    index: int
    excerpt: str
    plan: ScenePlan
    request: GenerationRequest
    model: str
    job_ids: tuple[str, ...] = ()
    chosen: tuple[str, int] | None = None
    """(job id, image index) of the picture the group chose for the book."""
    panel: int = 0
    """Which of `request.panels` this scene is, when it was drawn together with others (`request` is
    then the whole batch's, so re-rendering it reproduces every panel of it exactly)."""

    @property
    def own_request(self) -> GenerationRequest:
        """This panel's prompt, seed and parameters, alone."""
        return self.request.panel(self.panel) if self.request.panels else self.request

    @property
    def first_of_batch(self) -> int:
        """The index of the first scene drawn in the same batch (this one's, when drawn alone)."""
        return self.index - self.panel


@dataclass(frozen=True)
class Story:
    id: str
    chat: str
    title: str
    style: str | None
    base_seed: int
    created_by: str
    created_at: float
    cast: tuple[CastMember, ...] = ()
    excerpts: tuple[str, ...] = ()
    scenes: tuple[Scene, ...] = ()
    continuity: Continuity = field(default_factory=Continuity)
    active: bool = True
    consistency: float = DEFAULT_CONSISTENCY
    """Strength with which panels follow their characters' reference pictures; 0 is off."""

    def member(self, name: str) -> CastMember | None:
        folded = name.strip().casefold()
        return next((m for m in self.cast if m.name.casefold() == folded), None)

    def scene(self, index: int) -> Scene | None:
        return next((s for s in self.scenes if s.index == index), None)


def request_to_dict(request: GenerationRequest) -> dict[str, Any]:
    return {
        name: list(value) if isinstance(value := getattr(request, name), tuple) else value
        for name in _REQUEST_FIELDS
    }


def request_from_dict(data: dict[str, Any]) -> GenerationRequest:
    """Fields a story saved before they existed take their defaults."""
    values = {name: data[name] for name in _REQUEST_FIELDS if name in data}
    for name in ("references", "reference_words", "panels"):
        if name in values:
            values[name] = tuple(values[name])
    return GenerationRequest(**values)


def story_to_dict(story: Story) -> dict[str, Any]:
    data = dataclasses.asdict(story)
    data["scenes"] = [
        {**dataclasses.asdict(scene), "request": request_to_dict(scene.request)} for scene in story.scenes
    ]
    return data


def story_from_dict(data: dict[str, Any]) -> Story:
    scenes = tuple(
        Scene(
            index=s["index"],
            excerpt=s["excerpt"],
            plan=ScenePlan(
                **{
                    **s["plan"],
                    "characters": tuple(s["plan"]["characters"]),
                    "notes": tuple(s["plan"]["notes"]),
                }
            ),
            request=request_from_dict(s["request"]),
            model=s["model"],
            job_ids=tuple(s["job_ids"]),
            chosen=(s["chosen"][0], s["chosen"][1]) if s["chosen"] else None,
            panel=s.get("panel", 0),  # stories saved before panels were drawn together have none
        )
        for s in data["scenes"]
    )
    return Story(
        id=data["id"],
        chat=data["chat"],
        title=data["title"],
        style=data["style"],
        base_seed=data["base_seed"],
        created_by=data["created_by"],
        created_at=data["created_at"],
        cast=tuple(CastMember(**m) for m in data["cast"]),
        excerpts=tuple(data["excerpts"]),
        scenes=scenes,
        continuity=Continuity(**data["continuity"]),
        active=data["active"],
        consistency=data.get("consistency", DEFAULT_CONSISTENCY),
    )
