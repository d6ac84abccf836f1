"""The Huahua service: the one object every adapter calls. It validates, moderates, queues and runs jobs."""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from core import presenter
from core.chat_settings import ChatSettings, parse_setting
from core.engine import Engine
from core.errors import (
    HuahuaError,
    InvalidOption,
    NotAllowed,
    NotFound,
    QuotaExceeded,
    ServiceUnavailable,
)
from core.events import ALL_EVENTS, EventBus, EventRelay, Listener
from core.jobs.queue import too_many_jobs
from core.jobs.runner import JobRunner, process_owner
from core.outbox import Outbox
from core.settings import Settings
from core.story.model import SCENE_META, picture_panel
from core.types import (
    Action,
    BuiltPrompt,
    EventType,
    GenerationRequest,
    ImagineOptions,
    Job,
    JobEvent,
    JobKind,
    JobStatus,
)

if TYPE_CHECKING:
    from core.jobs.queue import JobQueue
    from core.moderation import Moderator
    from core.prompting.builder import PromptBuilder
    from core.prompting.styles import StyleBook
    from core.storage.images import ImageStore
    from core.storage.store import Store

logger = logging.getLogger(__name__)

VARIATION_STRENGTH = 0.6
UPSCALE_STRENGTH = 0.35
RECENT_JOBS = 50
REMEMBERED_IDS = 256
"""How many early cancel requests (a job between get() and start) and caught-up jobs are remembered."""
CARRIED_META_PREFIX = "story"
"""Job meta keys that rerolls, variations and upscales inherit (platform ids are per job)."""


@dataclass(frozen=True)
class Reply:
    """What an adapter posts back for one incoming message: sentences, and the job it started if any."""

    texts: tuple[str, ...] = ()
    jobs: tuple[Job, ...] = ()
    attachments: tuple[tuple[str, bytes], ...] = ()
    """(file name, bytes) pairs, e.g. an exported storybook or the latest story panels."""
    error: HuahuaError | None = None
    """Set when the message was refused (`texts` then holds its sentence), e.g. for an HTTP status."""

    @property
    def job(self) -> Job | None:
        """The first job started, for the common one-job reply."""
        return self.jobs[0] if self.jobs else None


class CommandHandler(Protocol):
    """A plug-in command family (e.g. the story commands) the service dispatches to."""

    commands: tuple[str, ...]

    async def handle(
        self, chat: str, user: str, command: str, args: str, context: MessageContext
    ) -> Reply: ...


@dataclass(frozen=True)
class MessageContext:
    """What an adapter knows about a message beyond its text; `is_admin` may change chat settings."""

    is_admin: bool = False
    reply_to_text: str | None = None
    meta: dict[str, str] = dataclasses.field(default_factory=dict)


