"""The controller's HTTP API, the metrics tail, and the Prometheus/Grafana files over its metrics."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.controller.ingest import MetricsTail
from orchestrator.controller.metrics import JOB_METRICS, ControllerMetrics
from orchestrator.controller.registry import JobRecord, Registry
from orchestrator.controller.server import start_server

ROOT = Path(__file__).resolve().parents[2]
CONTROLLER_SERIES = {"mmpt_jobs", "mmpt_controller_reconcile_total", "mmpt_controller_cluster_errors_total",
                     "mmpt_job_transitions_total", "mmpt_job_resubmissions_total"}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, Registry]]:
    reg = Registry(f"sqlite:///{tmp_path}/jobs.db")
    reg.add(JobRecord(id="a-1", kind="run", name="a", address="http://127.0.0.1:8265", config={"name": "a"}))
    reg.add(JobRecord(id="b-2", kind="sweep", name="b", address="http://127.0.0.1:8265", state="RUNNING"))
    server = start_server(reg, ControllerMetrics(), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.server_address[1]}", reg
    server.shutdown()
    reg.close()


def _get(url: str, method: str = "GET") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_read_only_json_api(api: tuple[str, Registry]) -> None:
    base, _ = api
    code, body = _get(f"{base}/jobs")
    jobs = json.loads(body)
    assert code == 200 and [j["id"] for j in jobs] == ["a-1", "b-2"] and "config" not in jobs[0]
    code, body = _get(f"{base}/jobs?state=RUNNING")
    assert [j["id"] for j in json.loads(body)] == ["b-2"]
    code, body = _get(f"{base}/jobs/a-1")
    one = json.loads(body)
    assert code == 200 and one["config"] == {"name": "a"} and one["transitions"] == [] and one["state"] == "PENDING"
    assert _get(f"{base}/jobs/nope") == (404, json.dumps({"error": "no job 'nope' in the registry"}) + "\n")
    assert _get(f"{base}/jobs?state=DONE")[0] == 400
    assert _get(f"{base}/other")[0] == 404
    for method in ("POST", "PUT", "DELETE"):
        assert _get(f"{base}/jobs/a-1", method)[0] == 405


def test_the_api_answers_while_the_reconcile_loop_holds_a_write_open(api: tuple[str, Registry]) -> None:
    import time

    base, server_reg = api
    writer = Registry(server_reg.url)  # the reconcile loop's connection (the CLI opens one for each)
    try:
        with writer._tx() as cur:  # a write in flight: the commit (an fsync) has not returned yet
            cur.execute("UPDATE jobs SET state = 'FAILED' WHERE id = 'b-2'")
            t0 = time.monotonic()
            code, body = _get(f"{base}/jobs")
            waited = time.monotonic() - t0
        assert code == 200 and [j["state"] for j in json.loads(body)] == ["PENDING", "RUNNING"]  # committed rows only
        assert waited < 2.0, f"/jobs waited {waited:.1f} s for the writer"
        assert [j["state"] for j in json.loads(_get(f"{base}/jobs")[1])] == ["PENDING", "FAILED"]  # once committed
    finally:
        writer.close()


def test_metrics_endpoint_is_prometheus_text(api: tuple[str, Registry]) -> None:
    base, _ = api
    code, body = _get(f"{base}/metrics")
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    assert code == 200 and {"mmpt_jobs", "mmpt_controller_reconcile"} <= set(fams)
    # nothing published yet: every state present, at 0
    assert sorted(s.labels["state"] for s in fams["mmpt_jobs"].samples) == sorted(
        ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED", "LOST"])


def test_metrics_tail_reads_only_new_complete_lines(tmp_path: Path) -> None:
    tail = MetricsTail(str(tmp_path))
    assert tail.poll() == 0  # no file yet
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss/total": 2.0}\n{"step": 2, "loss/to')
    assert tail.poll() == 1 and tail.metrics.step == 1
    with open(f, "a") as fh:
        fh.write('tal": 1.5, "checkpoint": "c", "time": 7.0}\nnot json\n{"step": 3, "moe/layer0/load": [0.5, 0.5]}\n')
    assert tail.poll() == 2  # the corrupt line is skipped
    m = tail.metrics
    assert (m.step, m.losses, m.checkpoint_step, m.checkpoint_time, m.moe_load) == (3, {"total": 1.5}, 2, 7.0, {0: [0.5, 0.5]})
    f.write_text('{"step": 1}\n')  # restarted --fresh: shorter file, start over
    assert tail.poll() == 1 and tail.metrics.step == 1 and tail.metrics.records == 1


def _exprs() -> list[str]:
    dash = json.loads((ROOT / "infra" / "grafana" / "mmpt-jobs.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = yaml.safe_load((ROOT / "infra" / "prometheus" / "alerts.yml").read_text())
    return exprs + [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_dashboard_and_alerts_use_only_metrics_the_controller_exports() -> None:
    used = {m for e in _exprs() for m in re.findall(r"\bmmpt_[a-z_]+", e)}
    assert used - (set(JOB_METRICS) | CONTROLLER_SERIES) == set()
    assert set(JOB_METRICS) - used == set()  # every per-job series has a panel or an alert


def test_prometheus_scrapes_the_controller_and_ray() -> None:
    cfg = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["mmpt-controller"]["static_configs"][0]["targets"] == ["127.0.0.1:9400"]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert cfg["rule_files"] == ["alerts.yml"]
