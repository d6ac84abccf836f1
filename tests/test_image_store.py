"""The ImageStore contract, run against every store (files under the data dir, S3 on a real moto server),
then what only the S3 store has: URL parsing, prefixes, timeouts, credentials, secrets kept out of errors
and logs, and a whole /imagine job stored in a bucket and served by the web chat."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from pydantic import SecretStr

from core.app import build_image_store
from core.errors import InvalidOption, NotFound, StorageError
from core.logs import secret_values
from core.storage.images import PNG_SIGNATURE, FileImageStore, ImageStore
from core.storage.s3 import S3ImageStore, S3Location
from core.types import JobStatus
from tests.s3_server import MotoS3
from tests.support import PatternEngine, make_service, make_settings

PNG = PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR fake but signed"
HOSTILE_DIGESTS = ("../../etc/passwd", "A" * 64, "0" * 63, "0" * 64 + "/x", "", 123)


@pytest.fixture(autouse=True)
def _no_instance_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a store here ever lack credentials, botocore must not go looking for an instance role."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def real_png(colour: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


class Backend:
    """A store under test plus raw access to where it keeps the bytes, to look behind its back."""

    store: ImageStore

    def location(self, digest: str) -> str:
        """Where the contract says a picture lives, relative to the store's root or prefix."""
        return f"{digest[:2]}/{digest}.png"

    def read(self, digest: str) -> bytes:
        raise NotImplementedError

    def write(self, digest: str, data: bytes) -> None:
        raise NotImplementedError

    def names(self) -> list[str]:
        """Everything stored (files, temporary ones included, or object keys), relative, sorted."""
        raise NotImplementedError


