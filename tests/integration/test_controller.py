"""The controller against a real Ray head (`ray start --head` on 127.0.0.1, token auth on).

One head for the module (started and stopped here, its own temp dir and ports, so it does not
clash with another Ray on the machine). The `mmpt` commands and the controller run as separate
processes with explicit environments, as a user runs them: the submitter and the head both hold a
fake AWS secret and the Ray token, and neither may show up in the registry, the job's metadata,
its logs, the controller's log or the run's files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import QUICKSTART, ROOT, TEST_RAY_TRAIN_ENV, tiny
from tests.services import free_port, require_binary

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = "fake-aws-secret-" + secrets.token_hex(12)
_BIN = Path(sys.executable).parent


def _base_env() -> dict[str, str]:
    """This process's env without Ray's or AWS's variables (an earlier ray.init may have set some)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))} | TEST_RAY_TRAIN_ENV
    env["PATH"] = f"{_BIN}{os.pathsep}{env.get('PATH', '')}"  # `mmpt` for the job's entrypoint
    return env | {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIAFAKE" + secrets.token_hex(6).upper()}


@dataclass
class Head:
    url: str
    token: str
    env: dict[str, str]  # a client's env: token auth on, the fake secret set
    root: Path

    def client(self):  # noqa: ANN201 - a JobSubmissionClient
        from orchestrator.jobsapi.cluster import Auth, connect

        return connect(self.url, Auth(self.token, "test"))


def _wait(what: str, check: Callable[[], object], timeout: float, every: float = 0.5) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def dashboard_up(proc: subprocess.Popen, url: str, token: str, log: Path) -> bool:
    """A `ray start --head` answers on its dashboard (token auth); its log's tail if it exited."""
    if proc.poll() is not None:
        raise AssertionError(f"ray start exited {proc.returncode}: {log.read_text()[-2000:]}")
    try:
        req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    root = Path(tempfile.mkdtemp(prefix="mmpt-head-", dir="/tmp"))  # short: Ray's socket paths have a limit
    token = secrets.token_hex(16)
    (root / "token").write_text(token)
    dash = free_port()
    ports = {flag: free_port() for flag in ("--port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                                            "--dashboard-agent-grpc-port", "--metrics-export-port",
                                            "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")}
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(root / "token")}
    head_env = _base_env() | auth | {"RAY_TMPDIR": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "4",
           "--include-dashboard", "true", "--temp-dir", str(root / "ray"), "--disable-usage-stats",
           *[str(x) for kv in ports.items() for x in kv]]
    log = open(root / "head.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"

    try:
        _wait("the Ray dashboard", lambda: dashboard_up(proc, url, token, root / "head.log"), timeout=90)
        yield Head(url=url, token=token, env=_base_env() | auth, root=root)
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of our own process group only
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def mmpt(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli.main", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


@dataclass
class ControllerProc:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=15) as r:
            return r.read().decode()

    def job(self, job_id: str) -> dict:
        return json.loads(self.get(f"/jobs/{job_id}"))


def start_controller(db: str, env: dict[str, str], log: Path, interval: float = 1.0,
                     extra: Sequence[str] = ()) -> ControllerProc:
    port = free_port()
    out = open(log, "ab")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli.main", "controller", "--db", db, "--port", str(port),
                             "--interval", str(interval), *extra], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    out.close()
    ctl = ControllerProc(proc, f"http://127.0.0.1:{port}", log)

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            return ctl.get("/healthz") == "ok\n"
        except OSError:
            return False

    _wait("the controller", healthy, timeout=60)
    return ctl


