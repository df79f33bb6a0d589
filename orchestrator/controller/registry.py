"""The durable job registry: every job and sweep submitted, its state and its results.

SQLite is the embedded default (`sqlite:///.mmpt/jobs.db`); a `postgresql://` URL works when
psycopg (3) is installed, for a controller shared by a team. Both speak the same small SQL.

Durability: each change is one transaction. A state change is a compare-and-set on the old state
(`UPDATE ... WHERE id=? AND state=?`) together with its row in `transitions`, so two writers (the
controller and a `mmpt jobs status`) never apply the same transition twice, and a process killed
at any point (SIGKILL included) leaves either the old or the new state, never half of one. SQLite
runs in WAL mode with synchronous=FULL: a committed change survives a crash of the process and of
the machine.

Every text column is passed through `credentials.redact` before it is written.

A run can be several Ray jobs: when its driver or its cluster is lost the controller resubmits it
(retry.py). `attempt` is the current attempt (1 for the first submission), `ray_job_id` its Ray
submission id, and the `attempts` table holds one row per Ray job sent: attempt, Ray job id, reason
and time. A database made before attempts existed gains the columns when it is opened.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from orchestrator.controller.state import STATES, JobState, Transition
from orchestrator.jobsapi.credentials import redact, safe_url

JobKind = Literal["run", "sweep"]
DEFAULT_DB = "sqlite:///.mmpt/jobs.db"
_SCHEMA_VERSION = "2"
_SCHEMA_LOCK = 0x6D6D7074  # "mmpt": the advisory lock key that serialises schema creation
# Ray accepts any string as a submission id; ours and Ray's own (raysubmit_...) fit this, and it
# keeps ids safe in URLs (/jobs/ID), file names and shell commands.
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RegistryError(ValueError):
    """A registry URL or database the user must fix (one line)."""


def check_job_id(job_id: str) -> str:
    """`job_id` if well-formed, else RegistryError naming what is allowed."""
    if not _JOB_ID.match(job_id):
        raise RegistryError(f"job id {job_id!r}: expected 1-128 letters, digits, '_', '.', '-' starting with a "
                            "letter or digit (e.g. quickstart-20250101-120000-ab12 or raysubmit_...)")
    return job_id


@dataclass
class JobRecord:
    id: str
    kind: JobKind
    name: str
    address: str
    state: JobState = "PENDING"
    submitted_at: float = field(default_factory=time.time)
    config_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    entrypoint: str = ""
    submitter: str = ""
    run_dir: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    updated_at: float = field(default_factory=time.time)
    message: str = ""
    final_metrics: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1
    ray_job_id: str = ""  # the current attempt's Ray submission id ("" means `id`, the first attempt's)
    runtime_env: dict[str, Any] = field(default_factory=dict)  # what a resubmission sends again
    lost_reason: str = ""  # why the job became LOST (a retry.RetryReason), "" otherwise

    @property
    def ray_id(self) -> str:
        return self.ray_job_id or self.id

    def to_json(self, with_config: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not with_config:
            out.pop("config")
        return out

    def metadata(self) -> dict[str, str]:
        """What travels with the job to the cluster (Ray job metadata, strings only): enough for
        any controller watching that cluster to register the job. No credentials: see credentials.py."""
        return {"mmpt.kind": self.kind, "mmpt.name": self.name, "mmpt.config_hash": self.config_hash,
                "mmpt.submitter": self.submitter, "mmpt.run_dir": self.run_dir,
                "mmpt.submitted_at": repr(self.submitted_at), "mmpt.config": json.dumps(self.config)}

    @classmethod
    def from_metadata(cls, job_id: str, address: str, metadata: dict[str, str], entrypoint: str = "") -> JobRecord | None:
        """The record of a job `mmpt submit` sent (None for jobs submitted by other means)."""
        kind = metadata.get("mmpt.kind")
        if kind not in ("run", "sweep"):
            return None
        try:
            config = json.loads(metadata.get("mmpt.config") or "{}")
            submitted = float(metadata.get("mmpt.submitted_at") or time.time())
        except ValueError:
            config, submitted = {}, time.time()
        # A resubmission (retry.py) carries the run's own id and its attempt number.
        run_id, attempt = metadata.get("mmpt.job_id") or job_id, metadata.get("mmpt.attempt", "1")
        return cls(id=run_id, kind=kind, name=metadata.get("mmpt.name", job_id), address=address,
                   submitted_at=submitted, config_hash=metadata.get("mmpt.config_hash", ""),
                   config=config if isinstance(config, dict) else {}, entrypoint=entrypoint,
                   submitter=metadata.get("mmpt.submitter", ""), run_dir=metadata.get("mmpt.run_dir", ""),
                   attempt=int(attempt) if attempt.isdigit() else 1, ray_job_id="" if run_id == job_id else job_id)


_COLUMNS = [f.name for f in fields(JobRecord)]
_JSON_COLUMNS = {"config", "final_metrics", "runtime_env"}
# Columns added after schema 1, with their SQL type: a schema-1 database gets them on open.
_ADDED_COLUMNS = {"attempt": "INTEGER NOT NULL DEFAULT 1", "ray_job_id": "TEXT", "runtime_env": "TEXT",
                  "lost_reason": "TEXT"}

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, address TEXT NOT NULL,
        state TEXT NOT NULL, submitted_at DOUBLE PRECISION NOT NULL, config_hash TEXT, config TEXT,
        entrypoint TEXT, submitter TEXT, run_dir TEXT, started_at DOUBLE PRECISION,
        ended_at DOUBLE PRECISION, updated_at DOUBLE PRECISION NOT NULL, message TEXT, final_metrics TEXT,
        attempt INTEGER NOT NULL DEFAULT 1, ray_job_id TEXT, runtime_env TEXT, lost_reason TEXT)""",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state)",
    """CREATE TABLE IF NOT EXISTS transitions (
        job_id TEXT NOT NULL, from_state TEXT NOT NULL, to_state TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL, reason TEXT)""",
    "CREATE INDEX IF NOT EXISTS transitions_job ON transitions (job_id)",
    """CREATE TABLE IF NOT EXISTS attempts (
        job_id TEXT NOT NULL, attempt INTEGER NOT NULL, ray_job_id TEXT NOT NULL, reason TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL, PRIMARY KEY (job_id, attempt))""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
]


@dataclass(frozen=True)
class _Dialect:
    name: Literal["sqlite", "postgresql"]
    placeholder: str

    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


def _sqlite_path(url: str) -> str:
    """sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db (SQLAlchemy's convention); a bare path as is."""
    return url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url


def _connect(url: str) -> tuple[Any, _Dialect]:
    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg  # type: ignore[import-not-found]
        except ImportError:
            raise RegistryError(f"--db {safe_url(url)}: a PostgreSQL registry needs psycopg: "
                                "pip install 'mmpt[postgres]' (psycopg 3)") from None
        try:
            return psycopg.connect(url), _Dialect("postgresql", "%s")
        except psycopg.Error as exc:
            raise RegistryError(f"--db {safe_url(url)}: {redact(str(exc).splitlines()[0])}") from None
    if "://" in url and not url.startswith("sqlite:"):
        raise RegistryError(f"--db {safe_url(url)!r}: expected sqlite:///PATH (default {DEFAULT_DB}) "
                            "or postgresql://USER@HOST/DB")
    path = _sqlite_path(url)
    if path != ":memory:":
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, check_same_thread=False, timeout=_SQLITE_BUSY_S)
        _wal(conn)
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as exc:
        raise RegistryError(f"--db {url}: cannot open the SQLite database ({exc})") from None
    return conn, _Dialect("sqlite", "?")