class FilesBackend(Backend):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = FileImageStore(root)

    def read(self, digest: str) -> bytes:
        return (self.root / self.location(digest)).read_bytes()

    def write(self, digest: str, data: bytes) -> None:
        (self.root / self.location(digest)).write_bytes(data)

    def names(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


class S3Backend(Backend):
    def __init__(self, server: MotoS3, bucket: str, prefix: str) -> None:
        self.client = server.client()
        self.bucket, self.prefix = bucket, prefix
        self.store = S3ImageStore(
            S3Location.parse(f"s3://{bucket}/{prefix}"),
            endpoint_url=server.endpoint_url,
            region="us-east-1",
            access_key_id=server.access_key_id,
            secret_access_key=SecretStr(server.secret_access_key),
        )

    def key(self, digest: str) -> str:
        return f"{self.prefix}/{self.location(digest)}"

    def read(self, digest: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=self.key(digest))["Body"].read()
        return body

    def write(self, digest: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(digest), Body=data)

    def names(self) -> list[str]:
        listing = self.client.list_objects_v2(Bucket=self.bucket)
        keys = [item["Key"] for item in listing.get("Contents", [])]
        assert all(key.startswith(self.prefix + "/") for key in keys), keys
        return sorted(key[len(self.prefix) + 1 :] for key in keys)


@pytest.fixture(params=["files", "s3"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "files":
        chosen: Backend = FilesBackend(tmp_path / "images")
    else:
        server: MotoS3 = request.getfixturevalue("moto_s3")
        chosen = S3Backend(server, server.create_bucket(), "huahua/images")
    yield chosen
    await chosen.store.close()


# the contract --------------------------------------------------------------------------------------


async def test_put_stores_the_bytes_under_their_sha256(backend: Backend) -> None:
    digest = await backend.store.put(PNG)
    assert digest == hashlib.sha256(PNG).hexdigest()
    assert backend.names() == [backend.location(digest)]
    assert backend.read(digest) == PNG
    assert await backend.store.get(digest) == PNG
    assert await backend.store.exists(digest)


async def test_storing_the_same_bytes_twice_is_a_no_op(backend: Backend) -> None:
    digest = await backend.store.put(PNG)
    # Replace the stored bytes behind the store's back: a second put must not write them again.
    backend.write(digest, PNG + b"planted")
    assert await backend.store.put(PNG) == digest
    assert backend.read(digest) == PNG + b"planted"
    assert backend.names() == [backend.location(digest)]


async def test_concurrent_puts_of_the_same_and_different_bytes(backend: Backend) -> None:
    pictures = [PNG + bytes([i % 3]) for i in range(12)]
    digests = await asyncio.gather(*(backend.store.put(p) for p in pictures))
    assert digests == [hashlib.sha256(p).hexdigest() for p in pictures]
    assert backend.names() == sorted(backend.location(d) for d in set(digests))  # no temporary leftovers
    for picture, digest in zip(pictures, digests, strict=True):
        assert await backend.store.get(digest) == picture


async def test_missing_and_malformed_digests(backend: Backend) -> None:
    absent = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(NotFound) as caught:
        await backend.store.get(absent)
    assert str(caught.value) == "That image is no longer stored."
    assert not await backend.store.exists(absent)
    for hostile in HOSTILE_DIGESTS:
        with pytest.raises(NotFound):
            await backend.store.get(hostile)  # type: ignore[arg-type]
        assert not await backend.store.exists(hostile)  # type: ignore[arg-type]
    assert backend.names() == []


async def test_only_png_bytes_are_stored(backend: Backend) -> None:
    for bad in (b"", b"GIF89a...", "text", None):
        with pytest.raises(InvalidOption):
            await backend.store.put(bad)  # type: ignore[arg-type]
    assert backend.names() == []


async def test_close_twice_is_harmless(backend: Backend) -> None:
    digest = await backend.store.put(PNG)
    await backend.store.close()
    await backend.store.close()
    assert backend.read(digest) == PNG


# files only ----------------------------------------------------------------------------------------


def test_file_paths_never_leave_the_root(tmp_path: Path) -> None:
    store = FileImageStore(tmp_path / "images")
    digest = hashlib.sha256(PNG).hexdigest()
    assert store.path(digest) == tmp_path / "images" / digest[:2] / f"{digest}.png"
    for hostile in HOSTILE_DIGESTS:
        with pytest.raises(NotFound):
            store.path(hostile)  # type: ignore[arg-type]


# S3 locations --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://huahua-images", "huahua-images", ""),
        ("s3://huahua-images/", "huahua-images", ""),
        ("s3://huahua.images/pictures", "huahua.images", "pictures"),
        ("s3://h9a/a/b/c/", "h9a", "a/b/c"),
        ("s3://bucket/画画 pictures", "bucket", "画画 pictures"),
        ("  s3://bucket/x  ", "bucket", "x"),
    ],
)
def test_s3_urls_are_parsed(url: str, bucket: str, prefix: str) -> None:
    location = S3Location.parse(url)
    assert (location.bucket, location.prefix) == (bucket, prefix)
    digest = hashlib.sha256(PNG).hexdigest()
    expected = f"{digest[:2]}/{digest}.png"
    assert location.key(digest) == (f"{prefix}/{expected}" if prefix else expected)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("files2", "must be 'files' or an s3://bucket/prefix URL"),
        ("http://bucket/prefix", "must be 'files' or an s3://bucket/prefix URL"),
        ("S3://bucket", "must be 'files' or an s3://bucket/prefix URL"),
        ("s3://", "bucket name '' in HUAHUA_IMAGE_STORE is not valid"),
        ("s3://ab", "bucket name 'ab'"),
        ("s3://Huahua", "bucket name 'Huahua'"),
        ("s3://huahua_images", "bucket name 'huahua_images'"),
        ("s3://-huahua", "bucket name '-huahua'"),
        ("s3://a..b", "bucket name 'a..b'"),
        ("s3://192.168.1.1", "bucket name '192.168.1.1'"),
        ("s3://" + "b" * 64, "is not valid"),
        ("s3://bucket//x", "empty, '.' or '..' parts"),
        ("s3://bucket/a/../b", "empty, '.' or '..' parts"),
        ("s3://bucket/./b", "empty, '.' or '..' parts"),
        ("s3://bucket/a//", "empty, '.' or '..' parts"),
        ("s3://bucket/a\\b", "backslashes"),
        ("s3://bucket/a?versionId=1", "'?'"),
        ("s3://bucket/a\nb", "control characters"),
        ("s3://bucket/" + "p" * 1000, "too long"),
        ("s3://AKIAKEY:topsecret@bucket/x", "not in HUAHUA_IMAGE_STORE"),
        ("s3://minio.local:9000/bucket", "HUAHUA_S3_ENDPOINT_URL"),
    ],
)
def test_bad_s3_urls_are_refused_with_one_sentence(url: str, words: str) -> None:
    with pytest.raises(InvalidOption) as caught:
        S3Location.parse(url)
    assert words in str(caught.value)
    assert "topsecret" not in str(caught.value)


