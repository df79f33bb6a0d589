"""Resubmitting runs whose driver or cluster was lost: the policy, which failures are retried, the
attempts in the registry and the resubmission counter, with a fake cluster and a fake clock (no Ray)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.controller.reconcile import Controller
from orchestrator.controller.registry import JobRecord, Registry
from orchestrator.controller.retry import (
    GiveUp,
    Resubmit,
    RetryConfigError,
    RetryPolicy,
    Wait,
    classify,
    decide,
)
from orchestrator.jobsapi.cluster import ClusterError, ClusterJob, ClusterUnreachable

ADDR = "http://127.0.0.1:8265"
ENV = {"working_dir": "/src/mmpt", "excludes": ["/data/"], "env_vars": {"PYTHONUNBUFFERED": "1"}}


def _rec(job_id: str = "run-1", state: str = "RUNNING", **kw: Any) -> JobRecord:
    return JobRecord(id=job_id, kind=kw.pop("kind", "run"), name="tiny", address=ADDR, state=state,  # type: ignore[arg-type]
                     entrypoint="mmpt run jobs/configs/quickstart.yaml", runtime_env=kw.pop("runtime_env", ENV),
                     run_dir="/store/runs/tiny", config={"name": "tiny"}, submitted_at=500.0, **kw)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeCluster:
    """One cluster: a listing (or an error) the test sets, and every job sent to it."""

    def __init__(self) -> None:
        self.jobs: dict[str, ClusterJob] = {}
        self.down: Exception | None = None
        self.refuse: dict[str, Exception] = {}  # submission id -> what sending it raises
        self.sent: list[dict[str, Any]] = []

    def listing(self, address: str) -> dict[str, ClusterJob]:
        if self.down is not None:
            raise self.down
        return dict(self.jobs)

    def submit(self, address: str, **job: Any) -> str:
        if self.down is not None:
            raise self.down
        if job["submission_id"] in self.refuse:
            raise self.refuse[job["submission_id"]]
        self.sent.append(job)
        self.jobs[job["submission_id"]] = ClusterJob(job["submission_id"], "PENDING", metadata=job["metadata"])
        return job["submission_id"]


def _failed(job_id: str, code: int | None = None, error_type: str = "", message: str = "") -> ClusterJob:
    if not error_type and code is not None:
        error_type = "JOB_ENTRYPOINT_COMMAND_ERROR"
        message = message or f"Job entrypoint command failed with exit code {code}, last available logs ...\nTraceback"
    return ClusterJob(job_id, "FAILED", message=message, driver_exit_code=code, error_type=error_type)


def _counter(ctl: Controller, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(ctl.metrics.exposition().decode())
            for s in f.samples if s.name == name}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Registry, FakeCluster, Clock, Controller]:
    reg = Registry(f"sqlite:///{tmp_path}/jobs.db")
    fake, clock = FakeCluster(), Clock()
    policy = RetryPolicy(max_attempts=3, backoff_s=10, backoff_factor=2, backoff_cap_s=15, unreachable_grace_s=60,
                         give_up_after_s=500)
    ctl = Controller(reg, clusters=fake, policy=policy, clock=clock)  # type: ignore[arg-type]
    yield reg, fake, clock, ctl
    reg.close()


def test_backoff_doubles_up_to_its_cap_and_bad_settings_are_one_line() -> None:
    policy = RetryPolicy(backoff_s=10, backoff_factor=2, backoff_cap_s=60)
    assert [policy.delay(n) for n in range(1, 7)] == [10, 20, 40, 60, 60, 60]
    assert RetryPolicy(backoff_s=0, backoff_cap_s=0).delay(5) == 0
    with pytest.raises(RetryConfigError) as err:
        RetryPolicy(max_attempts=0, backoff_s=30, backoff_cap_s=5)
    assert str(err.value) == "--max-attempts 0: at least 1 (1: never resubmit); --backoff-cap 5: at least --backoff (30)"
    res = CliRunner().invoke(app, ["controller", "--max-attempts", "0", "--backoff", "50", "--backoff-cap", "10"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == ["error: --max-attempts 0: at least 1 (1: never resubmit)",
                                               "error: --backoff-cap 10: at least --backoff (50)"]


@pytest.mark.parametrize(("job", "reason"), [
    (_failed("j", -9), "driver_killed"),  # SIGKILL (the OOM killer, a node's shutdown)
    (_failed("j", 137), "driver_killed"),  # the same through a shell
    (_failed("j", -15), "driver_killed"),
    (_failed("j", error_type="JOB_SUPERVISOR_ACTOR_DIED", message="Job supervisor actor died: node lost"), "driver_died"),
    (_failed("j", error_type="JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE", message="Unexpected error occurred: x"), "driver_died"),
    (ClusterJob("j", "FAILED", message="Job supervisor actor died: The actor died unexpectedly"), "driver_died"),  # no error_type
    (ClusterJob("j", "FAILED", message="Job entrypoint command failed with exit code -9. No logs available."),
     "driver_killed"),
    (_failed("j", 2), None),  # a config error: the user's to fix
    (_failed("j", 1), None),  # the run failed after its own retries (train.max_failures)
    (_failed("j", 130), None),  # interrupted
    (_failed("j", error_type="RUNTIME_ENV_SETUP_FAILURE", message="runtime_env setup failed: pip"), None),
    (_failed("j", error_type="JOB_SUPERVISOR_ACTOR_UNSCHEDULABLE", message="could not be scheduled"), None),
    (ClusterJob("j", "SUCCEEDED", driver_exit_code=0), None),
    (ClusterJob("j", "STOPPED"), None),
])
def test_which_failures_are_retried(job: ClusterJob, reason: str | None) -> None:
    assert classify(job) == reason


def test_decide_waits_for_the_backoff_then_resubmits_then_gives_up() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_s=10, backoff_factor=2, backoff_cap_s=15, give_up_after_s=100)
    lost = _rec(state="LOST", ended_at=1000.0, lost_reason="driver_killed", message="the driver died: exit code -9")
    assert decide(lost, policy, 1009.9) == Wait(1010.0)
    assert decide(lost, policy, 1010.0) == Resubmit(2, "run-1-a2", "driver_killed")
    second = _rec(state="LOST", ended_at=1000.0, lost_reason="head_lost", attempt=2, ray_job_id="run-1-a2")
    assert decide(second, policy, 1014.0) == Wait(1015.0)  # 10 * 2 = 20, capped at 15
    assert decide(second, policy, 1015.0) == Resubmit(3, "run-1-a3", "head_lost")
    last = _rec(state="LOST", ended_at=1000.0, lost_reason="head_lost", attempt=3, message="the cluster no longer knows")
    assert decide(last, policy, 1000.0) == GiveUp("gave up after 3 attempts (--max-attempts 3); last: head lost: "
                                                  "the cluster no longer knows")
    assert decide(lost, policy, 1100.0) == GiveUp("gave up: lost for 100 s (--give-up-after 100); last: driver killed: "
                                                  "the driver died: exit code -9")
    assert decide(_rec(state="RUNNING"), policy, 2000.0) is None
    assert decide(_rec(state="LOST", kind="sweep"), policy, 2000.0) is None  # sweeps are not resubmitted
    assert decide(_rec(state="LOST", runtime_env={}), policy, 2000.0) is None  # adopted: nothing to send again


def test_a_killed_driver_then_a_lost_head_are_resubmitted_until_the_attempts_run_out(setup) -> None:  # noqa: ANN001
    reg, fake, clock, ctl = setup
    assert reg.add(_rec())
    fake.jobs["run-1"] = ClusterJob("run-1", "RUNNING")
    ctl.reconcile_once()
    fake.jobs["run-1"] = _failed("run-1", -9)  # the driver is SIGKILLed
    ctl.reconcile_once()
    rec = reg.get("run-1")
    assert (rec.state, rec.lost_reason, rec.attempt) == ("LOST", "driver_killed", 1)
    assert rec.message.startswith("Job entrypoint command failed with exit code -9")
    clock.now += 9.0
    ctl.reconcile_once()
    assert fake.sent == []  # still in its 10 s backoff
    clock.now += 1.0
    ctl.reconcile_once()
    assert [j["submission_id"] for j in fake.sent] == ["run-1-a2"]
    sent = fake.sent[0]
    assert (sent["entrypoint"], sent["runtime_env"]) == ("mmpt run jobs/configs/quickstart.yaml", ENV)
    assert (sent["metadata"]["mmpt.job_id"], sent["metadata"]["mmpt.attempt"], sent["metadata"]["mmpt.run_dir"]) == (
        "run-1", "2", "/store/runs/tiny")
    rec = reg.get("run-1")
    assert (rec.state, rec.attempt, rec.ray_id, rec.started_at) == ("PENDING", 2, "run-1-a2", None)

    fake.jobs = {"run-1-a2": ClusterJob("run-1-a2", "RUNNING", start_time=1011.0)}  # a new head: run-1 is gone
    ctl.reconcile_once()
    assert reg.get("run-1").state == "RUNNING"  # followed on its new Ray job
    fake.jobs = {}  # and that head is replaced too
    ctl.reconcile_once()
    assert reg.get("run-1").lost_reason == "head_lost"
    clock.now += 15.0  # 10 * 2 = 20 s, capped at 15
    ctl.reconcile_once()
    assert [j["submission_id"] for j in fake.sent] == ["run-1-a2", "run-1-a3"]
    fake.jobs["run-1-a3"] = _failed("run-1-a3", -9)
    ctl.reconcile_once()
    clock.now += 1000.0
    ctl.reconcile_once()
    rec = reg.get("run-1")
    assert rec.state == "FAILED" and len(fake.sent) == 2
    assert rec.message == ("gave up after 3 attempts (--max-attempts 3); last: driver killed: Job entrypoint command "
                           "failed with exit code -9, last available logs ...")
    assert [(a["attempt"], a["ray_job_id"], a["reason"]) for a in reg.attempts("run-1")] == [
        (1, "run-1", "submitted"), (2, "run-1-a2", "driver_killed"), (3, "run-1-a3", "head_lost")]
    assert [a["at"] for a in reg.attempts("run-1")] == [500.0, 1010.0, 1025.0]
    assert _counter(ctl, "mmpt_job_resubmissions_total") == {
        (("reason", "cluster_unreachable"),): 0, (("reason", "driver_died"),): 0,
        (("reason", "driver_killed"),): 1, (("reason", "head_lost"),): 1}
    edges = _counter(ctl, "mmpt_job_transitions_total")
    lost = edges[(("from_state", "RUNNING"), ("to_state", "LOST"))] + edges[(("from_state", "PENDING"), ("to_state", "LOST"))]
    assert (lost, edges[(("from_state", "LOST"), ("to_state", "FAILED"))],
            edges[(("from_state", "LOST"), ("to_state", "PENDING"))]) == (3, 1, 0)  # resubmissions count apart
    assert [(t["from"], t["to"]) for t in reg.transitions("run-1")] == [
        ("RUNNING", "LOST"), ("LOST", "PENDING"), ("PENDING", "RUNNING"), ("RUNNING", "LOST"), ("LOST", "PENDING"),
        ("PENDING", "LOST"), ("LOST", "FAILED")]


@pytest.mark.parametrize("code", [2, 1])
def test_a_run_that_failed_by_itself_is_not_resubmitted(setup, code: int) -> None:  # noqa: ANN001
    reg, fake, clock, ctl = setup
    reg.add(_rec())
    fake.jobs["run-1"] = _failed("run-1", code)
    for _ in range(3):
        ctl.reconcile_once()
        clock.now += 100.0
    rec = reg.get("run-1")
    assert (rec.state, rec.attempt, fake.sent) == ("FAILED", 1, [])
    assert rec.message.startswith(f"Job entrypoint command failed with exit code {code}")
    assert sum(_counter(ctl, "mmpt_job_resubmissions_total").values()) == 0


def test_an_unreachable_cluster_loses_its_jobs_after_the_grace_and_they_wait_for_it(setup) -> None:  # noqa: ANN001
    reg, fake, clock, ctl = setup
    reg.add(_rec())
    fake.down = ClusterUnreachable(f"{ADDR}: cannot reach a Ray dashboard there")
    ctl.reconcile_once()
    clock.now += 59.0
    ctl.reconcile_once()
    assert reg.get("run-1").state == "RUNNING"  # a blip is no loss
    clock.now += 1.0
    ctl.reconcile_once()
    rec = reg.get("run-1")
    assert (rec.state, rec.lost_reason, rec.message) == ("LOST", "cluster_unreachable", "the cluster has not answered for 60 s")
    clock.now += 100.0
    ctl.reconcile_once()
    assert fake.sent == [] and reg.get("run-1").state == "LOST"  # nothing is sent to a cluster that is down
    fake.down = None  # back, without the job: resubmitted at once (the backoff is over)
    ctl.reconcile_once()
    assert [j["submission_id"] for j in fake.sent] == ["run-1-a2"]
    assert [a["reason"] for a in reg.attempts("run-1")] == ["submitted", "cluster_unreachable"]
    assert _counter(ctl, "mmpt_job_resubmissions_total")[(("reason", "cluster_unreachable"),)] == 1

    fake.down = ClusterUnreachable("down for good")
    for _ in range(3):  # lost again 300 s after it goes down (the grace counts from the first failed pass)
        clock.now += 300.0
        ctl.reconcile_once()
    assert reg.get("run-1").state == "LOST" and len(fake.sent) == 1
    clock.now += 300.0
    ctl.reconcile_once()
    rec = reg.get("run-1")
    assert rec.state == "FAILED" and rec.message == ("gave up: lost for 600 s (--give-up-after 500); last: "
                                                     "cluster unreachable: the cluster has not answered for 300 s")


def test_a_resubmission_the_cluster_already_has_is_recorded_and_a_refused_one_fails_the_run(setup) -> None:  # noqa: ANN001
    reg, fake, clock, ctl = setup
    reg.add(_rec("a"))
    reg.add(_rec("b"))
    fake.jobs = {"a": ClusterJob("a", "RUNNING"), "b": ClusterJob("b", "RUNNING")}
    ctl.reconcile_once()
    fake.jobs = {}
    ctl.reconcile_once()
    clock.now += 10.0
    # a: a controller killed after sending attempt 2, before recording it (or another controller won)
    fake.refuse = {"a-a2": ClusterError(f"{ADDR}: Job with submission_id a-a2 already exists. Please use a different "
                                        "submission_id."),
                   "b-a2": ValueError("local directory /src/mmpt for runtime_env working_dir does not exist")}
    ctl.reconcile_once()
    assert (reg.get("a").state, reg.get("a").ray_id) == ("PENDING", "a-a2")
    assert [a["ray_job_id"] for a in reg.attempts("a")] == ["a", "a-a2"]
    b = reg.get("b")
    assert b.state == "FAILED" and b.message == ("cannot resubmit attempt 2: working dir /src/mmpt: local directory "
                                                 "/src/mmpt for runtime_env working_dir does not exist")
    assert len(reg.attempts("b")) == 1


def test_attempts_survive_a_reopen_and_a_schema_1_database_is_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # the registry as schema 1 wrote it
        conn.execute("""CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL,
            address TEXT NOT NULL, state TEXT NOT NULL, submitted_at DOUBLE PRECISION NOT NULL, config_hash TEXT,
            config TEXT, entrypoint TEXT, submitter TEXT, run_dir TEXT, started_at DOUBLE PRECISION,
            ended_at DOUBLE PRECISION, updated_at DOUBLE PRECISION NOT NULL, message TEXT, final_metrics TEXT)""")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        conn.execute("INSERT INTO jobs (id, kind, name, address, state, submitted_at, updated_at) "
                     "VALUES ('old', 'run', 'x', ?, 'RUNNING', 1.0, 1.0)", (ADDR,))
    with Registry(f"sqlite:///{db}") as reg:
        old = reg.get("old")
        assert (old.attempt, old.ray_id, old.runtime_env, old.lost_reason) == (1, "old", {}, "")
        assert reg.add(_rec("new"))
        assert reg.resubmitted("new", 1, 2, "new-a2", "head_lost", at=5.0) is False  # not LOST: no change
    with Registry(f"sqlite:///{db}") as reg:
        assert reg.get("new").runtime_env == ENV
        assert reg.attempts("new") == [{"attempt": 1, "ray_job_id": "new", "reason": "submitted", "at": 500.0}]
        assert reg._tx().__enter__().execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)


def test_the_cli_shows_each_runs_attempt_and_their_history(tmp_path: Path, setup) -> None:  # noqa: ANN001
    reg, fake, clock, ctl = setup
    reg.add(_rec("run-1"))
    reg.add(_rec("run-2"))
    fake.jobs = {"run-1": _failed("run-1", -9), "run-2": ClusterJob("run-2", "SUCCEEDED")}
    ctl.reconcile_once()
    clock.now += 10.0
    ctl.reconcile_once()
    fake.jobs["run-1-a2"] = ClusterJob("run-1-a2", "SUCCEEDED")
    ctl.reconcile_once()
    db = reg.url
    res = CliRunner().invoke(app, ["jobs", "list", "--db", db, "--no-refresh"])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.stdout.splitlines()]
    assert rows[0][:5] == ["id", "name", "kind", "state", "attempt"]
    assert [r[:5] for r in rows[1:]] == [["run-1", "tiny", "run", "SUCCEEDED", "2"], ["run-2", "tiny", "run", "SUCCEEDED", "1"]]
    res = CliRunner().invoke(app, ["jobs", "status", "run-1", "--db", db])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    at = lines.index("  attempts: 2 (Ray job run-1-a2)")
    assert lines[at + 1] == "    1. 1970-01-01 00:08:20 run-1: submitted"
    assert lines[at + 2] == "    2. 1970-01-01 00:16:50 run-1-a2: driver_killed"
    single = CliRunner().invoke(app, ["jobs", "status", "run-2", "--db", db])
    assert "attempts" not in single.stdout


def test_a_server_side_traceback_becomes_its_status_and_its_last_line() -> None:
    from orchestrator.jobsapi import cluster

    text = ("Request failed with status code 400: Traceback (most recent call last):\n  File \"job_head.py\", line 4\n"
            "ValueError: Job with submission_id run-1-a2 already exists. Please use a different submission_id.\n.")
    with pytest.raises(ClusterError) as err, cluster.errors(ADDR):
        raise RuntimeError(text)
    assert str(err.value) == (f"{ADDR}: Request failed with status code 400: ValueError: Job with submission_id "
                              "run-1-a2 already exists. Please use a different submission_id")
    with pytest.raises(ClusterError) as err, cluster.errors(ADDR):
        raise RuntimeError("Request failed with status code 404: Job x does not exist.\nmore")
    assert str(err.value) == f"{ADDR}: Request failed with status code 404: Job x does not exist."


def test_a_lost_run_stopped_by_its_user_is_not_resubmitted(setup, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from orchestrator.jobsapi import cluster

    reg, fake, clock, ctl = setup
    reg.add(_rec())
    fake.jobs = {}
    ctl.reconcile_once()
    assert reg.get("run-1").state == "LOST"
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("a lost job's cluster is not asked"))
    res = CliRunner().invoke(app, ["jobs", "stop", "run-1", "--db", reg.url])
    assert (res.exit_code, res.stdout.strip()) == (0, "run-1 STOPPED (was lost: it will not be resubmitted)")
    clock.now += 100.0
    ctl.reconcile_once()
    assert (reg.get("run-1").state, fake.sent) == ("STOPPED", [])
    assert reg.transitions("run-1")[-1]["reason"] == "stopped on request while lost: not resubmitted"
