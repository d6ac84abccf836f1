"""S3ImageStore: the image store in S3-compatible object storage (AWS S3, MinIO, Ceph RGW, R2, OSS...).

Objects are keyed like the files store, `<prefix>/<h[:2]>/<h>.png`, so every process and host that
shares the bucket reads the same picture under the same digest. aiobotocore is imported only when a
store is built, so the core imports without it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import SecretStr

from core.errors import HuahuaError, InvalidOption, NotFound, StorageError
from core.storage.images import ImageStore, check_digest, check_png

if TYPE_CHECKING:
    from core.settings import Settings

logger = logging.getLogger(__name__)

AddressingStyle = Literal["auto", "path", "virtual"]

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+")
_UNSAFE_PREFIX = re.compile(r"[\x00-\x1f\x7f\\]")
_MAX_KEY_BYTES = 1024
_KEY_TAIL = len("ab/") + 64 + len(".png")
_DENIED = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
        "InvalidSecurity",
    }
)
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


@dataclass(frozen=True)
class S3Location:
    """Where the pictures live: a bucket and a key prefix (without slashes at its ends; may be empty)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """`s3://bucket` or `s3://bucket/some/prefix`; InvalidOption (one sentence) for anything else."""
        url = url.strip()
        if not url.startswith("s3://"):
            raise InvalidOption("HUAHUA_IMAGE_STORE must be 'files' or an s3://bucket/prefix URL.")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if "@" in bucket or ":" in bucket:
            # Never echo this part: it may hold credentials.
            raise InvalidOption(
                "Put the S3 credentials in HUAHUA_S3_ACCESS_KEY_ID and HUAHUA_S3_SECRET_ACCESS_KEY "
                "and the server in HUAHUA_S3_ENDPOINT_URL, not in HUAHUA_IMAGE_STORE."
            )
        if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IP_ADDRESS.fullmatch(bucket):
            raise InvalidOption(
                f"The bucket name {bucket!r} in HUAHUA_IMAGE_STORE is not valid: use 3 to 63 lowercase "
                "letters, digits, dots and hyphens, starting and ending with a letter or digit."
            )
        if "?" in prefix or "#" in prefix or _UNSAFE_PREFIX.search(prefix):
            raise InvalidOption(
                "The key prefix in HUAHUA_IMAGE_STORE must not contain '?', '#', backslashes or "
                "control characters."
            )
        prefix = prefix.removesuffix("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise InvalidOption(
                "The key prefix in HUAHUA_IMAGE_STORE must not contain empty, '.' or '..' parts."
            )
        if len(prefix.encode()) + 1 + _KEY_TAIL > _MAX_KEY_BYTES:
            raise InvalidOption("The key prefix in HUAHUA_IMAGE_STORE is too long for S3 keys.")
        return cls(bucket, prefix)

    def key(self, digest: str) -> str:
        """The object key of a picture: `<prefix>/<h[:2]>/<h>.png`; NotFound for a malformed digest."""
        digest = check_digest(digest)
        name = f"{digest[:2]}/{digest}.png"
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def endpoint_label(endpoint_url: str | None) -> str:
    """How error sentences name the server: scheme://host:port (no user info, path or query), or AWS S3."""
    if not endpoint_url:
        return "AWS S3"
    parts = urlsplit(endpoint_url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def _check_endpoint(endpoint_url: str) -> str:
    try:
        parts = urlsplit(endpoint_url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as err:
        raise InvalidOption("HUAHUA_S3_ENDPOINT_URL is not a valid URL.") from err
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidOption("HUAHUA_S3_ENDPOINT_URL must be an http:// or https:// URL of the S3 server.")
    if parts.username or parts.password:
        raise InvalidOption(
            "Put the S3 credentials in HUAHUA_S3_ACCESS_KEY_ID and HUAHUA_S3_SECRET_ACCESS_KEY, "
            "not in HUAHUA_S3_ENDPOINT_URL."
        )
    return endpoint_url


class S3ImageStore(ImageStore):
    """PNG objects in one bucket under a prefix, through one aiobotocore client opened on first use."""

    def __init__(
        self,
        location: S3Location,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: SecretStr | None = None,
        addressing_style: AddressingStyle = "auto",
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        has_secret = secret_access_key is not None and bool(secret_access_key.get_secret_value())
        if bool(access_key_id) != has_secret:
            raise InvalidOption(
                "Set both HUAHUA_S3_ACCESS_KEY_ID and HUAHUA_S3_SECRET_ACCESS_KEY, or neither "
                "(then the AWS default credential chain is used)."
            )
        self.location = location
        self.endpoint_url = _check_endpoint(endpoint_url) if endpoint_url else None
        self.where = endpoint_label(self.endpoint_url)
        self.region = region or None
        self._access_key_id = access_key_id or None
        self._secret = secret_access_key if has_secret else None
        self._addressing_style = addressing_style
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._max_attempts = max_attempts
        self._client: Any = None
        self._stack: AsyncExitStack | None = None
        self._opening = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> S3ImageStore:
        return cls(
            S3Location.parse(settings.image_store),
            endpoint_url=settings.s3_endpoint_url or None,
            region=settings.s3_region or None,
            access_key_id=settings.s3_access_key_id or None,
            secret_access_key=settings.s3_secret_access_key,
            addressing_style=settings.s3_addressing_style,
        )

    def __repr__(self) -> str:
        return f"S3ImageStore({self.location}, endpoint={self.where})"

    async def connect(self) -> None:
        """Open the client and check that the bucket exists and the credentials are accepted."""
        client = await self._open()
        try:
            await client.head_bucket(Bucket=self.location.bucket)
        except Exception as err:
            raise self._translate(err, "open the bucket") from err
        logger.info("pictures are stored in %s at %s", self.location, self.where)

    async def put(self, png: bytes) -> str:
        data = check_png(png)
        digest = hashlib.sha256(data).hexdigest()
        key = self.location.key(digest)
        if await self._head(key):
            return digest
        client = await self._open()
        try:
            await client.put_object(
                Bucket=self.location.bucket,
                Key=key,
                Body=data,
                ContentType="image/png",
                ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode(),
            )
        except Exception as err:
            raise self._translate(err, "save the image") from err
        return digest

    async def get(self, digest: str) -> bytes:
        key = self.location.key(digest)
        client = await self._open()
        try:
            response = await client.get_object(Bucket=self.location.bucket, Key=key)
            async with response["Body"] as body:
                data: bytes = await body.read()
        except Exception as err:
            if _error_code(err) in _MISSING:
                raise NotFound("That image is no longer stored.") from err
            raise self._translate(err, "read the image") from err
        return data

    async def exists(self, digest: str) -> bool:
        try:
            key = self.location.key(digest)
        except NotFound:
            return False
        return await self._head(key)

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _head(self, key: str) -> bool:
        client = await self._open()
        try:
            await client.head_object(Bucket=self.location.bucket, Key=key)
        except Exception as err:
            if _error_code(err) in _MISSING:
                return False
            raise self._translate(err, "look up the image") from err
        return True

    async def _open(self) -> Any:
        """The one client of this store, created on first use and closed by `close()`."""
        if self._client is not None:
            return self._client
        async with self._opening:
            if self._client is None:
                self._client = await self._create_client()
        return self._client

    async def _create_client(self) -> Any:
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
        except ImportError as err:
            raise StorageError(
                "HUAHUA_IMAGE_STORE=s3://... needs aiobotocore: pip install 'huahua[s3]'."
            ) from err
        connect_timeout, read_timeout = self._timeouts
        config = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": self._max_attempts, "mode": "standard"},
            s3={"addressing_style": self._addressing_style},
            # Checksums only where S3 requires them: several S3-compatible servers refuse the newer
            # default trailing checksums; put_object sends Content-MD5 instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        stack = AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=self._secret.get_secret_value() if self._secret else None,
                    config=config,
                )
            )
        except Exception as err:
            await stack.aclose()
            raise self._translate(err, "connect") from err
        self._stack = stack
        return client

    def _translate(self, err: Exception, action: str) -> HuahuaError:
        """One StorageError sentence for any failure; it names the server and bucket, never a secret."""
        if isinstance(err, HuahuaError):
            return err
        code = _error_code(err)
        # botocore's messages name the operation, URL and S3 error code; never a credential.
        logger.warning("image store %s: could not %s: %s: %s", self.where, action, type(err).__name__, err)
        bucket = self.location.bucket
        if code in _DENIED or code in ("401", "403"):
            return StorageError(
                f"The image store at {self.where} refused access to the bucket {bucket!r} ({code}): "
                "check HUAHUA_S3_ACCESS_KEY_ID, HUAHUA_S3_SECRET_ACCESS_KEY and the bucket's permissions."
            )
        if code == "NoSuchBucket" or (code == "404" and action == "open the bucket"):
            return StorageError(f"The bucket {bucket!r} does not exist at {self.where}.")
        if code:
            return StorageError(f"The image store at {self.where} could not {action} ({code}).")
        from botocore import exceptions as boto

        if isinstance(err, boto.NoCredentialsError):
            return StorageError(
                "No S3 credentials were found: set HUAHUA_S3_ACCESS_KEY_ID and HUAHUA_S3_SECRET_ACCESS_KEY."
            )
        if isinstance(err, boto.ReadTimeoutError | asyncio.TimeoutError):
            return StorageError(f"The image store at {self.where} did not answer in time.")
        if isinstance(err, boto.ConnectionError | boto.HTTPClientError | OSError):
            return StorageError(
                f"The image store at {self.where} cannot be reached: is it running, and is "
                "HUAHUA_S3_ENDPOINT_URL right?"
            )
        return StorageError(f"The image store at {self.where} could not {action}.")


def _error_code(err: BaseException) -> str:
    """The S3 error code of a botocore ClientError ('NoSuchKey', or the HTTP status for HEAD), else ''."""
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return ""
    code = response.get("Error", {}).get("Code")
    if code:
        return str(code)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(status) if status else ""