def test_bad_endpoints_and_half_credentials_are_refused() -> None:
    location = S3Location("bucket")
    for endpoint, words in [
        ("minio:9000", "http:// or https://"),
        ("ftp://minio", "http:// or https://"),
        ("http://", "http:// or https://"),
        ("http://minio:99999", "not a valid URL"),
        ("https://AKIA:topsecret@minio.example", "not in HUAHUA_S3_ENDPOINT_URL"),
    ]:
        with pytest.raises(InvalidOption, match=words) as caught:
            S3ImageStore(location, endpoint_url=endpoint)
        assert "topsecret" not in str(caught.value)
    with pytest.raises(InvalidOption, match="Set both"):
        S3ImageStore(location, access_key_id="AKIA")
    with pytest.raises(InvalidOption, match="Set both"):
        S3ImageStore(location, secret_access_key=SecretStr("topsecret"))
    with pytest.raises(InvalidOption, match="Set both"):
        S3ImageStore(location, access_key_id="AKIA", secret_access_key=SecretStr(""))


# S3 against the server -----------------------------------------------------------------------------


def s3_store(server: MotoS3, url: str, **options: Any) -> S3ImageStore:
    values: dict[str, Any] = {
        "endpoint_url": server.endpoint_url,
        "region": "us-east-1",
        "access_key_id": server.access_key_id,
        "secret_access_key": SecretStr(server.secret_access_key),
    }
    values.update(options)
    return S3ImageStore(S3Location.parse(url), **values)


async def test_objects_are_pngs_under_the_prefix_and_prefixes_are_separate(
    moto_s3: MotoS3, s3_bucket: str
) -> None:
    picture = real_png()
    digest = hashlib.sha256(picture).hexdigest()
    nested = s3_store(moto_s3, f"s3://{s3_bucket}/a/b/")
    other = s3_store(moto_s3, f"s3://{s3_bucket}/c")
    bare = s3_store(moto_s3, f"s3://{s3_bucket}")
    try:
        assert await nested.put(picture) == digest
        assert not await other.exists(digest) and not await bare.exists(digest)
        with pytest.raises(NotFound):
            await other.get(digest)
        assert await bare.put(picture) == digest
        client = moto_s3.client()
        keys = sorted(item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket)["Contents"])
        assert keys == sorted([f"{digest[:2]}/{digest}.png", f"a/b/{digest[:2]}/{digest}.png"])
        head = client.head_object(Bucket=s3_bucket, Key=f"a/b/{digest[:2]}/{digest}.png")
        assert head["ContentType"] == "image/png" and head["ContentLength"] == len(picture)
    finally:
        for store in (nested, other, bare):
            await store.close()


