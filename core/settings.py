"""The one settings object: environment variables prefixed HUAHUA_, and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HUAHUA_", env_file=".env", extra="ignore")

    # engine
    engine: Literal["wukong", "tiny", "http", "torch"] = "wukong"
    """wukong/tiny: MindSpore in process; torch: PyTorch (diffusers) in process; http: a remote worker."""
    model_dir: Path = Path("./models")
    checkpoint: str = "wukong-huahua-ms.ckpt"
    vocab_path: Path | None = None
    device: Literal["CPU", "GPU", "Ascend", "cuda", "mps", "cpu", "auto"] = "CPU"
    """MindSpore (wukong, tiny): CPU, GPU or Ascend; torch: cuda, mps, cpu or auto (the best present)."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    graph_mode: bool = True
    torch_compile: bool = False
    """torch engine: compile the UNet with torch.compile, warmed up at the default size at start."""
    sampler: Literal["dpm++2m", "ddim", "plms"] = "dpm++2m"
    default_steps: int = Field(20, ge=1, le=200)
    max_steps: int = Field(50, ge=1, le=200)
    default_guidance: float = 7.5
    image_area: int = Field(512 * 512, ge=64 * 64)
    tiny_image_area: int = Field(128 * 128, ge=64 * 64)

    # remote worker (engine=http) and `huahua worker`
    worker_url: str = "http://127.0.0.1:8090"
    worker_host: str = "127.0.0.1"
    worker_port: int = 8090
    worker_secret: SecretStr | None = None
    worker_timeout_s: float = 600.0

    # storage and editable prompt data
    data_dir: Path = Path("./data")
    database_url: SecretStr | None = None
    """Unset: SQLite in `data_dir`; postgresql://user:password@host:5432/db: PostgreSQL (shared state)."""
    database_pool_size: int = Field(10, ge=1, le=1000)
    prompts_dir: Path = Path(__file__).resolve().parent.parent / "prompts"
    image_store: str = "files"
    """files: PNGs under `data_dir`/images; s3://bucket/prefix: S3-compatible object storage (shared)."""
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"

    # queue
    queue: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_max_size: int = Field(1000, ge=1)
    user_max_pending: int = Field(4, ge=1)
    user_concurrency: int = Field(1, ge=1)
    workers: int = Field(1, ge=0)
    """0: this process only submits; workers in other processes sharing the Redis queue run its jobs."""
    job_lease_s: float = Field(30.0, ge=1.0, le=3600.0)
    """A running job's lease: renewed every third of it; another process takes the job once it expires."""
    job_max_attempts: int = Field(3, ge=1, le=20)
    """Attempts of a job whose image worker is unreachable before it fails."""
    shutdown_grace_s: float = Field(10.0, ge=0.0, le=600.0)
    """On SIGTERM, how long running jobs get to stop and go back to the queue."""

    # moderation and quotas
    daily_image_quota: int = Field(100, ge=0)
    chat_quota_max: int | None = Field(None, ge=0)
    """The most a chat's /settings quota may allow; None: the global daily_image_quota (lower only)."""
    max_text_length: int = Field(2000, ge=1)

    # translation
    translator: Literal["glossary", "llm"] = "glossary"
    llm_base_url: str = "https://api.openai.com/v1"
    llm_model: str = "gpt-4o-mini"
    llm_api_key: SecretStr | None = None
    llm_timeout_s: float = 20.0
    story_planner: Literal["offline", "llm"] = "offline"

    # web chat
    web_host: str = "127.0.0.1"
    web_port: int = 8080
    public_url: str = ""
    web_secret: SecretStr | None = None
    """Signs the browsers' identity cookies; None: a random one kept in data_dir/web_secret."""
    web_token: SecretStr | None = None
    """Access token the web chat asks for before anything else, when set."""
    web_admins: str = ""
    """Comma-separated web user ids (as the page shows them) with admin rights."""

    # telegram
    telegram_token: SecretStr | None = None
    telegram_base_url: str = "https://api.telegram.org"
    telegram_webhook_url: str = ""
    telegram_webhook_secret: SecretStr | None = None
    telegram_webhook_port: int = 8443

    # discord
    discord_token: SecretStr | None = None
    discord_guild_id: int | None = None

    log_level: str = "INFO"

    @field_validator("database_url")
    @classmethod
    def _blank_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        """An empty HUAHUA_DATABASE_URL= means SQLite. The scheme is checked when the store opens, since a
        validation error here would echo the URL, password included."""
        return None if value is None or not value.get_secret_value().strip() else value

    @property
    def checkpoint_path(self) -> Path:
        path = Path(self.checkpoint)
        return path if path.is_absolute() else self.model_dir / path

    @property
    def resolved_vocab_path(self) -> Path:
        return self.vocab_path or self.model_dir / "vocab_zh.txt"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "huahua.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def web_admin_ids(self) -> frozenset[str]:
        return frozenset(item.strip() for item in self.web_admins.split(",") if item.strip())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
