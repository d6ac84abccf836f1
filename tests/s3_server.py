"""A real S3 HTTP server for tests: moto's standalone server in a subprocess on a free loopback port.

The server checks signatures (IAM authentication on): its first three requests create an IAM user, its
access key and an allow-S3 policy; every later request must be signed with that key, so wrong
credentials fail as they would on a real S3 service.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

REGION = "us-east-1"
_buckets = itertools.count(1)


@dataclass(frozen=True)
class MotoS3:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str

    def client(self, service: str = "s3", **credentials: str) -> Any:
        """A plain boto3 client, for looking behind the store's back (tests only)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=credentials.get("key", self.access_key_id),
            aws_secret_access_key=credentials.get("secret", self.secret_access_key),
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def create_bucket(self) -> str:
        name = f"huahua-test-{os.getpid()}-{next(_buckets)}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, url: str) -> dict[str, Any]:
        """Settings overrides for `HUAHUA_IMAGE_STORE=url` on this server."""
        return {
            "image_store": url,
            "s3_endpoint_url": self.endpoint_url,
            "s3_region": REGION,
            "s3_access_key_id": self.access_key_id,
            "s3_secret_access_key": self.secret_access_key,
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto.server exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("moto.server did not start in time")


def _create_user(endpoint_url: str) -> tuple[str, str]:
    """The three unauthenticated requests: an IAM user, its access key, a policy allowing all of S3."""
    anonymous = MotoS3(endpoint_url, "bootstrap", "bootstrap")
    iam = anonymous.client("iam")
    deadline = time.monotonic() + 30
    while True:  # the port opens a moment before the server answers
        try:
            iam.create_user(UserName="huahua")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    key = iam.create_access_key(UserName="huahua")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="huahua", PolicyName="s3", PolicyDocument=json.dumps(policy))
    return key["AccessKeyId"], key["SecretAccessKey"]


@contextlib.contextmanager
def running_moto() -> Iterator[MotoS3]:
    """moto's S3 server on loopback, with a signed-in test user, until the block ends (also used by the
    chaos scenario outside pytest)."""
    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, process)
        endpoint_url = f"http://127.0.0.1:{port}"
        key_id, secret = _create_user(endpoint_url)
        yield MotoS3(endpoint_url, key_id, secret)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto's S3 server on loopback for the whole session, with a signed-in test user."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
    with running_moto() as server:
        yield server


@pytest.fixture
def s3_bucket(moto_s3: MotoS3) -> str:
    """A fresh, empty bucket on the session's server."""
    return moto_s3.create_bucket()
