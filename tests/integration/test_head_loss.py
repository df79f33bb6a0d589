"""The whole Ray head dies mid-run and the controller brings the run back (issue 20, item 1).

A real `ray start --head` on 127.0.0.1 (its own temp dir and ports, token auth on), a tiny run sent
with `mmpt submit`, every process of that head SIGKILLed once the run has committed its first
checkpoint (the node is gone: GCS, raylet, dashboard, the job's driver and its Ray Train workers),
then a new head on the same address, which knows nothing of the job. The controller, whose
registry is the source of truth, finds the job unknown to the new head, resubmits it as attempt 2
with the same run directory, and the run finishes with the same samples at every step and the
same final parameters as an uninterrupted run of the same config (tests/integration/exact.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import QUICKSTART, tiny
from tests.integration.exact import COMPARED, STEPS, assert_same_run
from tests.integration.test_controller import (
    _BIN,
    _base_env,
    _series,
    _wait,
    dashboard_up,
    mmpt,
    start_controller,
)
from tests.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class RayHead:
    """`ray start --head --block` on fixed ports, restartable on the same address."""

    def __init__(self, root: Path, token: str) -> None:
        self.root, self.dash = root, free_port()
        self.ports = {flag: free_port() for flag in (
            "--port", "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
            "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")}
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(root / "token")}
        (root / "token").write_text(token)
        self.token, self.url = token, f"http://127.0.0.1:{self.dash}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def client_env(self) -> dict[str, str]:
        return _base_env() | self.auth

    def start(self) -> None:
        self.starts += 1
        env = self.client_env | {"RAY_TMPDIR": str(self.root), "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [str(_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash), "--num-cpus", "8",
               "--include-dashboard", "true", "--temp-dir", str(self.root / "ray"), "--disable-usage-stats",
               *[str(x) for kv in self.ports.items() for x in kv]]
        log_path = self.root / f"head{self.starts}.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        proc = self.proc
        _wait(f"Ray head #{self.starts}", lambda: dashboard_up(proc, self.url, self.token, log_path), timeout=120)

    def processes(self) -> list[psutil.Process]:
        """This head's processes: `ray start` and everything below it (the job's driver runs in a
        session of its own, still below its supervisor actor), and any orphan that still carries this
        head's RAY_TMPDIR. Never another Ray on the machine."""
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            if self.proc is not None:
                top = psutil.Process(self.proc.pid)
                found |= {p.pid: p for p in [top, *top.children(recursive=True)]}
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.pid not in found and p.environ().get("RAY_TMPDIR") == str(self.root):
                    found[p.pid] = p
        return [p for p in found.values() if _alive(p)]

    def kill(self) -> list[str]:
        """SIGKILL every process of the head at once, as a lost node; returns their names."""
        procs = self.processes()
        names = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                names.append(p.name())
                p.kill()
        psutil.wait_procs(procs, timeout=30)
        if self.proc is not None:
            self.proc.wait(timeout=10)
        return names


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a killed orphan waits for whichever init reaps it)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def head() -> Iterator[RayHead]:
    root = Path(tempfile.mkdtemp(prefix="mmpt-hl-", dir="/tmp"))  # short: Ray's socket paths have a limit
    h = RayHead(root, secrets.token_hex(16))
    try:
        h.start()
        yield h
    finally:
        h.kill()  # nothing of it is needed any more: no graceful `ray stop` (15 s here)
        leftovers = h.processes()
        shutil.rmtree(root, ignore_errors=True)
        assert leftovers == [], leftovers


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _drivers_that_die_are_told_apart(head: RayHead) -> None:
    """What this Ray reports for a driver killed by a signal (retried) and one that exits 2 (not)."""
    from orchestrator.controller.retry import classify
    from orchestrator.jobsapi.cluster import Auth, connect, list_jobs

    client = connect(head.url, Auth(head.token, "test"))
    cases = {"python -c 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)'": "driver_killed",
             "python -c 'raise SystemExit(2)'": None}
    ids = {cmd: client.submit_job(entrypoint=cmd) for cmd in cases}
    jobs = _wait("both drivers to end", lambda: (found := list_jobs(client, head.url)) and all(
        i in found and found[i].status == "FAILED" for i in ids.values()) and found, timeout=60)
    assert {cmd: classify(jobs[i]) for cmd, i in ids.items()} == cases, {i: jobs[i] for i in ids.values()}  # type: ignore[index]


def test_a_run_survives_the_loss_of_its_ray_head(head: RayHead, uninterrupted_run: Path, shapes_data: Path,
                                                 tmp_path: Path) -> None:
    db, store = f"sqlite:///{tmp_path}/jobs.db", tmp_path / "store"
    env = head.client_env
    ctl = start_controller(db, env, tmp_path / "controller.log", interval=1.0, extra=[
        "--backoff", "1", "--backoff-cap", "2", "--max-attempts", "3", "--unreachable-grace", "600"])
    try:
        res = mmpt("submit", str(QUICKSTART), "--address", head.url, "--db", db,
                   *[a for o in tiny(shapes_data, store, name="headloss", **COMPARED) for a in ("--set", o)], env=env)
        assert res.returncode == 0, res.stderr
        job_id = res.stdout.strip()
        run_dir = store / "runs" / "headloss"
        _drivers_that_die_are_told_apart(head)  # while the run starts
        _wait("the first committed checkpoint", lambda: any("checkpoint" in r for r in _records(run_dir)), timeout=240,
              every=0.2)
        killed = head.kill()
        before = [r["step"] for r in _records(run_dir)]
        assert "raylet" in killed and "gcs_server" in killed and before[-1] < STEPS, (killed, before)
        assert head.processes() == []
        head.start()  # a new head, same address: it has never heard of the job

        done = _wait("the run SUCCEEDED on its second attempt", lambda: (j := ctl.job(job_id))["state"] in (
            "SUCCEEDED", "FAILED") and j, timeout=300)
        assert done["state"] == "SUCCEEDED", done  # type: ignore[index]
        assert (done["attempt"], done["ray_job_id"]) == (2, f"{job_id}-a2")  # type: ignore[index]
        assert [(a["attempt"], a["ray_job_id"], a["reason"]) for a in done["attempts"]] == [  # type: ignore[index]
            (1, job_id, "submitted"), (2, f"{job_id}-a2", "head_lost")]
        assert [(t["from"], t["to"]) for t in done["transitions"]][-4:] == [  # type: ignore[index]
            ("RUNNING", "LOST"), ("LOST", "PENDING"), ("PENDING", "RUNNING"), ("RUNNING", "SUCCEEDED")]
        series = _series(ctl.get("/metrics"))
        assert series[("mmpt_job_resubmissions_total", (("reason", "head_lost"),))] == 1
        assert sum(v for (n, _), v in series.items() if n == "mmpt_job_resubmissions_total") == 1
        listing = mmpt("jobs", "list", "--db", db, "--no-refresh", "--json", env=env)
        assert {j["id"]: j["attempt"] for j in json.loads(listing.stdout)}[job_id] == 2, listing.stdout

        steps = [r["step"] for r in _records(run_dir)]
        assert steps[:len(before)] == before and sorted(set(steps)) == list(range(1, STEPS + 1))
        # attempt 2 went on from a committed checkpoint (2 or later), not from the start
        assert 3 <= steps[len(before)] <= before[-1] + 1, (before, steps)
    finally:
        ctl.proc.terminate()
        assert ctl.proc.wait(timeout=30) == 0

    # the same samples and parameters as the uninterrupted run (on the test session's Ray)
    assert_same_run(uninterrupted_run, run_dir)
    assert os.path.exists(run_dir / "summary.json")
