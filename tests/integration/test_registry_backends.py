"""The registry's durability on both backends: SQLite (a file) and a real PostgreSQL server started
on 127.0.0.1 (tests/services.py). The same tests run on each: a round trip through a new process,
compare-and-set transitions, writers killed with SIGKILL mid-stream, and concurrent controllers
(processes) racing to register the same jobs and apply the same transitions."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from orchestrator.controller.registry import JobRecord, Registry
from orchestrator.controller.state import Transition

pytestmark = pytest.mark.slow

_CHAIN = (("PENDING", "RUNNING"), ("RUNNING", "SUCCEEDED"))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.db"
    return request.getfixturevalue("postgres_server").create_database("reg")


def _rec(job_id: str, **kw: object) -> JobRecord:
    return JobRecord(id=job_id, kind="run", name="tiny", address="http://127.0.0.1:8265",  # type: ignore[arg-type]
                     config={"name": "tiny"}, **kw)  # type: ignore[arg-type]


def _rows(url: str, sql: str) -> list[tuple]:
    with Registry(url) as reg, reg._tx() as cur:
        cur.execute(sql)
        return [tuple(r) for r in cur.fetchall()]


def _reopen(url: str, out: mp.Queue) -> None:  # a second process
    with Registry(url) as reg:
        a = reg.get("a")
        out.put((a.name, a.config_hash, a.final_metrics, a.state, a.started_at) if a else None)


def test_round_trip_through_another_process_and_compare_and_set(db_url: str) -> None:
    with Registry(db_url) as reg:
        assert reg.add(_rec("a", config_hash="abc", final_metrics={"steps": 3}))
        assert not reg.add(_rec("a", config_hash="other"))
        assert reg.add(_rec("b"))
        t = Transition("a", "PENDING", "RUNNING", "cluster reports RUNNING")
        assert reg.apply(t, at=10.0, started_at=9.0)
        assert not reg.apply(t, at=11.0)  # a stale second writer changes nothing
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_reopen, args=(db_url, out))
    proc.start()
    proc.join(60)
    assert out.get(timeout=5) == ("tiny", "abc", {"steps": 3}, "RUNNING", 9.0)
    with Registry(db_url) as reg:
        assert [j.id for j in reg.jobs()] == ["a", "b"]
        assert reg.counts()["RUNNING"] == 1 and reg.counts()["PENDING"] == 1
        assert [(x["from"], x["to"]) for x in reg.transitions("a")] == [("PENDING", "RUNNING")]


def _controller(url: str, ids: list[str], start: mp.Event, out: mp.Queue) -> None:
    """One controller's pass over the jobs: register each, then move it along the chain."""
    start.wait(30)
    added = applied = 0
    with Registry(url) as reg:  # the schema too is created by every process at once
        for job_id in ids:
            added += reg.add(_rec(job_id))
        for old, new in _CHAIN:
            for job_id in ids:
                applied += reg.apply(Transition(job_id, old, new, f"pid {os.getpid()}"))  # type: ignore[arg-type]
    out.put((added, applied))


def test_concurrent_controllers_apply_every_transition_exactly_once(db_url: str) -> None:
    ids = [f"job-{i:03d}" for i in range(40)]
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_controller, args=(db_url, ids, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # all four imported and waiting: they start together
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = [out.get(timeout=5) for _ in procs]
    assert sum(a for a, _ in results) == len(ids)  # each job registered by exactly one controller
    assert sum(n for _, n in results) == len(ids) * len(_CHAIN)  # each transition won by exactly one
    edges = _rows(db_url, "SELECT job_id, from_state, to_state FROM transitions")
    assert len(edges) == len(set(edges)) == len(ids) * len(_CHAIN)
    assert _rows(db_url, "SELECT state, COUNT(*) FROM jobs GROUP BY state") == [("SUCCEEDED", len(ids))]


def _writer(url: str, out: mp.Queue) -> None:
    """Registers jobs and applies their transitions as fast as it can, until it is killed."""
    with Registry(url) as reg:
        out.put("ready")
        for i in range(100_000):
            job_id = f"k-{i:05d}"
            reg.add(_rec(job_id))
            for old, new in _CHAIN:
                reg.apply(Transition(job_id, old, new, "writer"))  # type: ignore[arg-type]


def test_a_writer_killed_mid_stream_leaves_each_job_whole(db_url: str) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_writer, args=(db_url, out))
    proc.start()
    assert out.get(timeout=60) == "ready"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _rows(db_url, "SELECT COUNT(*) FROM transitions")[0][0] < 60:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL

    jobs = dict(_rows(db_url, "SELECT id, state FROM jobs"))
    assert len(jobs) >= 20
    by_job: dict[str, list[tuple[str, str]]] = {}
    for job_id, old, new in _rows(db_url, "SELECT job_id, from_state, to_state FROM transitions ORDER BY at"):
        by_job.setdefault(job_id, []).append((old, new))
    for job_id, state in jobs.items():
        chain = by_job.get(job_id, [])
        # the state is exactly where its recorded transitions lead: never a state without its row
        assert chain == list(_CHAIN[:len(chain)]), (job_id, chain)
        assert state == (chain[-1][1] if chain else "PENDING"), (job_id, state, chain)
    assert set(by_job) <= set(jobs)  # no transition of a job that is not there
    with Registry(db_url) as reg:  # and the database takes writes again
        assert reg.add(_rec("after-kill"))
        assert reg.apply(Transition("after-kill", "PENDING", "RUNNING", "next controller"))
    if db_url.startswith("sqlite"):
        assert _rows(db_url, "PRAGMA integrity_check") == [("ok",)]


def test_an_unreachable_postgresql_is_a_one_line_error_without_the_password() -> None:
    from orchestrator.controller.registry import RegistryError
    from tests.services import free_port

    port = free_port()  # nothing listens there
    with pytest.raises(RegistryError) as err:
        Registry(f"postgresql://me:s3cret@127.0.0.1:{port}/jobs?connect_timeout=3")
    line = str(err.value)
    assert line.startswith(f"--db postgresql://me:***@127.0.0.1:{port}/jobs") and "\n" not in line and "s3cret" not in line