def _series(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@dataclass
class Submitted:
    """The tiny run sent with `mmpt submit` at the start of the module; it trains while the other
    tests run (a Ray Train start-up is most of this module's time)."""

    result: subprocess.CompletedProcess[str]
    job_id: str
    db: str
    root: Path
    ctl: ControllerProc


@pytest.fixture(scope="module")
def submitted(head: Head, shapes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Submitted]:
    root = tmp_path_factory.mktemp("e2e")
    db = f"sqlite:///{root}/jobs.db"
    ctl = start_controller(db, head.env, root / "controller.log", interval=2.0)
    try:
        overrides = tiny(shapes_data, root / "store", name="ctl-e2e")
        res = mmpt("submit", str(QUICKSTART), "--address", head.url, "--db", db,
                   *[a for o in overrides for a in ("--set", o)], env=head.env)
        yield Submitted(res, res.stdout.strip(), db, root, ctl)
    finally:
        ctl.proc.terminate()
        assert ctl.proc.wait(timeout=30) == 0


def test_mmpt_submit_sends_the_run_with_token_auth_and_registers_it(submitted: Submitted, head: Head) -> None:
    res, job_id = submitted.result, submitted.job_id
    assert res.returncode == 0, res.stderr
    assert job_id.startswith("ctl-e2e-") and "warning" not in res.stderr  # loopback: no CVE warning
    info = head.client().get_job_info(job_id)
    assert info.entrypoint.startswith("mmpt run jobs/configs/quickstart.yaml --set ")
    assert info.runtime_env["working_dir"].startswith("gcs://")  # uploaded, not a path on this machine
    rec = submitted.ctl.job(job_id)
    assert rec["state"] in ("PENDING", "RUNNING") and rec["config"]["name"] == "ctl-e2e"
    assert info.metadata["mmpt.config_hash"] == rec["config_hash"] and len(rec["config_hash"]) == 12


def test_a_missing_or_wrong_token_is_a_one_line_error_and_nothing_is_submitted(head: Head, shapes_data: Path,
                                                                               tmp_path: Path) -> None:
    before = len(head.client().list_jobs())
    db = f"sqlite:///{tmp_path}/jobs.db"
    args = ["submit", str(QUICKSTART), "--address", head.url, "--db", db,
            *[a for o in tiny(shapes_data, tmp_path) for a in ("--set", o)]]
    no_auth = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    res = mmpt(*args, env=no_auth)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {head.url} requires Ray token authentication (HTTP 401): set "
                                               "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (the head "
                                               "prints its token with `ray get-auth-token`)"]
    wrong = no_auth | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
    res = mmpt("jobs", "status", "raysubmit_x", "--address", head.url, "--db", db, env=wrong)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {head.url} rejected the token from RAY_AUTH_TOKEN (HTTP 403): "
                                               "it is not this cluster's token"]
    assert len(head.client().list_jobs()) == before
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone() == (0,)


def _delete_for_good(client, job_id: str) -> None:  # noqa: ANN001
    """Delete a finished job's record. Ray's job monitor may write it back (as FAILED, "supervisor
    actor died") right after a delete, so delete until it stays absent for 3 s."""
    absent_since: float | None = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(j.submission_id == job_id for j in client.list_jobs()):
            client.delete_job(job_id)
            absent_since = None
        elif absent_since is None:
            absent_since = time.monotonic()
        elif time.monotonic() - absent_since > 3:
            return
        time.sleep(0.5)
    raise AssertionError(f"{job_id} keeps coming back after delete_job")


