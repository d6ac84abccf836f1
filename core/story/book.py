"""Story-thread illustration: the /story, /cast and /illustrate commands, scenes and their panels."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image

from core.engine import MAX_REFERENCES
from core.errors import InvalidOption, NotAllowed, NotFound
from core.images import open_image, validate_upload
from core.options import resolve
from core.story.export import Panels, export_files, pdf_problem
from core.story.model import (
    DEFAULT_CONSISTENCY,
    SCENE_META,
    STORY_META,
    CastMember,
    Scene,
    ScenePlan,
    Story,
    picture_panel,
    story_from_dict,
    story_to_dict,
)
from core.story.planner import ScenePlanner, next_continuity
from core.types import EventType, GenerationRequest, ImagineOptions, Job, JobEvent, JobKind, JobStatus

if TYPE_CHECKING:
    from core.service import Huahua, MessageContext, Reply

logger = logging.getLogger(__name__)

MAX_CAST = 12
MAX_ILLUSTRATE = 4
MAX_EXCERPTS = 500
SEED_STRIDE = 7919
MAX_CONSISTENCY = 2.0
PANEL_RATE = 0.5
"""Panels drawn together (/illustrate 3) each read half of every other panel's tokens (StoryDiffusion's
rate at 512 pixels), while the story's consistency is on."""
REFERENCE_SIDE = 1024
"""Cast reference pictures are kept at most this many pixels a side (panels are drawn at 512-1024)."""
STORY_HELP = """Story commands:
/story new <title> [--style <preset>] — start this chat's story
/story add <excerpt> — add a passage
/illustrate — draw the latest passage (or the message you reply to); /illustrate 3 — the last three,
  drawn together so they share their characters' looks
/cast add <name>: <description> (send a picture with it: their reference) · /cast show <name>
/cast list · /cast remove <name>
/story consistency on|off|strength <0-2> — panels follow the cast's reference pictures (default on)
/story show · /story style <preset> · /story auto on|off · /story choose <panel> <picture>
/story rerender <panel> · /story export · /story end"""


