"""infra/prometheus and infra/grafana checked by the real programs and against the real exposition:
promtool's config and rules checks, promtool's rule unit tests (alerts_test.yml), and every metric a
Grafana panel or an alert queries must be one the controller's /metrics actually exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from orchestrator.controller.ingest import JobMetrics
from orchestrator.controller.metrics import ControllerMetrics, LiveJob, Snapshot
from tests.services import require_binary

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "infra" / "prometheus"
DASHBOARD = ROOT / "infra" / "grafana" / "mmpt-jobs.json"
# PromQL words that look like metric names but are functions, keywords or label names.
_NOT_METRICS = {"rate", "increase", "avg_over_time", "sum", "by", "on", "and", "or", "unless", "label_values",
                "max", "min", "avg", "count", "topk", "without", "ignoring", "group_left", "group_right"}


def _promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_config_and_the_rules(tmp_path: Path) -> None:
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout
    rules = _promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0 and "SUCCESS: 5 rules found" in rules.stdout, rules.stdout + rules.stderr
    # a broken rule is caught: the check is not a formality
    bad = tmp_path / "alerts.yml"
    bad.write_text((PROM / "alerts.yml").read_text().replace("> 3 * 3600", "> > 3"))
    broken = _promtool("check", "rules", str(bad))
    assert broken.returncode != 0 and "parse error" in broken.stdout + broken.stderr


def test_the_alerts_fire_on_synthetic_series_as_alerts_test_yml_expects(tmp_path: Path) -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    # MmptJobLost with its threshold raised above what the series reach: promtool's test must fail
    for name in ("alerts.yml", "alerts_test.yml"):
        shutil.copy(PROM / name, tmp_path / name)
    rules = tmp_path / "alerts.yml"
    rules.write_text(rules.read_text().replace('to_state="LOST"}[15m]) > 0', 'to_state="LOST"}[15m]) > 5'))
    failed = _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert failed.returncode != 0 and "MmptJobLost" in failed.stdout + failed.stderr


def exported_names() -> set[str]:
    """Every sample name in the controller's exposition with one live job of each kind of series."""
    metrics = ControllerMetrics()
    metrics.reconciles.inc()
    metrics.cluster_errors.labels(cluster="http://127.0.0.1:8265").inc()
    m = JobMetrics(step=3, losses={"total": 1.0}, samples_per_s=2.0, tokens_per_s=3.0, data_wait_share=0.1,
                   moe_load={0: [0.5, 0.5]}, moe_layer_dropped={0: 0.0}, moe_dropped=0.0, last_time=1.0,
                   checkpoint_time=1.0)
    metrics.publish(Snapshot(counts={"RUNNING": 1}, jobs=(LiveJob("j", "n", "run", "RUNNING", 0.0, None, m),)))
    return {s.name for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples}


def queried(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers not followed by '(' that are not keywords or labels)."""
    expr = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r"\1", expr)  # Grafana's: (metric, label)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers hold label names and values, not metrics
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|on|without|ignoring)\s*\([^)]*\)", "", expr)
    return {w for w in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
            if w not in _NOT_METRICS and not w.isdigit() and not re.fullmatch(r"\d+[smhdwy]?", w)}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("type") == "query"]
    return exprs


def test_every_panel_and_alert_queries_a_metric_the_controller_exports() -> None:
    import yaml

    names = exported_names()
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    exprs = dashboard_exprs() + [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) >= 20
    unknown = {(e, m) for e in exprs for m in queried(e) if m not in names}
    assert unknown == set()
    # and the check bites: a panel on a metric nobody exports is caught
    assert queried('rate(mmpt_job_gpu_seconds_total{job=~"$job"}[5m])') - names == {"mmpt_job_gpu_seconds_total"}
    assert queried('sum by (job) (increase(mmpt_job_transitions_total[1h]))') == {"mmpt_job_transitions_total"}
