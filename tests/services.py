"""Real servers for the tests, started on 127.0.0.1 from Debian's packages (`.ci/run` installs them):
PostgreSQL (`postgresql`) and Prometheus (`prometheus`, with promtool). Each gets a fresh data
directory under /tmp, a free port, and is stopped by the fixture that started it.

PostgreSQL refuses to run as root, so as root (CI) the server runs as the package's `postgres`
system user, in a directory made for it; trust authentication for loopback only.
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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str, *candidates: str) -> str:
    """The program's path; without it: a failure on CI (which installs it), a skip elsewhere."""
    for path in (shutil.which(name), *candidates):
        if path and os.access(path, os.X_OK):
            return path
    why = f"{name} not installed (Debian: apt-get install {'postgresql' if name in ('initdb', 'pg_ctl') else name})"
    if os.environ.get("CI"):
        pytest.fail(why + "; .ci/run installs it")
    pytest.skip(why)


def _pg_bin(name: str) -> str:
    return require_binary(name, *sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True))


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{db}"

    def create_database(self, prefix: str = "t") -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """PostgreSQL on 127.0.0.1 (free port), a throwaway cluster for the session."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    root = Path(tempfile.mkdtemp(prefix="mmpt-pg-", dir="/tmp"))
    data = root / "data"
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres will not run as root: as the package's system user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root needs the `postgres` user that Debian's postgresql package creates")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port, user = free_port(), "mmpt"
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-instructions"],
                   check=True, capture_output=True)
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=on"
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-o", opts, "-w", "-t", "60",
                    "start"], check=True, capture_output=True)
    server = Postgres("127.0.0.1", port, user)
    try:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(server.url(), connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield server
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def relay(handler: Any, target: Any, body: bytes | None) -> None:
    """Forward `handler`'s request (an http.server handler) to `target` (a urlsplit of the real server)
    and copy the answer back: the body of S3 proxies that stall or fail some requests in tests. A HEAD
    answer keeps the object's real Content-Length: clients size their reads by it."""
    import http.client

    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    conn.request(handler.command, handler.path, body=body, headers=dict(handler.headers))
    resp = conn.getresponse()
    data = resp.read()
    handler.send_response(resp.status)
    for k, v in resp.getheaders():
        if k.lower() not in ("transfer-encoding", "connection") and (
                k.lower() != "content-length" or handler.command == "HEAD"):
            handler.send_header(k, v)
    if handler.command != "HEAD":
        handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)
    conn.close()
