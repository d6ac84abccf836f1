"""A throwaway PostgreSQL cluster for tests: `initdb` into a temp dir, `pg_ctl start` on loopback.

As root the server runs as the `postgres` system user (PostgreSQL refuses to run as root). Clients log
in as `huahua` with a password over TCP, so the tests see the same authentication a deployment does.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MISSING = "needs PostgreSQL server binaries (Debian package postgresql)"
USER = "huahua"
PASSWORD = "pg-test-Secret-7d1e"


def find_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: `pg_config --bindir`, else the newest Debian install."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name.split(".")[0])
    )
    candidates.extend(Path(p) for p in reversed(versions))
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgCluster:
    bindir: Path
    root: Path
    port: int = 0
    _as_postgres: bool = False
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60.0) -> str:
        command = [str(a) for a in args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout

    def start(self) -> None:
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        password_file = self.root / "password"
        password_file.write_text(PASSWORD + "\n")
        if self._as_postgres:
            os.chown(password_file, pwd.getpwnam("postgres").pw_uid, -1)
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.data_dir),
            "-U", USER,
            "--pwfile", str(password_file),
            "--auth-local", "trust",
            "--auth-host", "scram-sha-256",
            "-E", "UTF8",
            "--locale", "C",
            "--no-sync",
        )  # fmt: skip
        self.port = _free_port()
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "start", "-w", "-t", "60",
            "-D", str(self.data_dir),
            "-l", str(self.root / "server.log"),
            "-o", options,
        )  # fmt: skip

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t{next(self._names)}"
        self._run(
            str(self.bindir / "psql"),
            "-h", str(self.root), "-p", str(self.port), "-U", USER, "-d", "postgres",
            "-v", "ON_ERROR_STOP=1", "-qc", f"CREATE DATABASE {name}",
        )  # fmt: skip
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "stop", "-m", "fast", "-D", str(self.data_dir))
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> PgCluster:
    """Start a cluster; raises LookupError(MISSING) when the server binaries are not installed."""
    bindir = find_bindir()
    if bindir is None:
        raise LookupError(MISSING)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise LookupError(f"{MISSING}: running as root, it needs the postgres system user") from None
    # Not under pytest's tmp dirs: those are private to the current user, and the server may run as
    # `postgres`.
    cluster = PgCluster(bindir, Path(tempfile.mkdtemp(prefix="huahua-pg-")))
    try:
        cluster.start()
    except BaseException:
        shutil.rmtree(cluster.root, ignore_errors=True)
        raise
    return cluster