async def test_malformed_digests_and_non_png_make_no_request(unused_tcp_port: int) -> None:
    # Nothing listens there: any request would fail with a StorageError, not NotFound / InvalidOption.
    # (Credentials are given, as in every test here, so botocore never looks for an instance role.)
    store = S3ImageStore(
        S3Location("bucket"),
        endpoint_url=f"http://127.0.0.1:{unused_tcp_port}",
        access_key_id="AKIANOREQUEST",
        secret_access_key=SecretStr("no-request-secret"),
        max_attempts=1,
    )
    try:
        for hostile in HOSTILE_DIGESTS:
            with pytest.raises(NotFound):
                await store.get(hostile)  # type: ignore[arg-type]
            assert not await store.exists(hostile)  # type: ignore[arg-type]
        with pytest.raises(InvalidOption):
            await store.put(b"GIF89a")
        with pytest.raises(StorageError):
            await store.get("0" * 64)  # the control: a well-formed digest does make a request
    finally:
        await store.close()


async def test_an_unreachable_endpoint_is_one_storage_error_quickly(unused_tcp_port: int, caplog) -> None:
    secret = "unreachable-secret-value-123"
    store = S3ImageStore(
        S3Location("bucket", "p"),
        endpoint_url=f"http://127.0.0.1:{unused_tcp_port}",
        access_key_id="AKIAUNREACHABLE",
        secret_access_key=SecretStr(secret),
        connect_timeout_s=0.5,
        max_attempts=2,
    )
    started = time.monotonic()
    try:
        with caplog.at_level(logging.DEBUG):
            for call in (store.connect(), store.put(PNG), store.get("0" * 64), store.exists("0" * 64)):
                with pytest.raises(StorageError) as caught:
                    await call
                assert str(caught.value) == (
                    f"The image store at http://127.0.0.1:{unused_tcp_port} cannot be reached: "
                    "is it running, and is HUAHUA_S3_ENDPOINT_URL right?"
                )
    finally:
        await store.close()
    assert time.monotonic() - started < 10
    assert caplog.records and secret not in caplog.text


async def test_a_silent_server_times_out_as_one_storage_error() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)  # accept, read nothing, answer nothing

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = S3ImageStore(
        S3Location("bucket"),
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key_id="AKIASILENT",
        secret_access_key=SecretStr("silent-secret"),
        read_timeout_s=0.3,
        max_attempts=1,
    )
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match="did not answer in time"):
            await store.get("0" * 64)
    finally:
        await store.close()
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
    assert connections and time.monotonic() - started < 5


async def test_wrong_credentials_are_refused_without_showing_the_secret(
    moto_s3: MotoS3, s3_bucket: str, caplog
) -> None:
    stored = await _put_with(s3_store(moto_s3, f"s3://{s3_bucket}/p"), PNG)
    wrong_secret = "wrong-secret-" + moto_s3.secret_access_key[:8]
    cases = [
        (moto_s3.access_key_id, wrong_secret, "SignatureDoesNotMatch"),
        ("AKIAUNKNOWNKEY000000", moto_s3.secret_access_key, "InvalidAccessKeyId"),
    ]
    with caplog.at_level(logging.DEBUG):
        for key_id, secret, code in cases:
            store = s3_store(
                moto_s3, f"s3://{s3_bucket}/p", access_key_id=key_id, secret_access_key=SecretStr(secret)
            )
            try:
                with pytest.raises(StorageError) as on_connect:
                    await store.connect()
                with pytest.raises(StorageError) as on_get:
                    await store.get(stored)
                with pytest.raises(StorageError) as on_put:
                    await store.put(PNG + b"new")
            finally:
                await store.close()
            assert "(403)" in str(on_connect.value) and f"({code})" in str(on_get.value)
            for caught in (on_connect, on_get, on_put):
                message = str(caught.value)
                assert message.startswith(f"The image store at {moto_s3.endpoint_url} refused access")
                assert "HUAHUA_S3_SECRET_ACCESS_KEY" in message
                assert secret not in message and moto_s3.secret_access_key not in message
    assert caplog.records
    assert wrong_secret not in caplog.text and moto_s3.secret_access_key not in caplog.text