class StoryBook:
    """A command family registered with the service. Stories live in the store as JSON documents."""

    commands: tuple[str, ...] = ("story", "cast", "illustrate", "")

    def __init__(self, service: Huahua, planner: ScenePlanner) -> None:
        self.service = service
        self.planner = planner
        service.listen("", self._on_event, frozenset({EventType.DONE}))
        service.on_choose = self.choose

    # storage -----------------------------------------------------------------------------------

    async def active(self, chat: str) -> Story | None:
        data = await self.service.store.active_story(chat)
        return story_from_dict(data) if data else None

    async def get(self, story_id: str) -> Story:
        data = await self.service.store.get_story(story_id) if isinstance(story_id, str) else None
        if data is None:
            raise NotFound("I can't find that story.")
        return story_from_dict(data)

    async def save(self, story: Story) -> None:
        await self.service.store.save_story(story.id, story.chat, story.active, story_to_dict(story))

    async def _require_active(self, chat: str) -> Story:
        story = await self.active(chat)
        if story is None:
            raise NotFound("There is no story in this chat yet: start one with /story new <title>.")
        return story

    # commands ----------------------------------------------------------------------------------

    def _lock(self, chat: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Story changes are read-modify-write of one document: one at a time per chat, in every process
        that shares the store."""
        return self.service.store.lock(f"story:{chat}")

    async def handle(self, chat: str, user: str, command: str, args: str, context: MessageContext) -> Reply:
        async with self._lock(chat):
            return await self._handle(chat, user, command, args, context)

    async def _handle(self, chat: str, user: str, command: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        if command == "":
            return await self._auto_excerpt(chat, user, args)
        if command == "illustrate":
            return await self._illustrate_command(chat, user, args, context)
        sub, _, rest = args.partition(" ")
        sub, rest = sub.lower(), rest.strip()
        if command == "cast":
            handlers = {
                "add": self._cast_add,
                "list": self._cast_list,
                "remove": self._cast_remove,
                "show": self._cast_show,
            }
        else:
            handlers = {
                "new": self._new,
                "add": self._add,
                "show": self._show,
                "style": self._style,
                "auto": self._auto,
                "choose": self._choose_command,
                "export": self._export,
                "end": self._end,
                "rerender": self._rerender_command,
                "consistency": self._consistency,
            }
        handler = handlers.get(sub)
        if handler is None:
            return Reply(texts=(STORY_HELP,))
        return await handler(chat, user, rest, context)

    async def _new(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        title, style = _split_style(args)
        if not title:
            raise InvalidOption("Give the story a title: /story new <title> [--style <preset>].")
        if len(title) > 100:
            raise InvalidOption("Keep the title under 100 characters.")
        current = await self.active(chat)
        if current is not None:
            raise InvalidOption(f"This chat already has a story, “{current.title}”: /story end it first.")
        if style is None:
            style = (await self.service.chat_settings(chat)).style
        preset = self.service.styles.get(style).name if style else None
        story = Story(
            id=uuid.uuid4().hex[:12],
            chat=chat,
            title=title,
            style=preset,
            base_seed=secrets.randbelow(2**31),
            created_by=user,
            created_at=time.time(),
        )
        await self.save(story)
        style_text = f" in the {preset} style" if preset else ""
        return Reply(
            texts=(
                f"📖 Started “{title}”{style_text}. Add characters with /cast add <name>: <description>, "
                "passages with /story add <text>, then /illustrate.",
            )
        )

    async def _add(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        story = await self._append_excerpt(story, args)
        return Reply(texts=(f"Added passage {len(story.excerpts)}. /illustrate draws it.",))

    async def _append_excerpt(self, story: Story, text: str) -> Story:
        excerpt = text.strip()
        if not excerpt:
            raise InvalidOption("Write the passage after the command: /story add <text>.")
        if len(story.excerpts) >= MAX_EXCERPTS:
            raise InvalidOption(f"A story holds at most {MAX_EXCERPTS} passages; start a new one.")
        self.service.moderator.check(excerpt)
        story = replace(story, excerpts=(*story.excerpts, excerpt))
        await self.save(story)
        return story

    async def _auto_excerpt(self, chat: str, user: str, text: str) -> Reply:
        from core.service import Reply

        if not text or not (await self.service.chat_settings(chat)).story_auto:
            return Reply()
        story = await self.active(chat)
        if story is None:
            return Reply()
        await self._append_excerpt(story, text)
        return Reply()

    async def _auto(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        value = args.lower()
        if value not in ("on", "off"):
            raise InvalidOption("Use /story auto on (every message is a passage) or /story auto off.")
        await self.service.update_chat_settings(chat, {"story_auto": value == "on"})
        meaning = (
            "every message in this chat is now a passage"
            if value == "on"
            else "only /story add adds passages"
        )
        return Reply(texts=(f"Saved: {meaning}.",))

    async def _style(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        if story.scenes:
            raise InvalidOption(
                "The style is locked once the first panel is drawn, so the book stays one piece."
            )
        preset = self.service.styles.get(args).name if args else None
        await self.save(replace(story, style=preset))
        return Reply(texts=(f"Story style: {preset or 'none'}.",))

    async def cast_add_with_picture(self, chat: str, user: str, args: str, picture: bytes) -> Reply:
        """`/cast add <name>: <description>` sent with a picture (an adapter's photo, attachment or
        upload): the picture becomes the member's reference. For a member already in the cast the
        picture replaces their reference (the description may then be left out)."""
        async with self._lock(chat):
            return await self._cast_add_picture(chat, user, args, picture)

    async def _cast_add_picture(self, chat: str, user: str, args: str, picture: bytes) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        digest = await self._store_reference(picture)  # a picture that is refused adds nobody
        name = re.split("[:：]", args, maxsplit=1)[0].strip()
        existing = story.member(name) if name else None
        if existing is None:
            reply = await self._cast_add(chat, user, args, None)
            story = await self._require_active(chat)
            existing = story.member(name)
            assert existing is not None
        else:
            reply = Reply()
        member = replace(existing, reference=digest, reference_from="picture")
        await self.save(replace(story, cast=tuple(member if m is existing else m for m in story.cast)))
        return Reply(
            texts=(*reply.texts, f"📌 {member.name}'s reference picture is set: panels with them follow it."),
        )

    async def _store_reference(self, picture: bytes) -> str:
        """Check an uploaded picture (byte count and header sizes before any pixel is decoded), shrink
        it to at most REFERENCE_SIDE a side and keep it as PNG in the image store."""
        png = await asyncio.to_thread(reference_png, picture)
        return await self.service.images.put(png)

    async def _cast_add(self, chat: str, user: str, args: str, context: MessageContext | None) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        name, sep, description = args.partition(":")
        if not sep:
            name, sep, description = args.partition("：")
        name, description = name.strip(), description.strip()
        if not name or not description:
            raise InvalidOption(
                "Use /cast add <name>: <description>, for example /cast add 莉莉: 穿红斗篷的小女孩."
            )
        if len(name) > 30 or len(description) > 200:
            raise InvalidOption("Keep names under 30 characters and descriptions under 200.")
        if story.member(name) is not None:
            raise InvalidOption(f"{name} is already in the cast; /cast remove {name} first to change them.")
        if len(story.cast) >= MAX_CAST:
            raise InvalidOption(f"A story has at most {MAX_CAST} characters.")
        self.service.moderator.check(f"{name} {description}")
        chinese, _, notes = await self.planner.to_chinese(description)
        self.service.moderator.check(chinese)
        offset = (len(story.cast) + 1) * SEED_STRIDE
        member = CastMember(name=name, description=chinese, seed_offset=offset)
        await self.save(replace(story, cast=(*story.cast, member)))
        return Reply(texts=(f"Cast: {name} — {chinese}", *notes))

    async def _cast_list(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        if not story.cast:
            return Reply(texts=("No characters yet: /cast add <name>: <description>.",))
        return Reply(texts=("\n".join(f"• {m.name}: {m.description}" for m in story.cast),))

    async def _cast_remove(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        member = story.member(args)
        if member is None:
            raise NotFound(f"There is no {args or 'such character'} in the cast.")
        await self.save(replace(story, cast=tuple(m for m in story.cast if m is not member)))
        return Reply(texts=(f"Removed {member.name} from the cast.",))

    async def _cast_show(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        member = story.member(args)
        if member is None:
            raise NotFound(f"There is no {args or 'such character'} in the cast: /cast show <name>.")
        lines = [f"• {member.name}: {member.description}"]
        if member.reference is None:
            lines.append(
                "No reference picture yet: send one with /cast add, or ⭐ a panel where they appear alone."
            )
            return Reply(texts=("\n".join(lines),))
        source = "the picture you gave" if member.reference_from == "picture" else member.reference_from
        lines.append(f"Reference: {source}.")
        picture = await self.service.image(member.reference)
        return Reply(texts=("\n".join(lines),), attachments=((f"{member.name}-reference.png", picture),))

    async def _consistency(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        words = args.lower().split()
        if words == ["on"]:
            strength = DEFAULT_CONSISTENCY
        elif words == ["off"]:
            strength = 0.0
        elif len(words) == 2 and words[0] == "strength" and _is_number(words[1]):
            strength = float(words[1])
            if not 0.0 <= strength <= MAX_CONSISTENCY:
                raise InvalidOption(f"Consistency strength runs from 0 (off) to {MAX_CONSISTENCY:g}.")
        else:
            raise InvalidOption(
                "Use /story consistency on, /story consistency off or /story consistency strength 0.8."
            )
        await self.save(replace(story, consistency=strength))
        if strength == 0.0:
            return Reply(texts=("Consistency off: panels are drawn from their text alone.",))
        return Reply(
            texts=(f"Consistency on (strength {strength:g}): panels follow the cast's reference pictures.",)
        )

    async def _illustrate_command(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        if context.reply_to_text:
            story = await self._append_excerpt(story, context.reply_to_text)
            excerpts = [len(story.excerpts) - 1]
        else:
            count = 1
            if args:
                if not args.isdigit() or not 1 <= int(args) <= MAX_ILLUSTRATE:
                    raise InvalidOption(
                        f"/illustrate takes how many recent passages to draw, 1 to {MAX_ILLUSTRATE}."
                    )
                count = int(args)
            if not story.excerpts:
                raise InvalidOption("Add a passage first: /story add <text>.")
            excerpts = list(range(max(0, len(story.excerpts) - count), len(story.excerpts)))
        story, job = await self.illustrate_together(
            story, [story.excerpts[i] for i in excerpts], user, context.meta
        )
        first = len(story.scenes) - len(excerpts) + 1
        texts = [f"🖼 Panel {first + i}: {prompt}" for i, prompt in enumerate(job.request.prompts)]
        if len(excerpts) > 1:
            texts.append(
                f"Panels {first}–{first + len(excerpts) - 1} are drawn together"
                + (", sharing their characters' looks." if job.request.panel_rate else ".")
            )
        return Reply(texts=("\n".join(texts),), jobs=(job,))  # one status text for the one job

    async def illustrate(
        self, story: Story, excerpt: str, user: str, meta: dict[str, str] | None = None
    ) -> tuple[Story, Job]:
        """Plan one excerpt into a scene, queue its picture and record the scene on the story.

        `meta` holds the adapter's platform ids for the job, beside the story's own keys."""
        return await self.illustrate_together(story, [excerpt], user, meta)

    async def illustrate_together(
        self, story: Story, excerpts: list[str], user: str, meta: dict[str, str] | None = None
    ) -> tuple[Story, Job]:
        """Plan each excerpt into a scene (in order, each continuing the last) and queue them as one job:
        one picture alone, or several panels drawn together as one batch, in which each panel also
        reads a sample of the others' tokens while the story's consistency is on (`PANEL_RATE`)."""
        planned: list[tuple[ScenePlan, GenerationRequest, tuple[str, ...]]] = []
        for excerpt in excerpts:
            plan, request, notes = await self._plan_scene(story, excerpt)
            planned.append((plan, request, notes))
            story = replace(story, continuity=next_continuity(plan, story.continuity))
        first = len(story.scenes) + 1
        request = planned[0][1]
        notes = planned[0][2]
        if len(planned) > 1:
            request = _drawn_together(story, [(plan, request) for plan, request, _ in planned])
            notes = tuple(f"Panel {first + i}: {note}" for i, (_, _, ns) in enumerate(planned) for note in ns)
        job = await self.service.submit_request(
            user,
            story.chat,
            JobKind.SCENE,
            "\n\n".join(excerpts),
            request,
            notes=notes,
            meta={**(meta or {}), STORY_META: story.id, SCENE_META: str(first)},
        )
        scenes = tuple(
            Scene(
                index=first + i,
                excerpt=excerpt,
                plan=plan,
                request=request,
                model=self.service.model_name,
                job_ids=(job.id,),
                panel=i if request.panels else 0,
            )
            for i, (excerpt, (plan, _, _)) in enumerate(zip(excerpts, planned, strict=True))
        )
        story = replace(story, scenes=(*story.scenes, *scenes))
        await self.save(story)
        return story, job

    async def _plan_scene(
        self, story: Story, excerpt: str
    ) -> tuple[ScenePlan, GenerationRequest, tuple[str, ...]]:
        """The excerpt's scene plan, the request that draws it alone, and the notes for its caption."""
        plan = await self.planner.plan(excerpt, story)
        prompt, cut = self.planner.compose(plan, story)
        service = self.service
        resolved = resolve(
            ImagineOptions(text=excerpt, style=story.style),
            service.settings,
            service.styles,
            await service.engine.fetch_limits(),
        )
        lead = story.member(plan.characters[0]) if plan.characters else None
        references = scene_references(story, plan.characters)
        request = replace(
            service.default_request(),
            prompt=prompt,
            negative_prompt=service.builder.negative_prompt(story.style),
            width=resolved.width,
            height=resolved.height,
            steps=resolved.steps,
            guidance_scale=resolved.guidance_scale,
            seed=(story.base_seed + (lead.seed_offset if lead else 0)) % 2**32,
            references=tuple(digest for digest, _ in references),
            reference_words=tuple(words for _, words in references),
            consistency=story.consistency if references else 0.0,
        )
        notes = plan.notes + ((f"Left out to fit the model's limit: {'、'.join(cut)}.",) if cut else ())
        return plan, request, notes

    async def rerender(
        self, story_id: str, scene_index: int, user: str, meta: dict[str, str] | None = None
    ) -> Job:
        """Queue the scene's stored request again: the same prompt, seed and parameters."""
        story = await self.get(story_id)
        scene = story.scene(scene_index)
        if scene is None:
            raise NotFound(f"The story has no panel {scene_index}.")
        batch = [s for s in story.scenes if s.first_of_batch == scene.first_of_batch and s.request.panels]
        return await self.service.submit_request(
            user,
            story.chat,
            JobKind.SCENE,
            "\n\n".join(s.excerpt for s in batch) if scene.request.panels else scene.excerpt,
            scene.request,
            meta={**(meta or {}), STORY_META: story.id, SCENE_META: str(scene.first_of_batch)},
        )

    async def _rerender_command(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        job = await self.rerender(story.id, _panel_number(args, story), user, context.meta)
        if job.request.panels:
            first = int(job.meta[SCENE_META])
            last = first + len(job.request.panels) - 1
            text = f"Re-drawing panels {first}–{last} exactly as before (they were drawn together)."
        else:
            text = f"Re-drawing panel {args.strip()} exactly as before."
        return Reply(texts=(text,), jobs=(job,))

    async def choose(self, job: Job, image_index: int, user: str) -> Story:
        """The group's choice (⭐) of one picture of a scene's variants becomes the book's panel."""
        async with self._lock(job.chat):
            return await self._choose(job, image_index, user)

    async def _choose(self, job: Job, image_index: int, user: str) -> Story:
        panel = picture_panel(job, image_index)
        if panel is None:
            raise InvalidOption("Only story pictures can be chosen for the book.")
        if job.status != JobStatus.DONE or not 0 <= image_index < len(job.images):
            raise InvalidOption("Choose a finished picture.")
        story = await self.get(job.meta[STORY_META])
        scene = story.scene(panel)
        if scene is None:
            raise NotFound("That panel is no longer in the story.")
        job_ids = scene.job_ids if job.id in scene.job_ids else (*scene.job_ids, job.id)
        chosen = replace(scene, job_ids=job_ids, chosen=(job.id, image_index))
        story = replace(story, scenes=tuple(chosen if s.index == scene.index else s for s in story.scenes))
        story = _first_panel_as_reference(story, chosen, job.images[image_index])
        await self.save(story)
        return story

    async def _choose_command(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        panel_text, _, picture_text = args.partition(" ")
        scene = story.scene(_panel_number(panel_text, story))
        assert scene is not None
        variants = await self.variants(scene)
        picture = picture_text.strip()
        if not picture.isdigit() or not 1 <= int(picture) <= len(variants):
            raise InvalidOption(
                f"Panel {scene.index} has pictures 1 to {len(variants)}: "
                f"/story choose {scene.index} <picture>."
            )
        job, image_index = variants[int(picture) - 1]
        await self._choose(job, image_index, user)
        return Reply(texts=(f"⭐ Panel {scene.index} now uses picture {picture}.",))

    async def variants(self, scene: Scene) -> list[tuple[Job, int]]:
        """Every finished picture of the scene, in the order its jobs were made."""
        found: list[tuple[Job, int]] = []
        for job_id in scene.job_ids:
            job = await self.service.store.get_job(job_id)
            if job is not None and job.status == JobStatus.DONE:
                found.extend((job, i) for i in range(len(job.images)) if picture_panel(job, i) == scene.index)
        return found

    async def panel_image(self, scene: Scene) -> str | None:
        """The chosen picture's digest, else the first finished one."""
        if scene.chosen is not None:
            job = await self.service.store.get_job(scene.chosen[0])
            if job is not None and scene.chosen[1] < len(job.images):
                return job.images[scene.chosen[1]]
        variants = await self.variants(scene)
        return variants[0][0].images[variants[0][1]] if variants else None

    async def _show(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        lines = [f"📖 {story.title}" + (f" · {story.style}" if story.style else "")]
        if story.cast:
            lines.append("Cast: " + ", ".join(m.name for m in story.cast))
        attachments = []
        for scene in story.scenes[-4:]:
            digest = await self.panel_image(scene)
            state = "" if digest else " (still drawing)"
            lines.append(f"{scene.index}. {scene.excerpt[:80]}{state}")
            if digest:
                attachments.append((f"panel-{scene.index}.png", await self.service.image(digest)))
        if not story.scenes:
            lines.append(f"{len(story.excerpts)} passage(s), no panels yet: /illustrate draws the latest.")
        return Reply(texts=("\n".join(lines),), attachments=tuple(attachments))

    async def _export(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        files = await self.export_files(story)
        problem = pdf_problem(files)
        kinds = "as HTML and PDF." if problem is None else f"as HTML only. {problem}"
        return Reply(
            texts=(f"📚 The storybook “{story.title}”: {len(story.scenes)} panels, {kinds}",),
            attachments=files,
        )

    async def panel_pictures(self, story: Story) -> Panels:
        """The chosen (or latest) picture of every panel that has one, in order, as PNG bytes."""
        panels = []
        for scene in story.scenes:
            digest = await self.panel_image(scene)
            if digest is not None:
                panels.append((scene, await self.service.image(digest)))
        return panels

    async def export_files(self, story: Story) -> tuple[tuple[str, bytes], ...]:
        """The storybook as `<title>.html` and, when a Chinese font is installed, `<title>.pdf`."""
        return await export_files(story, await self.panel_pictures(story))

    async def for_sharing(self, chat: str, user: str, is_admin: Callable[[], Awaitable[bool]]) -> SharedStory:
        """The chat's storybook, ready for a gallery channel; only its author or an admin may share it.

        `is_admin` is asked only when `user` did not start the story (it may cost a platform call)."""
        story = await self.active(chat)
        if story is None:
            raise NotFound("There is no story in this chat to share: start one with /story new <title>.")
        if story.created_by != user and not await is_admin():
            raise NotAllowed("Only the person who started the story, or an admin, can share it.")
        panels: list[tuple[str, bytes]] = []
        for scene in story.scenes:
            digest = await self.panel_image(scene)
            if digest is not None:
                panels.append((f"panel-{scene.index}.png", await self.service.image(digest)))
        if not panels:
            raise InvalidOption("The story has no finished panels yet: /illustrate draws some.")
        return SharedStory(story, tuple(panels), await self.export_files(story))

    async def _end(self, chat: str, user: str, args: str, context: MessageContext) -> Reply:
        from core.service import Reply

        story = await self._require_active(chat)
        if user != story.created_by and not (args == "--force" and context.is_admin):
            raise NotAllowed(
                "Only the person who started the story can end it (or an admin, with /story end --force)."
            )
        await self.save(replace(story, active=False))
        return Reply(
            texts=(f"📕 “{story.title}” is finished: {len(story.scenes)} panels. /story new starts another.",)
        )

    # events ------------------------------------------------------------------------------------

    async def _on_event(self, job: Job, event: JobEvent) -> None:
        """Rerolls and variations of a scene's picture become that scene's variants."""
        if event.type != EventType.DONE or STORY_META not in job.meta:
            return
        async with self._lock(job.chat):
            await self._add_variant(job)

    async def _add_variant(self, job: Job) -> None:
        try:
            story = await self.get(job.meta[STORY_META])
        except NotFound:
            return
        panels = {picture_panel(job, i) for i in range(len(job.images))}
        scenes = tuple(
            replace(s, job_ids=(*s.job_ids, job.id)) if s.index in panels and job.id not in s.job_ids else s
            for s in story.scenes
        )
        if scenes != story.scenes:
            await self.save(replace(story, scenes=scenes))


@dataclass(frozen=True)
class SharedStory:
    """What a gallery post of a storybook carries: the chosen panels, then the HTML and PDF."""

    story: Story
    panels: tuple[tuple[str, bytes], ...]
    files: tuple[tuple[str, bytes], ...]


def scene_references(story: Story, characters: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(digest, the words that name the character in prompts) of the reference pictures of the
    characters present, in their order, each once, at most MAX_REFERENCES (every one is an extra UNet
    pass per shared step); none when consistency is off."""
    if story.consistency == 0.0:
        return ()
    found: dict[str, str] = {}
    for name in characters:
        member = story.member(name)
        if member is not None and member.reference and member.reference not in found:
            found[member.reference] = member.description
    return tuple(found.items())[:MAX_REFERENCES]


def _drawn_together(story: Story, panels: list[tuple[ScenePlan, GenerationRequest]]) -> GenerationRequest:
    """One request for panels drawn as one batch: the first panel's parameters and seed (panel i draws
    from seed + i), every panel's prompt, and the references of every character present, each once."""
    first = panels[0][1]
    characters = tuple(name for plan, _ in panels for name in plan.characters)
    references = scene_references(story, characters)
    sharing = story.consistency > 0.0
    return replace(
        first,
        panels=tuple(request.prompt for _, request in panels),
        n=len(panels),
        references=tuple(digest for digest, _ in references),
        reference_words=tuple(words for _, words in references),
        consistency=story.consistency if sharing else 0.0,
        panel_rate=PANEL_RATE if sharing else 0.0,
    )


def _first_panel_as_reference(story: Story, scene: Scene, digest: str) -> Story:
    """A member without a reference takes the first ⭐-chosen panel they appear in alone (a panel
    with two characters would carry the other one's looks into every later panel)."""
    if len(scene.plan.characters) != 1:
        return story
    member = story.member(scene.plan.characters[0])
    if member is None or member.reference is not None:
        return story
    updated = replace(member, reference=digest, reference_from=f"panel {scene.index}")
    return replace(story, cast=tuple(updated if m is member else m for m in story.cast))


def reference_png(picture: bytes) -> bytes:
    """A cast member's uploaded picture as a PNG of at most REFERENCE_SIDE a side; InvalidOption for
    what is no usable picture (sizes checked from the header before decoding: no decompression bomb)."""
    validate_upload(picture, decode=False)
    image = open_image(picture).convert("RGB")
    image.thumbnail((REFERENCE_SIDE, REFERENCE_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _split_style(args: str) -> tuple[str, str | None]:
    match = re.search(r"(?:^|\s)(?:--|—)style\s+(\S+)", args)
    if match is None:
        return args.strip(), None
    return (args[: match.start()] + args[match.end() :]).strip(), match.group(1)


def _panel_number(text: str, story: Story) -> int:
    text = text.strip()
    if not text.isdigit() or story.scene(int(text)) is None:
        raise InvalidOption(
            f"Choose a panel from 1 to {len(story.scenes)}." if story.scenes else "No panels yet."
        )
    return int(text)


def story_json(story: Story, images: dict[int, list[str]], chosen: dict[int, str | None]) -> dict[str, Any]:
    """The web API's view of a story."""
    return {
        "id": story.id,
        "title": story.title,
        "style": story.style,
        "active": story.active,
        "cast": [
            {
                "name": m.name,
                "description": m.description,
                "reference": m.reference,
                "reference_from": m.reference_from,
            }
            for m in story.cast
        ],
        "scenes": [
            {
                "index": scene.index,
                "excerpt": scene.excerpt,
                "prompt_zh": scene.own_request.prompt,
                "seed": scene.own_request.seed,
                "drawn_with": list(range(scene.first_of_batch, scene.first_of_batch + scene.request.n))
                if scene.request.panels
                else [],
                "params": {
                    "width": scene.request.width,
                    "height": scene.request.height,
                    "steps": scene.request.steps,
                    "guidance_scale": scene.request.guidance_scale,
                    "sampler": scene.request.sampler,
                },
                "model": scene.model,
                "images": images.get(scene.index, []),
                "chosen": chosen.get(scene.index),
            }
            for scene in story.scenes
        ],
    }
