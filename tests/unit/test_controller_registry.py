"""The durable registry and the reconcile pass, with a fake cluster (no Ray)."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.controller import registry
from orchestrator.controller.reconcile import Controller, refresh, sync
from orchestrator.controller.registry import JobRecord, Registry, RegistryError, check_job_id
from orchestrator.controller.state import Transition
from orchestrator.jobsapi.cluster import ClusterError, ClusterJob
from orchestrator.jobsapi.credentials import credential_values, leaks, redact, safe_url

SECRET = "fake-secret-0123456789abcdef"


def _rec(job_id: str, state: str = "PENDING", **kw: object) -> JobRecord:
    return JobRecord(id=job_id, kind="run", name=kw.pop("name", "tiny"), address="http://127.0.0.1:8265",  # type: ignore[arg-type]
                     state=state, config={"name": "tiny", "storage": {"path": "/tmp"}}, **kw)  # type: ignore[arg-type]


class FakeClusters:
    """Stands in for reconcile.Clusters: a listing per address, or a ClusterError."""

    def __init__(self, listings: dict[str, dict[str, ClusterJob] | Exception]) -> None:
        self.listings = listings
        self.calls: list[str] = []

    def listing(self, address: str) -> dict[str, ClusterJob]:
        self.calls.append(address)
        found = self.listings[address]
        if isinstance(found, Exception):
            raise found
        return found


def test_add_get_roundtrip_and_duplicates_are_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/jobs.db"
    with Registry(url) as reg:
        assert reg.add(_rec("a", config_hash="abc", final_metrics={"steps": 3}))
        assert not reg.add(_rec("a", name="other"))  # same id: nothing changes
        assert reg.add(_rec("b", state="RUNNING"))
    with Registry(url) as reg:  # a new process opening the same file
        a = reg.get("a")
        assert a is not None and (a.name, a.config_hash, a.final_metrics, a.config["name"]) == ("tiny", "abc", {"steps": 3}, "tiny")
        assert [j.id for j in reg.jobs()] == ["a", "b"]
        assert [j.id for j in reg.jobs(["RUNNING"])] == ["b"]
        assert reg.counts() == {"PENDING": 1, "RUNNING": 1, "SUCCEEDED": 0, "FAILED": 0, "STOPPED": 0, "LOST": 0}
        assert reg.get("nope") is None
    mode = sqlite3.connect(tmp_path / "jobs.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_apply_is_a_compare_and_set_recorded_once(tmp_path: Path) -> None:
    with Registry(f"sqlite:///{tmp_path}/jobs.db") as reg:
        reg.add(_rec("a"))
        t = Transition("a", "PENDING", "RUNNING", "cluster reports RUNNING")
        assert reg.apply(t, at=10.0, started_at=9.0)
        assert not reg.apply(t, at=11.0)  # a second writer with the same stale view changes nothing
        done = Transition("a", "RUNNING", "SUCCEEDED", "cluster reports SUCCEEDED")
        assert reg.apply(done, at=20.0, ended_at=19.5, message="Job finished successfully.")
        a = reg.get("a")
        assert a is not None and (a.state, a.started_at, a.ended_at, a.message) == ("SUCCEEDED", 9.0, 19.5, "Job finished successfully.")
        assert [(x["from"], x["to"]) for x in reg.transitions("a")] == [("PENDING", "RUNNING"), ("RUNNING", "SUCCEEDED")]


def test_registry_never_stores_a_credential_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    db = tmp_path / "jobs.db"
    with Registry(f"sqlite:///{db}") as reg:
        reg.add(_rec("a", entrypoint=f"mmpt run x.yaml --set key={SECRET}", message=f"boom {SECRET}"))
        reg.apply(Transition("a", "PENDING", "FAILED", f"reason {SECRET}"), message=f"failed {SECRET}")
        reg.set_final_metrics("a", {"note": SECRET})
        assert reg.get("a").entrypoint == "mmpt run x.yaml --set key=***"  # type: ignore[union-attr]
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # db + WAL
    assert SECRET.encode() not in raw and b"key=***" in raw


def test_registry_urls_and_job_ids_are_checked_with_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"--db 'mysql://u:\*\*\*@h/db': expected sqlite:///PATH"):
        Registry("mysql://u:pw@h/db")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        with pytest.raises(RegistryError, match=r"postgresql://me:\*\*\*@db/x: a PostgreSQL registry needs psycopg"):
            Registry("postgresql://me:pw@db/x")
    assert check_job_id("quickstart-20250101-120000-ab12") and check_job_id("raysubmit_AbC123")
    for bad in ("", "bad/id", "../x", "-x", "a b", "x" * 129):
        with pytest.raises(RegistryError, match="expected 1-128 letters"):
            check_job_id(bad)


def test_credentials_are_recognised_redacted_and_urls_masked() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKE1234", "HF_TOKEN": "hf_abcdefghijk",
           "RAY_AUTH_TOKEN": "tok-0123456789", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false-ish-long",
           "AWS_REGION": "us-east-1", "SHORT_TOKEN": "abc"}
    assert set(credential_values(env)) == {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "RAY_AUTH_TOKEN"}
    secrets = credential_values(env)
    assert leaks(["a", f"x{SECRET}y"], secrets) == ["AWS_SECRET_ACCESS_KEY"]
    assert redact(f"k={SECRET} t=hf_abcdefghijk", secrets) == "k=*** t=***"
    assert redact("postgresql://me:pw@db/x", {}) == "postgresql://me:***@db/x"
    assert safe_url("http://u:p@h:1/x") == "http://u:***@h:1/x" and safe_url("http://h:1") == "http://h:1"


def test_sync_applies_cluster_states_and_marks_vanished_jobs_lost(tmp_path: Path) -> None:
    with Registry(f"sqlite:///{tmp_path}/jobs.db") as reg:
        for job_id, state in (("p", "PENDING"), ("r", "RUNNING"), ("gone", "RUNNING"), ("done", "SUCCEEDED")):
            reg.add(_rec(job_id, state))
        listing = {"p": ClusterJob("p", "RUNNING", start_time=5.0),
                   "r": ClusterJob("r", "FAILED", message="exit 1", start_time=5.0, end_time=8.0)}
        applied = sync(reg, reg.jobs(), listing, now=100.0)
        assert sorted((t.job_id, t.new) for t, _ in applied) == [("gone", "LOST"), ("p", "RUNNING"), ("r", "FAILED")]
        states = {j.id: (j.state, j.ended_at) for j in reg.jobs()}
        assert states == {"p": ("RUNNING", None), "r": ("FAILED", 8.0), "gone": ("LOST", 100.0), "done": ("SUCCEEDED", None)}
        assert sync(reg, reg.jobs(), listing, now=101.0) == []  # idempotent


def test_unreachable_cluster_changes_nothing_and_mmpt_jobs_are_adopted_once(tmp_path: Path) -> None:
    down, up = "http://127.0.0.1:1", "http://127.0.0.1:2"
    theirs = _rec("theirs", name="from-metadata")
    theirs.address = up
    with Registry(f"sqlite:///{tmp_path}/jobs.db") as reg:
        rec = _rec("mine", "RUNNING")
        rec.address = down
        reg.add(rec)
        clusters = FakeClusters({down: ClusterError("unreachable"), up: {
            "theirs": ClusterJob("theirs", "RUNNING", metadata=theirs.metadata()),
            "plain": ClusterJob("plain", "RUNNING", metadata={}),  # not sent by mmpt: not ours to track
        }})
        for _ in range(2):
            applied, failed = refresh(reg, reg.jobs(), clusters, adopt_from=[up])  # type: ignore[arg-type]
            assert failed == {down: "unreachable"}
        assert reg.get("mine").state == "RUNNING"  # type: ignore[union-attr]
        adopted = reg.get("theirs")
        assert adopted is not None and (adopted.name, adopted.state, adopted.address) == ("from-metadata", "RUNNING", up)
        assert sorted(j.id for j in reg.jobs()) == ["mine", "theirs"]  # adopted once, not twice
        assert reg.get("plain") is None


def _write_metrics(run_dir: Path, records: list[dict], partial: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(partial)


def test_controller_exports_live_series_and_final_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    now = time.time()
    _write_metrics(run_dir, [
        {"step": 2, "loss/total": 5.0, "loss/mlm": 4.0, "samples_per_s": 30.0, "tokens_per_s": 700.0,
         "data_wait_share": 0.25, "time": now - 20, "checkpoint": "/ckpt/2",
         "moe/layer1/load": [0.5, 0.25, 0.25, 0.0], "moe/layer1/dropped": 0.1, "moe/dropped": 0.05},
        {"step": 4, "loss/total": 4.0, "loss/mlm": 3.5, "samples_per_s": 32.0, "tokens_per_s": 720.0,
         "data_wait_share": 0.2, "time": now - 5},
    ], partial='{"step": 6, "loss/tot')  # a half-written line is left for later
    with Registry(f"sqlite:///{tmp_path}/jobs.db") as reg:
        reg.add(_rec("j1", "PENDING", run_dir=str(run_dir)))
        reg.add(_rec("old", "SUCCEEDED", run_dir=str(run_dir), ended_at=now - 10_000))
        listing = {"j1": ClusterJob("j1", "RUNNING", start_time=now - 60), "old": ClusterJob("old", "SUCCEEDED")}
        ctl = Controller(reg, clusters=FakeClusters({"http://127.0.0.1:8265": listing}), retention_s=600)  # type: ignore[arg-type]
        assert [(t.old, t.new) for t in ctl.reconcile_once()] == [("PENDING", "RUNNING")]
        fams = {f.name: f for f in text_string_to_metric_families(ctl.metrics.exposition().decode())}
        val = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
        job = (("job", "j1"),)
        assert val[("mmpt_job_samples_per_second", job)] == 32.0
        assert val[("mmpt_job_loss", (("job", "j1"), ("term", "total")))] == 4.0
        assert val[("mmpt_job_step", job)] == 4.0
        assert val[("mmpt_job_data_wait_share", job)] == 0.2
        assert val[("mmpt_job_moe_expert_load", (("expert", "0"), ("job", "j1"), ("layer", "1")))] == 0.5
        assert val[("mmpt_job_moe_layer_dropped_fraction", (("job", "j1"), ("layer", "1")))] == 0.1
        assert val[("mmpt_job_moe_dropped_fraction", job)] == 0.05
        assert 19 <= val[("mmpt_job_checkpoint_age_seconds", job)] <= 40
        assert val[("mmpt_jobs", (("state", "RUNNING"),))] == 1 and val[("mmpt_jobs", (("state", "SUCCEEDED"),))] == 1
        assert val[("mmpt_job_transitions_total", (("from_state", "PENDING"), ("to_state", "RUNNING")))] == 1
        assert not any(dict(k[1]).get("job") == "old" for k in val)  # ended long ago: no series

        _write_metrics(run_dir, [], partial='al": 3.0, "samples_per_s": 33.0, "time": 1.0}\n')
        (run_dir / "summary.json").write_text(json.dumps({"steps": 6, "final_losses": {"total": 3.0}, "eval": {"itm_acc": 0.5}}))
        listing["j1"] = ClusterJob("j1", "SUCCEEDED", start_time=now - 60, end_time=now)
        assert [(t.old, t.new) for t in ctl.reconcile_once()] == [("RUNNING", "SUCCEEDED")]
        j1 = reg.get("j1")
        assert j1 is not None and j1.final_metrics == {"steps": 6, "final_losses": {"total": 3.0}, "eval": {"itm_acc": 0.5}}
        live = {j.id: j for j in ctl.metrics.snapshot.jobs}
        assert list(live) == ["j1"] and live["j1"].metrics.step == 6 and live["j1"].metrics.samples_per_s == 33.0


def test_series_stay_bounded_however_many_steps_are_reported(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    records = [{"step": s, "loss/total": 1.0 / s, "loss/itm": 0.5, "samples_per_s": float(s), "time": time.time(),
                "moe/layer0/load": [0.25] * 4} for s in range(1, 501)]
    _write_metrics(run_dir, records)
    with Registry(f"sqlite:///{tmp_path}/jobs.db") as reg:
        reg.add(_rec("j", "RUNNING", run_dir=str(run_dir), started_at=time.time() - 5))
        ctl = Controller(reg, clusters=FakeClusters({"http://127.0.0.1:8265": {"j": ClusterJob("j", "RUNNING")}}))  # type: ignore[arg-type]
        ctl.reconcile_once()
        samples = [s for f in text_string_to_metric_families(ctl.metrics.exposition().decode())
                   if f.name.startswith("mmpt_job_")
                       and not f.name.startswith(("mmpt_job_transitions", "mmpt_job_resubmissions")) for s in f.samples]
    # info, step, 2 loss terms, samples/s, metrics age, checkpoint age, 4 expert loads: 500 steps, 11 series
    assert len(samples) == 11
    assert all("step" not in s.labels for s in samples)
    assert math.isclose(next(s.value for s in samples if s.labels.get("term") == "total"), 1 / 500)


class _LockedThenFree:
    """A connection whose journal-mode switch meets SQLite's immediate 'database is locked' (two
    openers both upgrading a read lock: the busy handler is not called) `fails` times."""

    def __init__(self, fails: int, mode: str = "delete") -> None:
        self.fails, self.mode, self.switches = fails, mode, 0

    def execute(self, sql: str) -> Any:
        if sql == "PRAGMA journal_mode=WAL":
            self.switches += 1
            if self.fails:
                self.fails -= 1
                raise sqlite3.OperationalError("database is locked")
            self.mode = "wal"
        return self

    def fetchone(self) -> tuple[str]:
        return (self.mode,)


def test_wal_switch_retries_an_immediate_lock_and_skips_a_database_already_in_wal() -> None:
    conn = _LockedThenFree(fails=3)
    registry._wal(conn)  # type: ignore[arg-type]
    assert (conn.mode, conn.switches) == ("wal", 4)
    done = _LockedThenFree(fails=5, mode="wal")
    registry._wal(done)  # type: ignore[arg-type]
    assert done.switches == 0  # already WAL: no exclusive lock taken at all


def test_wal_switch_raises_other_errors_at_once() -> None:
    class Broken(_LockedThenFree):
        def execute(self, sql: str) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        registry._wal(Broken(0))  # type: ignore[arg-type]