_SQLITE_BUSY_S = 30.0


def _wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, retrying while another process holds the lock.

    Changing the journal mode takes an exclusive lock that SQLite's busy handler does not wait for:
    controllers opening a new database together get "database is locked" at once. The mode is
    persistent, so only the first opening switches; the others read WAL and do nothing.
    """
    deadline = time.monotonic() + _SQLITE_BUSY_S
    delay = 0.01
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class Registry:
    """The job table. Safe to share between threads; open one per process."""

    def __init__(self, url: str = DEFAULT_DB) -> None:
        self.url = url
        self._conn, self._dialect = _connect(url)
        self._lock = threading.RLock()
        with self._tx() as cur:
            if self._dialect.name == "postgresql":
                # Concurrent CREATE TABLE IF NOT EXISTS race in PostgreSQL (both pass the check, one
                # fails on pg_type's unique index): controllers starting together take turns here.
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for stmt in _SCHEMA:
                cur.execute(stmt)
            for name, sql_type in _ADDED_COLUMNS.items():
                if name not in self._columns(cur):
                    self._add_column(cur, name, sql_type)
            cur.execute(self._q("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                                "excluded.value"), ("schema_version", _SCHEMA_VERSION))

    def _add_column(self, cur: Any, name: str, sql_type: str) -> None:
        try:
            cur.execute(f"ALTER TABLE jobs ADD COLUMN {name} {sql_type}")
        except sqlite3.OperationalError as exc:  # another process upgraded it between our check and here
            if "duplicate column" not in str(exc):
                raise

    def _columns(self, cur: Any) -> set[str]:
        if self._dialect.name == "sqlite":
            cur.execute("PRAGMA table_info(jobs)")
            return {r[1] for r in cur.fetchall()}
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs' "
                    "AND table_schema = current_schema()")
        return {r[0] for r in cur.fetchall()}

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @property
    def display_url(self) -> str:
        return safe_url(self.url)

    # -- writes --------------------------------------------------------------------------------

    def add(self, rec: JobRecord) -> bool:
        """Insert `rec` and its attempt; False (and nothing changed) when its id is already registered."""
        row = self._to_row(rec)
        cols = ", ".join(_COLUMNS)
        marks = ", ".join("?" for _ in _COLUMNS)
        with self._tx() as cur:
            cur.execute(self._q(f"INSERT INTO jobs ({cols}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING"), row)
            if cur.rowcount != 1:
                return False
            self._add_attempt(cur, rec.id, rec.attempt, rec.ray_id, "submitted", rec.submitted_at)
            return True

    def resubmitted(self, job_id: str, old_attempt: int, attempt: int, ray_job_id: str, reason: str,
                    at: float | None = None) -> bool:
        """Record that attempt `attempt` (Ray job `ray_job_id`) of a LOST job was sent: the job becomes
        PENDING on it. A compare-and-set on (LOST, `old_attempt`): False when another controller did it."""
        at = time.time() if at is None else at
        message = f"attempt {attempt} sent as {ray_job_id} ({reason})"
        with self._tx() as cur:
            cur.execute(self._q(
                "UPDATE jobs SET state = 'PENDING', attempt = ?, ray_job_id = ?, started_at = NULL, ended_at = NULL, "
                "updated_at = ?, message = ? WHERE id = ? AND state = 'LOST' AND attempt = ?"),
                (attempt, ray_job_id, at, message, job_id, old_attempt))
            if cur.rowcount != 1:
                return False
            cur.execute(self._q("INSERT INTO transitions (job_id, from_state, to_state, at, reason) VALUES (?, ?, ?, ?, ?)"),
                        (job_id, "LOST", "PENDING", at, f"resubmitted: {reason}"))
            self._add_attempt(cur, job_id, attempt, ray_job_id, reason, at)
            return True

    def _add_attempt(self, cur: Any, job_id: str, attempt: int, ray_job_id: str, reason: str, at: float) -> None:
        cur.execute(self._q("INSERT INTO attempts (job_id, attempt, ray_job_id, reason, at) VALUES (?, ?, ?, ?, ?) "
                            "ON CONFLICT (job_id, attempt) DO NOTHING"), (job_id, attempt, ray_job_id, redact(reason), at))

    def apply(self, t: Transition, *, at: float | None = None, started_at: float | None = None,
              ended_at: float | None = None, message: str | None = None) -> bool:
        """Move a job from `t.old` to `t.new` if it still is in `t.old`; record the transition."""
        at = time.time() if at is None else at
        lost_reason = (t.cause or "head_lost") if t.new == "LOST" else ""
        with self._tx() as cur:
            cur.execute(self._q(
                "UPDATE jobs SET state = ?, updated_at = ?, started_at = COALESCE(?, started_at), "
                "ended_at = ?, message = COALESCE(?, message), lost_reason = ? WHERE id = ? AND state = ?"),
                (t.new, at, started_at, ended_at, None if message is None else redact(message), lost_reason,
                 t.job_id, t.old))
            if cur.rowcount != 1:
                return False
            cur.execute(self._q("INSERT INTO transitions (job_id, from_state, to_state, at, reason) VALUES (?, ?, ?, ?, ?)"),
                        (t.job_id, t.old, t.new, at, redact(t.reason)))
            return True

    def set_final_metrics(self, job_id: str, metrics: dict[str, Any]) -> None:
        with self._tx() as cur:
            cur.execute(self._q("UPDATE jobs SET final_metrics = ?, updated_at = ? WHERE id = ?"),
                        (redact(json.dumps(metrics, default=float)), time.time(), job_id))

    # -- reads ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._select("WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def jobs(self, states: Iterable[JobState] | None = None) -> list[JobRecord]:
        """All jobs (or those in `states`), oldest submission first."""
        if states is None:
            return self._select("ORDER BY submitted_at, id", ())
        wanted = list(states)
        if not wanted:
            return []
        marks = ", ".join("?" for _ in wanted)
        return self._select(f"WHERE state IN ({marks}) ORDER BY submitted_at, id", tuple(wanted))

    def counts(self) -> dict[JobState, int]:
        """Jobs per state; every state present (0 when none)."""
        with self._tx() as cur:
            cur.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            found = dict(cur.fetchall())
        return {s: int(found.get(s, 0)) for s in STATES}

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """Every Ray job sent for `job_id`, first attempt first."""
        with self._tx() as cur:
            cur.execute(self._q("SELECT attempt, ray_job_id, reason, at FROM attempts WHERE job_id = ? ORDER BY attempt"),
                        (job_id,))
            return [dict(zip(("attempt", "ray_job_id", "reason", "at"), r, strict=True)) for r in cur.fetchall()]

    def transitions(self, job_id: str) -> list[dict[str, Any]]:
        with self._tx() as cur:
            cur.execute(self._q("SELECT from_state, to_state, at, reason FROM transitions WHERE job_id = ? "
                                "ORDER BY at"), (job_id,))
            return [dict(zip(("from", "to", "at", "reason"), r, strict=True)) for r in cur.fetchall()]

    # -- internals -----------------------------------------------------------------------------

    def _q(self, text: str) -> str:
        return self._dialect.sql(text)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        """One transaction (committed on success, rolled back on error) under the registry's lock."""
        with self._lock:
            if self._dialect.name == "sqlite":
                with self._conn:
                    yield self._conn.cursor()
            else:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    yield cur

    def _select(self, where: str, params: tuple[Any, ...]) -> list[JobRecord]:
        with self._tx() as cur:
            cur.execute(self._q(f"SELECT {', '.join(_COLUMNS)} FROM jobs {where}"), params)
            rows = cur.fetchall()
        return [self._from_row(r) for r in rows]

    @staticmethod
    def _to_row(rec: JobRecord) -> tuple[Any, ...]:
        out: list[Any] = []
        for name in _COLUMNS:
            value = getattr(rec, name)
            if name in _JSON_COLUMNS:
                value = json.dumps(value, default=float)
            out.append(redact(value) if isinstance(value, str) else value)
        return tuple(out)

    @staticmethod
    def _from_row(row: tuple[Any, ...]) -> JobRecord:
        values = dict(zip(_COLUMNS, row, strict=True))
        for name in _JSON_COLUMNS:
            values[name] = json.loads(values[name]) if values[name] else {}
        for name in ("config_hash", "entrypoint", "submitter", "run_dir", "message", "ray_job_id", "lost_reason"):
            values[name] = values[name] or ""
        values["attempt"] = int(values["attempt"] or 1)
        return JobRecord(**values)