def _query(db: str, sql: str) -> list[tuple]:
    from orchestrator.controller.registry import Registry

    with Registry(db) as reg, reg._tx() as cur:
        cur.execute(sql)
        return [tuple(r) for r in cur.fetchall()]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_registry_survives_sigkill_and_a_vanished_job_becomes_lost(head: Head, tmp_path: Path, backend: str,
                                                                   request: pytest.FixtureRequest) -> None:
    from orchestrator.controller.registry import JobRecord, Registry

    db = (f"sqlite:///{tmp_path / 'jobs.db'}" if backend == "sqlite"
          else request.getfixturevalue("postgres_server").create_database("ctl"))
    client = head.client()
    commands = {"done": "python -c 'print(42)'", "long": "sleep 300", "vanishes": "sleep 300"}
    ids = {k: f"dur-{k}-{secrets.token_hex(3)}" for k in commands}
    with Registry(db) as reg:
        for key, cmd in commands.items():
            client.submit_job(entrypoint=cmd, submission_id=ids[key])
            assert reg.add(JobRecord(id=ids[key], kind="run", name=key, address=head.url, entrypoint=cmd))
    first = start_controller(db, head.env, tmp_path / "controller.log", interval=0.5)
    want = {ids["done"]: "SUCCEEDED", ids["long"]: "RUNNING", ids["vanishes"]: "RUNNING"}
    try:
        _wait("done SUCCEEDED, long and vanishes RUNNING",
              lambda: {j["id"]: j["state"] for j in json.loads(first.get("/jobs"))} == want, timeout=90)
    finally:
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(timeout=10) == -signal.SIGKILL
    # while no controller watches: `vanishes` ends and its record is deleted from the cluster
    client.stop_job(ids["vanishes"])
    _wait("vanishes to stop", lambda: str(client.get_job_status(ids["vanishes"])).endswith("STOPPED"), timeout=60)
    _delete_for_good(client, ids["vanishes"])

    second = start_controller(db, head.env, tmp_path / "controller.log", interval=0.5)
    try:
        want[ids["vanishes"]] = "LOST"
        _wait("vanishes LOST", lambda: {j["id"]: j["state"] for j in json.loads(second.get("/jobs"))} == want, timeout=30)
        rows = _query(db, "SELECT id, COUNT(*) FROM jobs GROUP BY id")
        assert sorted(rows) == sorted((i, 1) for i in ids.values())  # no row lost or duplicated
        edges = _query(db, "SELECT job_id, from_state, to_state FROM transitions")
        assert len(edges) == len(set(edges))  # no transition applied twice across the restart
        assert [(f, t) for j, f, t in edges if j == ids["vanishes"]] == [("PENDING", "RUNNING"), ("RUNNING", "LOST")]
        series = _series(second.get("/metrics"))
        assert [series[("mmpt_jobs", (("state", s),))] for s in ("SUCCEEDED", "RUNNING", "LOST")] == [1, 1, 1]

        follow = mmpt("jobs", "logs", ids["done"], "--follow", "--db", db, env=head.env, timeout=60)
        assert follow.returncode == 0 and "42" in follow.stdout.splitlines()  # streamed, then ends with the job
        stop = mmpt("jobs", "stop", ids["long"], "--db", db, env=head.env)
        assert stop.returncode == 0 and stop.stdout.strip() == f"{ids['long']} STOPPED"
        _wait("long STOPPED in the controller", lambda: second.job(ids["long"])["state"] == "STOPPED", timeout=15)
    finally:
        second.proc.terminate()
        assert second.proc.wait(timeout=30) == 0


def test_the_run_succeeds_and_the_controller_exports_its_metrics_without_secrets(submitted: Submitted, head: Head) -> None:
    job_id, db, ctl = submitted.job_id, submitted.db, submitted.ctl
    status = mmpt("jobs", "status", job_id, "--db", db, "--wait", "--timeout", "240", env=head.env, timeout=260)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.splitlines()[0] == f"{job_id} SUCCEEDED"
    assert any(line.startswith("  final loss/total: ") for line in status.stdout.splitlines())

    final = _wait("the controller's final metrics",
                  lambda: (j := ctl.job(job_id))["state"] == "SUCCEEDED" and j["final_metrics"] and j, timeout=30)
    assert final["final_metrics"]["steps"] == 6  # type: ignore[index]
    assert [t["to"] for t in final["transitions"]][-1] == "SUCCEEDED"  # type: ignore[index]

    # /jobs reads the registry; /metrics the snapshot published at the end of each reconcile pass
    series = _wait("the SUCCEEDED count in /metrics", lambda: (s := _series(ctl.get("/metrics"))).get(
        ("mmpt_jobs", (("state", "SUCCEEDED"),))) == 1 and s, timeout=15)
    job = (("job", job_id),)
    sps = series[("mmpt_job_samples_per_second", job)]
    loss = series[("mmpt_job_loss", (("job", job_id), ("term", "total")))]
    assert math.isfinite(sps) and 0 < sps < 1e5
    assert math.isfinite(loss) and 0 < loss < 50
    assert {t for (n, lab), _ in series.items() if n == "mmpt_job_loss" for k, t in lab if k == "term"} >= {"total", "mlm", "itm"}
    assert series[("mmpt_job_step", job)] == 6
    assert 0 <= series[("mmpt_job_data_wait_share", job)] <= 1
    assert series[("mmpt_jobs", (("state", "SUCCEEDED"),))] == 1

    logs = mmpt("jobs", "logs", job_id, "--db", db, env=head.env)
    assert logs.returncode == 0 and "run directory:" in logs.stdout

    # neither the fake AWS secret nor the Ray token is in anything that was written or shown
    info = head.client().get_job_info(job_id)
    ray_side = json.dumps({"entrypoint": info.entrypoint, "metadata": info.metadata, "runtime_env": info.runtime_env})
    run_files = [p for p in (submitted.root / "store" / "runs" / "ctl-e2e").rglob("*")
                 if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".log")]
    assert len(run_files) >= 4
    haystacks = {"job metadata": ray_side.encode(), "job logs": logs.stdout.encode(), "status": status.stdout.encode(),
                 "controller log": ctl.log.read_bytes(), **{str(p): p.read_bytes() for p in run_files},
                 **{p.name: p.read_bytes() for p in submitted.root.glob("jobs.db*")}}
    for secret in (SECRET, head.token):
        assert [name for name, blob in haystacks.items() if secret.encode() in blob] == []


