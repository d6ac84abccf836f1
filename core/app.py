"""Composition root: the one place that picks implementations of the ports from the settings."""

from __future__ import annotations

import logging

from core.engine import Engine
from core.errors import StorageError
from core.events import EventRelay
from core.jobs.queue import JobQueue, MemoryQueue
from core.prompting.builder import PromptBuilder
from core.service import Huahua
from core.settings import Settings
from core.storage.images import ImageStore
from core.storage.store import Store
from core.story.planner import ScenePlanner

logger = logging.getLogger(__name__)


async def build_service(settings: Settings, *, engine: Engine | None = None) -> Huahua:
    """Open the store, build the queue, prompt builder, moderator and engine; the caller then `start()`s."""
    from core.moderation import Moderator
    from core.prompting import load_prompt_builder
    from core.story.book import StoryBook

    store = await open_store(settings)
    images = await build_image_store(settings)
    queue = await _build_queue(settings)
    if engine is None:
        from core.engines.factory import build_engine

        engine = build_engine(settings)
    builder = load_prompt_builder(settings)
    moderator = Moderator.from_file(settings.prompts_dir / "blocklist.txt")
    service = Huahua(
        settings,
        store=store,
        images=images,
        queue=queue,
        engine=engine,
        builder=builder,
        moderator=moderator,
        styles=builder.styles,
        relay=_build_relay(settings, queue),
    )
    service.register(StoryBook(service, build_scene_planner(settings, builder)))
    return service


async def open_store(settings: Settings) -> Store:
    """PostgreSQL when HUAHUA_DATABASE_URL is set (state shared by machines), else SQLite in the data dir."""
    if settings.database_url is not None:
        try:
            from core.storage.postgres import PostgresStore
        except ModuleNotFoundError as err:
            if err.name != "asyncpg":
                raise
            raise StorageError(
                "HUAHUA_DATABASE_URL needs the PostgreSQL driver: pip install 'huahua[postgres]'."
            ) from None
        return await PostgresStore.open(
            settings.database_url.get_secret_value(), pool_size=settings.database_pool_size
        )
    from core.storage.sqlite import SqliteStore

    return await SqliteStore.open(settings.database_path)


async def build_image_store(settings: Settings) -> ImageStore:
    """Files under the data dir (HUAHUA_IMAGE_STORE=files), or an S3 bucket checked before use."""
    from core.storage.images import FileImageStore

    if settings.image_store.strip() == "files":
        return FileImageStore(settings.images_dir)
    from core.storage.s3 import S3ImageStore

    store = S3ImageStore.from_settings(settings)
    try:
        await store.connect()
    except BaseException:
        await store.close()
        raise
    return store


def build_scene_planner(settings: Settings, builder: PromptBuilder) -> ScenePlanner:
    from core.story.planner import Lexicon

    planner = ScenePlanner(
        Lexicon.from_file(settings.prompts_dir / "story.toml"),
        builder.translator,
        builder.tokenizer,
        builder.styles,
        builder.limit,
    )
    if settings.story_planner == "llm":
        from core.llm import ChatClient
        from core.prompting.data import read_data_file
        from core.story.llm_planner import LlmScenePlanner

        instructions = read_data_file(settings.prompts_dir / "story_instructions.md").strip()
        return LlmScenePlanner(planner, ChatClient.from_settings(settings), instructions)
    return planner


async def _build_queue(settings: Settings) -> JobQueue:
    if settings.queue == "redis":
        from core.jobs.redis_queue import RedisStreamsQueue

        queue = RedisStreamsQueue(
            settings.redis_url,
            max_size=settings.queue_max_size,
            user_max_pending=settings.user_max_pending,
            user_concurrency=settings.user_concurrency,
            claim_idle_s=settings.job_lease_s,
        )
        await queue.connect()
        return queue
    return MemoryQueue(settings.queue_max_size, settings.user_max_pending, settings.user_concurrency)


def _build_relay(settings: Settings, queue: JobQueue) -> EventRelay | None:
    """Processes sharing the Redis queue also share job events and cancels, on the queue's channels."""
    if settings.queue != "redis":
        return None
    from core.jobs.redis_queue import RedisStreamsQueue
    from core.redis_events import RedisEventRelay

    name = queue.name if isinstance(queue, RedisStreamsQueue) else "huahua"
    return RedisEventRelay(settings.redis_url, name=name)