async def test_the_secret_never_reaches_logs_on_success(moto_s3: MotoS3, s3_bucket: str, caplog) -> None:
    with caplog.at_level(logging.DEBUG):
        store = s3_store(moto_s3, f"s3://{s3_bucket}/p")
        try:
            await store.connect()
            digest = await store.put(PNG)
            assert await store.get(digest) == PNG
        finally:
            await store.close()
    assert any(r.name.startswith("botocore") for r in caplog.records)  # its debug logs were captured
    assert moto_s3.secret_access_key not in caplog.text
    assert moto_s3.secret_access_key not in repr(store)


async def test_a_missing_bucket_is_reported_on_connect(moto_s3: MotoS3) -> None:
    store = s3_store(moto_s3, "s3://no-such-bucket-here/p")
    try:
        with pytest.raises(StorageError, match="The bucket 'no-such-bucket-here' does not exist at http://"):
            await store.connect()
        with pytest.raises(StorageError, match="does not exist"):
            await store.put(PNG)
    finally:
        await store.close()


async def _put_with(store: S3ImageStore, png: bytes) -> str:
    try:
        return await store.put(png)
    finally:
        await store.close()


# composition -------------------------------------------------------------------------------------


async def test_settings_choose_the_image_store(tmp_path: Path, moto_s3: MotoS3, s3_bucket: str) -> None:
    files = await build_image_store(make_settings(tmp_path))
    assert isinstance(files, FileImageStore) and files.root == tmp_path / "data" / "images"

    settings = make_settings(tmp_path, **moto_s3.settings(f"s3://{s3_bucket}/huahua"))
    assert moto_s3.secret_access_key in secret_values(settings)  # so core/logs.py redacts it
    assert moto_s3.secret_access_key not in repr(settings)
    s3 = await build_image_store(settings)
    try:
        assert isinstance(s3, S3ImageStore) and str(s3.location) == f"s3://{s3_bucket}/huahua"
    finally:
        await s3.close()

    with pytest.raises(InvalidOption, match="must be 'files' or an s3://bucket/prefix URL"):
        await build_image_store(make_settings(tmp_path, image_store="file"))
    missing = make_settings(tmp_path, **moto_s3.settings("s3://not-created-bucket"))
    with pytest.raises(StorageError, match="does not exist"):
        await build_image_store(missing)


async def test_an_imagine_job_is_stored_in_the_bucket_and_served_by_the_web_chat(
    tmp_path: Path, moto_s3: MotoS3, s3_bucket: str
) -> None:
    from bots.web.app import create_app

    service = await make_service(
        tmp_path, engine=PatternEngine(), **moto_s3.settings(f"s3://{s3_bucket}/pictures")
    )
    client = TestClient(TestServer(create_app(service, service.settings, heartbeat_s=0.05)))
    await client.start_server()
    try:
        response = await client.post(
            "/api/messages", json={"chat": "main", "text": "/imagine 一只猫 --seed 5"}
        )
        assert response.status == 200
        job_id = (await response.json())["job"]["id"]
        async for _ in service.subscribe(job_id):
            pass
        job = await service.get_job(job_id)
        assert job.status == JobStatus.DONE and len(job.images) == 1, job
        digest = job.images[0]

        key = f"pictures/{digest[:2]}/{digest}.png"
        listing = moto_s3.client().list_objects_v2(Bucket=s3_bucket)
        assert [item["Key"] for item in listing["Contents"]] == [key]
        in_bucket = moto_s3.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert hashlib.sha256(in_bucket).hexdigest() == digest
        assert await service.image(digest) == in_bucket
        assert not (tmp_path / "data" / "images").exists()

        served = await client.get(f"/images/{digest}.png")
        assert served.status == 200 and served.headers["Content-Type"] == "image/png"
        body = await served.read()
        assert body == in_bucket
        assert Image.open(io.BytesIO(body)).size == (job.request.width, job.request.height)
        missing = await client.get(f"/images/{'0' * 64}.png")
        assert missing.status == 404
    finally:
        await client.close()
        await service.stop()