def _prom_get(base: str, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{base}{path}?{query}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


@contextlib.contextmanager
def _prometheus(config: dict[str, Any], root: Path) -> Iterator[str]:
    """Debian's Prometheus on 127.0.0.1 with `config`, its own TSDB under `root`."""
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(root / "prometheus.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen([require_binary("prometheus"), f"--config.file={root / 'prometheus.yml'}",
                             f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (root / "prometheus.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait("Prometheus", ready, timeout=60)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prometheus_scrapes_the_controller_and_ray_and_the_queries_and_alerts_answer(submitted: Submitted, head: Head,
                                                                                       tmp_path: Path) -> None:
    """infra/prometheus/prometheus.yml and alerts.yml as shipped, only the addresses pointed at this
    test's controller and Ray head, and 1 s intervals."""
    from orchestrator.controller.registry import JobRecord, Registry
    from tests.unit.test_prometheus_files import dashboard_exprs

    job_id, ctl = submitted.job_id, submitted.ctl
    _wait("the run to finish", lambda: (j := ctl.job(job_id))["state"] == "SUCCEEDED" and j["final_metrics"], timeout=300)
    summary = json.loads((submitted.root / "store" / "runs" / "ctl-e2e" / "summary.json").read_text())
    infra = ROOT / "infra" / "prometheus"
    config = yaml.safe_load((infra / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(infra / "alerts.yml")]
    scrape = {j["job_name"]: j for j in config["scrape_configs"]}
    scrape["mmpt-controller"]["static_configs"][0]["targets"] = [urllib.parse.urlsplit(ctl.url).netloc]
    scrape["ray"]["file_sd_configs"][0]["files"] = [str(head.root / "ray" / "prom_metrics_service_discovery.json")]
    with _prometheus(config, tmp_path) as prom:
        def query(expr: str) -> list[dict[str, Any]]:
            return _prom_get(prom, "/api/v1/query", query=expr)["result"]

        def value(expr: str) -> float | None:
            found = query(expr)
            return float(found[0]["value"][1]) if len(found) == 1 else None

        _wait("both scrape jobs up", lambda: {t["labels"]["job"] for t in _prom_get(prom, "/api/v1/targets")["activeTargets"]
                                               if t["health"] == "up"} == {"mmpt-controller", "ray"}, timeout=60)
        # the run's training metrics, through the controller
        assert _wait("the step", lambda: value(f'mmpt_job_step{{job="{job_id}"}}') == 6, timeout=30)
        loss = value(f'mmpt_job_loss{{job="{job_id}",term="total"}}')
        assert loss == pytest.approx(summary["final_losses"]["total"], rel=1e-9)
        assert value(f'count(mmpt_job_moe_expert_load{{job="{job_id}"}})') == 4  # 4 experts x 1 MoE layer
        # Ray's own metrics, from the head's service-discovery file, as the shipped config says
        # (every target up at once: with 1 s scrapes the timeout is 1 s too, and a Ray endpoint slower
        # than that on a loaded machine reads 0 for a scrape, so this waits rather than samples once)
        _wait("every Ray target up", lambda: (up := query('up{job="ray"}')) and {float(r["value"][1]) for r in up} == {1.0},
              timeout=30)
        # a target is up before its first export of Ray's series (the metrics agent exports every few s)
        assert _wait("Ray's own series", lambda: (value('count({job="ray", __name__=~"ray_.+"})') or 0) >= 1,
                     timeout=30)
        # every Grafana panel's query returns data (the controller's errors rate: none, and none expected)
        for expr in dashboard_exprs():
            if expr.startswith("label_values"):
                continue
            found = _wait(f"data for {expr}", lambda e=expr: query(e.replace("$job", ".*")), timeout=20) \
                if "cluster_errors" not in expr else query(expr)
            assert bool(found) == ("cluster_errors" not in expr), expr
        # an alert: a RUNNING job that vanished from its cluster becomes LOST, and MmptJobLost fires
        rules = yaml.safe_load((infra / "alerts.yml").read_text())
        lost_expr = next(r["expr"] for g in rules["groups"] for r in g["rules"] if r["alert"] == "MmptJobLost")
        edge = 'mmpt_job_transitions_total{from_state="RUNNING",to_state="LOST"}'
        _wait("the LOST edge scraped at 0", lambda: value(edge) == 0 and (value(f"count_over_time({edge}[1m])") or 0) >= 2,
              timeout=30)
        assert query(lost_expr) == []
        with Registry(submitted.db) as reg:
            reg.add(JobRecord(id=f"vanished-{secrets.token_hex(3)}", kind="run", name="gone", address=head.url,
                              state="RUNNING", started_at=time.time()))
        _wait("the LOST edge at 1", lambda: value(edge) == 1, timeout=30)
        fired = query(lost_expr)
        assert [(r["metric"]["from_state"], r["metric"]["to_state"]) for r in fired] == [("RUNNING", "LOST")]
        assert float(fired[0]["value"][1]) > 0
        alerts = _wait("MmptJobLost firing", lambda: [a for a in _prom_get(prom, "/api/v1/alerts")["alerts"]
                                                      if a["labels"]["alertname"] == "MmptJobLost" and a["state"] == "firing"],
                       timeout=30)
        assert alerts[0]["labels"]["severity"] == "page"  # type: ignore[index]
        healthy = {r["name"]: r["health"] for g in _prom_get(prom, "/api/v1/rules")["groups"] for r in g["rules"]}
        assert len(healthy) == 5 and set(healthy.values()) == {"ok"}, healthy


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_controllers_on_one_registry_apply_each_transition_once(head: Head, tmp_path: Path, backend: str,
                                                                    request: pytest.FixtureRequest) -> None:
    from orchestrator.controller.registry import JobRecord, Registry

    db = (f"sqlite:///{tmp_path / 'jobs.db'}" if backend == "sqlite"
          else request.getfixturevalue("postgres_server").create_database("twoctl"))
    client = head.client()
    commands = {"quick": "python -c 'print(1)'", "slow": "python -c 'import time; time.sleep(4)'", "long": "sleep 300"}
    ids = {k: f"two-{k}-{secrets.token_hex(3)}" for k in commands}
    with Registry(db) as reg:
        for key, cmd in commands.items():
            client.submit_job(entrypoint=cmd, submission_id=ids[key])
            assert reg.add(JobRecord(id=ids[key], kind="run", name=key, address=head.url, entrypoint=cmd))
    ctls = [start_controller(db, head.env, tmp_path / f"controller{i}.log", interval=0.3) for i in range(2)]
    want = {ids["quick"]: "SUCCEEDED", ids["slow"]: "SUCCEEDED", ids["long"]: "RUNNING"}
    try:
        for ctl in ctls:  # both see the same registry
            _wait("both short jobs SUCCEEDED", lambda c=ctl: {j["id"]: j["state"] for j in json.loads(c.get("/jobs"))} == want,
                  timeout=90)
        client.stop_job(ids["long"])
        _wait("long STOPPED", lambda: ctls[1].job(ids["long"])["state"] == "STOPPED", timeout=60)
        edges = _query(db, "SELECT job_id, from_state, to_state FROM transitions")
        assert len(edges) == len(set(edges))  # two reconcilers racing never apply a transition twice
        assert sorted((f, t) for j, f, t in edges if j == ids["slow"]) == [("PENDING", "RUNNING"), ("RUNNING", "SUCCEEDED")]
        assert sorted((f, t) for j, f, t in edges if j == ids["long"]) == [("PENDING", "RUNNING"), ("RUNNING", "STOPPED")]
        applied = sum(v for c in ctls for (n, _), v in _series(c.get("/metrics")).items() if n == "mmpt_job_transitions_total")
        assert applied == len(edges)  # each applied transition counted by exactly the controller that won it
    finally:
        for ctl in ctls:
            ctl.proc.terminate()
            assert ctl.proc.wait(timeout=30) == 0