class Huahua:
    """Built by `core.app.build_service`; adapters call `handle_message`, `imagine` and `act`, and listen."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        images: ImageStore,
        queue: JobQueue,
        engine: Engine,
        builder: PromptBuilder,
        moderator: Moderator,
        styles: StyleBook,
        relay: EventRelay | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.images = images
        self.queue = queue
        self.engine = engine
        self.builder = builder
        self.moderator = moderator
        self.styles = styles
        self.events = EventBus()
        self.relay = relay
        """Set when processes share the queue: events and cancels then reach the other processes."""
        self.owner = process_owner()
        """This process's name on job leases and delivery claims."""
        self.runner = JobRunner(
            settings,
            store=store,
            images=images,
            queue=queue,
            engine=engine,
            events=self.events,
            owner=self.owner,
            on_started=self._started,
            on_idle=lambda: self._in_background(self._announce_positions()),
        )
        self.outbox = Outbox(store, self.events, owner=self.owner)
        """Adapters `serve` their platform's deliveries (results owed to chats) through it."""
        self._watching: dict[str, Job] = {}
        """With a relay: jobs submitted here and not finished yet, re-read after a reconnect."""
        self._caught_up: OrderedDict[str, None] = OrderedDict()
        """Jobs whose final state a reconnect delivered: their relayed final event may still come."""
        self._background: set[asyncio.Task[None]] = set()
        self._waiting: dict[str, Job] = {}
        """Jobs this process queued and has not yet started: the ones whose position it announces."""
        self._handlers: dict[str, CommandHandler] = {}
        self.on_choose: Callable[[Job, int, str], Awaitable[Any]] | None = None

    # lifecycle ---------------------------------------------------------------------------------

    async def start(self, *, recover: bool = True) -> None:
        """Connect the relay, start the engine and the runner. `recover=False` (a one-shot command such
        as `huahua imagine`) leaves other processes' unfinished jobs alone."""
        if self.relay is not None:
            self.events.forward = await self.relay.start(
                self._deliver_relayed, self._cancel_running, self._catch_up
            )
        elif self.settings.workers == 0:
            logger.warning("no workers and no shared queue: jobs queued here will never run")
        await self.engine.start()
        await self.runner.start(recover=recover)
        logger.info(
            "service %s started with engine %s and %d worker(s)",
            self.owner,
            self.engine.name,
            self.settings.workers,
        )

    async def stop(self) -> None:
        """Stop taking work; running jobs go back to the queue (for this or another process) first."""
        await self.runner.stop()
        await self.outbox.close()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.events.drain()
        if self.relay is not None:
            await self.relay.close()
            self.events.forward = None
        await self.queue.close()
        await self.engine.close()
        await self.store.close()
        await self.images.close()

    # commands ----------------------------------------------------------------------------------

    def register(self, handler: CommandHandler) -> None:
        for command in handler.commands:
            self._handlers[command] = handler

    async def handle_message(
        self, chat: str, user: str, text: str, context: MessageContext | None = None
    ) -> Reply:
        """Answer one chat message. Errors come back as one friendly sentence, never as an exception."""
        context = context or MessageContext()
        try:
            return await self._dispatch(chat, user, text, context)
        except HuahuaError as err:
            return Reply(texts=(err.message,), error=err)

    async def _dispatch(self, chat: str, user: str, text: str, context: MessageContext) -> Reply:
        if not isinstance(text, str):
            raise InvalidOption("A message must be text.")
        if len(text) > self.settings.max_text_length:
            raise InvalidOption(
                f"That message is too long: keep it under {self.settings.max_text_length} characters."
            )
        stripped = text.strip()
        if not stripped.startswith("/"):
            handler = self._handlers.get("")
            if handler is not None:
                return await handler.handle(chat, user, "", stripped, context)
            return Reply()
        command, _, args = stripped[1:].partition(" ")
        command = command.split("@", 1)[0].lower()
        args = args.strip()
        if command in ("start", "help"):
            return Reply(texts=(presenter.HELP,))
        if command == "imagine":
            from core.options import parse_imagine

            job = await self.imagine(chat, user, parse_imagine(args), meta=context.meta)
            return Reply(texts=(self.queued_text(job, await self.position(job.id)),), jobs=(job,))
        if command == "settings":
            return await self._settings_command(chat, args, context)
        handler = self._handlers.get(command)
        if handler is not None:
            return await handler.handle(chat, user, command, args, context)
        raise InvalidOption(f"I don't know /{command}. Try /help.")

    def queued_text(self, job: Job, position: int | None) -> str:
        lines = [presenter.status_line(job, position)]
        lines.extend(presenter.prompt_lines(job.request))
        lines.extend(job.notes)
        return "\n".join(lines)

    async def _settings_command(self, chat: str, args: str, context: MessageContext) -> Reply:
        if not args:
            current = await self.chat_settings(chat)
            return Reply(texts=(f"Settings for this chat: {current.describe()}.",))
        if not context.is_admin:
            raise NotAllowed("Only the chat's admins can change its settings.")
        key, _, value = args.partition(" ")
        name, changes = parse_setting(key, value.strip(), self.styles, self.settings)
        updated = await self.update_chat_settings(chat, changes)
        return Reply(texts=(f"Saved: {name} = {updated.shown(name)}.",))

    async def chat_settings(self, chat: str) -> ChatSettings:
        return ChatSettings.from_dict(await self.store.get_settings(f"chat:{chat}"))

    async def update_chat_settings(self, chat: str, changes: dict[str, Any]) -> ChatSettings:
        return ChatSettings.from_dict(await self.store.update_settings(f"chat:{chat}", changes))

    # jobs --------------------------------------------------------------------------------------

    async def imagine(
        self, chat: str, user: str, options: ImagineOptions, meta: dict[str, str] | None = None
    ) -> Job:
        """Validate, build the Chinese prompt, moderate, check the quota and queue a new job."""
        from core.options import resolve

        chat_settings = await self.chat_settings(chat)
        if not chat_settings.enabled:
            raise NotAllowed("Huahua is switched off in this chat.")
        if chat_settings.style and options.style is None:
            options = replace(options, style=chat_settings.style)
        resolved = resolve(options, self.settings, self.styles, await self.engine.fetch_limits())
        self._moderate(resolved.text)
        built: BuiltPrompt = await self.builder.build(
            resolved.text, style=resolved.style, negative=resolved.negative
        )
        request = replace(
            self.default_request(),
            prompt=built.prompt,
            negative_prompt=built.negative_prompt,
            width=resolved.width,
            height=resolved.height,
            steps=resolved.steps,
            guidance_scale=resolved.guidance_scale,
            seed=resolved.seed,
            n=resolved.n,
        )
        return await self.submit_request(
            user, chat, JobKind.IMAGINE, options.text, request, notes=built.notes, meta=meta
        )

    def default_request(self) -> GenerationRequest:
        return GenerationRequest(
            prompt="",
            steps=self.settings.default_steps,
            guidance_scale=self.settings.default_guidance,
            sampler=self.settings.sampler,
        )

    @property
    def model_name(self) -> str:
        """The model behind the pictures, kept with story panels as provenance."""
        return f"{self.engine.name}" + (f" ({self.engine.label})" if self.engine.label else "")

    async def submit_request(
        self,
        user: str,
        chat: str,
        kind: JobKind,
        source_text: str,
        request: GenerationRequest,
        *,
        notes: tuple[str, ...] = (),
        meta: dict[str, str] | None = None,
    ) -> Job:
        """Moderate an already built request (each panel's prompt) and queue it (the story planner
        builds its own prompts)."""
        for prompt in request.prompts:
            self._moderate(prompt)
        job = self._new_job(user, chat, kind, source_text, request, notes=notes, meta=meta)
        return await self.submit(job)

    def _moderate(self, text: str) -> None:
        try:
            self.moderator.check(text)
        except HuahuaError:
            self._count("blocked")
            raise

    def _count(self, name: str) -> None:
        task = asyncio.create_task(self.store.incr_counter(name))
        task.add_done_callback(lambda t: t.exception())

    def _new_job(
        self,
        user: str,
        chat: str,
        kind: JobKind,
        source_text: str,
        request: GenerationRequest,
        *,
        notes: tuple[str, ...] = (),
        parent: Job | None = None,
        parent_index: int | None = None,
        init_image: str | None = None,
        meta: dict[str, str] | None = None,
    ) -> Job:
        return Job(
            id=uuid.uuid4().hex[:16],
            user=user,
            chat=chat,
            kind=kind,
            source_text=source_text,
            request=request,
            notes=notes,
            parent_id=parent.id if parent else None,
            parent_index=parent_index,
            init_image=init_image,
            engine_label=self.engine.label,
            created_at=time.time(),
            meta=dict(meta or {}),
        )

    async def submit(self, job: Job) -> Job:
        """Check the engine, admit the job against the quota and pending limit (one atomic store step),
        queue it and announce its position."""
        await self.engine.ensure_ready()
        await self._admit(job)
        try:
            position = await self.queue.put(job)
        except HuahuaError:
            if await self.store.discard_job(job.id):  # refused: no record, no quota used
                raise
            # Not refused after all: while the queue failed here, a recovery sweep sharing the store
            # queued the job and a worker took it up. It is the user's job; its events come relayed.
            logger.warning("job %s: the queue failed here but the job was already taken up", job.id)
            if self.relay is not None:
                self._watching[job.id] = job
            return job
        self._waiting[job.id] = job
        if self.relay is not None:
            self._watching[job.id] = job
        self.events.publish(job, JobEvent(job.id, EventType.QUEUED, position=position))
        return job

    async def _admit(self, job: Job) -> None:
        chat_settings = await self.chat_settings(job.chat)
        quota = chat_settings.daily_quota
        if quota is None:
            quota = self.settings.daily_image_quota
        day = time.gmtime(job.created_at)
        day_start = float(calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0)))
        admission = await self.store.admit_job(
            job, daily_quota=quota, max_pending=self.settings.user_max_pending, day_start=day_start
        )
        if admission.refused_by == "pending":
            raise too_many_jobs(self.settings.user_max_pending)
        if not admission.admitted:
            self._count("quota_refused")
            left = max(0, quota - admission.images_today)
            asked = f"{job.request.n} pictures" if job.request.n > 1 else "another picture"
            raise QuotaExceeded(
                f"Your daily quota is {quota} pictures and {left} are left today, not enough for {asked}; "
                "it resets at 00:00 UTC."
            )

    async def act(
        self,
        job_id: str,
        action: Action | str,
        index: int,
        user: str,
        meta: dict[str, str] | None = None,
        *,
        is_admin: bool = False,
    ) -> Job:
        """A button: reroll, variation or upscale make a new job (with the adapter's `meta`); cancel stops
        this one; choose picks a story picture for the book."""
        try:
            action = Action(action)
        except ValueError:
            raise InvalidOption("The action must be reroll, variation, upscale, cancel or choose.") from None
        parent = await self.get_job(job_id)
        if action == Action.CANCEL:
            return await self.cancel(job_id, user, is_admin=is_admin)
        if action == Action.CHOOSE:
            if self.on_choose is None:
                raise InvalidOption("Only story pictures can be chosen for a storybook.")
            await self.on_choose(parent, index, user)
            return parent
        carried = {key: value for key, value in parent.meta.items() if key.startswith(CARRIED_META_PREFIX)}
        carried.update(meta or {})
        if action == Action.REROLL:
            request = replace(parent.request, seed=secrets.randbelow(2**32))
            job = self._new_job(
                user, parent.chat, JobKind.REROLL, parent.source_text, request, parent=parent, meta=carried
            )
            return await self.submit(job)
        if parent.status != JobStatus.DONE or not parent.images:
            raise InvalidOption("That picture is not ready yet: wait for it to finish.")
        if not isinstance(index, int) or not 0 <= index < len(parent.images):
            raise InvalidOption(f"Choose a picture from 1 to {len(parent.images)}.")
        image = parent.images[index]
        base = parent.request
        if base.panels:  # one panel of panels drawn together: its own prompt and seed, its own panel
            base = base.panel(index)
            panel = picture_panel(parent, index)
            if panel is not None:
                carried[SCENE_META] = str(panel)
        if action == Action.VARIATION:
            request = replace(base, n=1, seed=secrets.randbelow(2**32), strength=VARIATION_STRENGTH)
            kind = JobKind.VARIATION
        else:
            width, height = base.width * 2, base.height * 2
            if not (await self.engine.fetch_limits()).fits(width, height):
                raise InvalidOption("That picture is already as large as this engine can upscale.")
            request = replace(base, n=1, width=width, height=height, strength=UPSCALE_STRENGTH)
            kind = JobKind.UPSCALE
        job = self._new_job(
            user,
            parent.chat,
            kind,
            parent.source_text,
            request,
            parent=parent,
            parent_index=index,
            init_image=image,
            meta=carried,
        )
        return await self.submit(job)

    async def cancel(self, job_id: str, user: str, *, is_admin: bool = False) -> Job:
        job = await self.get_job(job_id)
        if job.user != user and not is_admin:
            raise NotAllowed("Only the person who asked for this picture can cancel it.")
        if job.status.finished:
            return job
        if await self.queue.remove(job_id):
            self._waiting.pop(job_id, None)
            cancelled = await self.runner.finish(job, JobStatus.CANCELLED)
            if cancelled is not None:
                return cancelled
        if not self._cancel_running(job_id) and self.relay is not None:
            self.relay.request_cancel(job_id)
        return job

    async def get_job(self, job_id: str) -> Job:
        job = await self.store.get_job(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise NotFound("I can't find that job; it may have been removed.")
        if job.id in self.runner.progress:
            job = replace(job, progress=self.runner.progress[job.id])
        return job

    async def last_result(self, chat: str, user: str) -> Job:
        """The user's latest finished job with pictures in this chat (what a bare /share posts)."""
        for job in await self.store.recent_jobs(chat, RECENT_JOBS):
            if job.user == user and job.status == JobStatus.DONE and job.images:
                return job
        raise NotFound("There is nothing to share yet: draw something with /imagine first.")

    async def position(self, job_id: str) -> int | None:
        """The job's place in the queue; None when it is not waiting, or the queue cannot say right now (an
        accepted job stays accepted while Redis is away)."""
        try:
            return await self.queue.position(job_id)
        except ServiceUnavailable:
            return None

    async def counters(self) -> dict[str, int]:
        """Running totals for operators: jobs_done, blocked (moderation), quota_refused."""
        return await self.store.counters()

    async def image(self, digest: str) -> bytes:
        """A stored picture's PNG bytes; NotFound for an unknown or malformed digest."""
        return await self.images.get(digest)

    def listen(self, chat_prefix: str, listener: Listener, types: frozenset[EventType] = ALL_EVENTS) -> None:
        """Deliver job events to an adapter; survives restarts, since recovered jobs emit events too."""
        self.events.listen(chat_prefix, listener, types)

    def handler(self, command: str) -> CommandHandler | None:
        """The plug-in registered for a command (e.g. "story" -> the StoryBook), if any."""
        return self._handlers.get(command)

    def commands(self) -> tuple[str, ...]:
        """Every command the service answers, for platform command menus ("" = plain messages)."""
        return ("start", "help", "imagine", "settings", *self._handlers)

    async def subscribe(self, job_id: str) -> AsyncIterator[JobEvent]:
        """Events of one job until it ends, starting with its current state."""
        await self.get_job(job_id)

        async def snapshot() -> JobEvent:
            return _current_event(await self.get_job(job_id), await self.position(job_id))

        async for event in self.events.subscribe(job_id, snapshot):
            yield event

    async def update_meta(self, job_id: str, meta: dict[str, str]) -> Job:
        """Keep platform ids (status message, reply target) on the job, so delivery survives restarts."""
        if not isinstance(job_id, str) or await self.store.get_job(job_id) is None:
            raise NotFound("I can't find that job; it may have been removed.")
        return await self.store.merge_meta(job_id, meta)

    # bookkeeping ------------------------------------------------------------------------------

    def _started(self, job_id: str) -> None:
        self._waiting.pop(job_id, None)

    async def _announce_positions(self) -> None:
        watched = [job for job in self._waiting.values() if self.events.wants(job, EventType.POSITION)]
        if not watched:
            return
        positions = await self.queue.positions()
        for job in watched:
            position = positions.get(job.id)
            if position is not None:
                self.events.publish(job, JobEvent(job.id, EventType.POSITION, position=position))

    # other processes (a shared queue with a relay) --------------------------------------------

    def _cancel_running(self, job_id: str) -> bool:
        """Cancel a job running here; else remember the request briefly, in case it is about to start."""
        return self.runner.cancel_running(job_id, remember=self.relay is not None)

    def _deliver_relayed(self, job: Job, event: JobEvent) -> None:
        """Another process's event: deliver it here as if local, and keep this process's books."""
        if event.type == EventType.STARTED or event.type.final:
            self._waiting.pop(job.id, None)
        if event.type.final:
            if job.id in self._caught_up:
                del self._caught_up[job.id]
                return
            self._watching.pop(job.id, None)
            if self._waiting:
                self._in_background(self._announce_positions())
        self.events.deliver(job, event)

    async def _catch_up(self) -> None:
        """After the relay reconnects: deliver the final state of watched jobs that ended meanwhile."""
        for job_id in {*self._watching, *self.events.subscribed()}:
            job = await self.store.get_job(job_id)
            if job is not None and job.status.finished and job_id not in self.runner.running:
                self._waiting.pop(job_id, None)
                self._watching.pop(job_id, None)
                _remember(self._caught_up, job_id)
                self.events.deliver(job, _current_event(job, None))
        await self._announce_positions()

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.create_task(_logged(work))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _remember(ids: OrderedDict[str, None], job_id: str) -> None:
    """Add to a bounded set of recent job ids, dropping the oldest."""
    ids[job_id] = None
    while len(ids) > REMEMBERED_IDS:
        ids.popitem(last=False)


async def _logged(work: Awaitable[None]) -> None:
    try:
        await work
    except HuahuaError as err:
        logger.warning("background work failed: %s", err.message)
    except Exception:
        logger.exception("background work failed")


def _current_event(job: Job, position: int | None) -> JobEvent:
    kinds = {
        JobStatus.QUEUED: EventType.POSITION,
        JobStatus.RUNNING: EventType.PROGRESS,
        JobStatus.DONE: EventType.DONE,
        JobStatus.FAILED: EventType.FAILED,
        JobStatus.CANCELLED: EventType.CANCELLED,
    }
    return JobEvent(job.id, kinds[job.status], progress=job.progress, position=position, error=job.error)
