"""`mmpt sweep` end to end: 4 trials (1 Ray Train worker each, 2 at once) on the shapes data,
interrupted once two trials finished, resumed without re-running them, then reported."""

from __future__ import annotations

import base64
import io
import math
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from ray.tune import Callback
from rich.console import Console
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.config import parse_override
from orchestrator.report.sweep_report import write_report
from orchestrator.sweep.driver import concurrency, run_sweep
from orchestrator.sweep.spec import SweepSpec, load_plan, plan_sweep
from tests.integration.conftest import QUICKSTART, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_interrupted = False  # module state: the callback is pickled with the experiment and restored on resume


class _CtrlCAfterTwoTrials(Callback):
    """What a user's Ctrl+C does, once two trials have finished: Tune saves its state and stops
    (the third, started when the first finished, is cut off; the fourth may not have started)."""

    completed = 0

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        global _interrupted
        self.completed += 1
        if not _interrupted and self.completed >= 2:
            _interrupted = True
            os.kill(os.getpid(), signal.SIGINT)


def _quiet() -> Console:
    return Console(file=io.StringIO())


def _files(sweep_dir: Path, names: list[str]) -> dict[str, tuple[bytes, int]]:
    runs = sweep_dir / "runs"
    return {n: ((runs / n / "metrics.jsonl").read_bytes(), (runs / n / "summary.json").stat().st_mtime_ns)
            for n in names}


def _assert_tracked_once_per_trial(store: str, sweep_dir: Path, names: list[str]) -> None:
    """One tracked run per trial, grouped under the sweep, however often the sweep was interrupted."""
    from mlflow import MlflowClient

    from tests.readers import tensorboard_scalars, wandb_runs

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("sweep-it").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mmpt.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mmpt.kind") == "run"]
    assert sorted(r.info.run_name for r in children) == sorted(names)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.info.status for r in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    for r in children:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss/total")][-1] == 2
    assert {"report.html", "report.csv", "sweep.yaml"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}
    wb = wandb_runs(sweep_dir / "runs")
    ids = {r["run"]["name"]: set() for r in wb}
    for r in wb:
        assert (r["run"]["group"], r["run"]["job_type"]) == ("it", "trial")
        ids[r["run"]["name"]].add(r["run"]["id"])
    assert sorted(ids) == sorted(names) and all(len(v) == 1 for v in ids.values())  # a resumed trial continues its run
    for name in names:
        assert tensorboard_scalars(sweep_dir / "runs" / name / "tensorboard")["loss/total"][-1][0] == 2


def test_sweep_runs_trials_concurrently_resumes_and_reports(ray_session, shapes_data, tmp_path) -> None:
    overrides = dict(parse_override(o) for o in tiny(shapes_data, tmp_path, **{
        "scaling.num_workers": 1, "moe.ep_size": 1, "train.log_every": 1, "train.checkpoint_every": 2,
        "eval.max_samples": 16}))
    # every trial tracked (orchestrator/tracking/): one MLflow child run per trial under the sweep's parent
    store = f"sqlite:///{tmp_path}/mlflow.db"
    overrides["tracking"] = {"mlflow": {"tracking_uri": store, "experiment": "sweep-it"}, "tensorboard": True,
                             "wandb": {"project": "mmpt-it", "mode": "offline"}}
    spec = SweepSpec.model_validate({
        "name": "it", "base": str(QUICKSTART), "overrides": overrides, "out": str(tmp_path / "sweeps"),
        "objective_sets": {"mlm": ["mlm"], "mlm+itm": ["mlm", "itm"]}, "space": {"train.lr": [1e-3, 3e-3]},
        "seeds": 1, "metric": "eval/mlm_acc", "mode": "max", "budget": {"steps": 2}})
    plan = plan_sweep(spec, QUICKSTART.parent)
    sweep_dir = Path(plan.sweep_dir)
    names = [plan.trial_name(p, s) for p, s in plan.trials]
    assert len(names) == 4 and concurrency(plan, {"CPU": 4.0}) == 2  # ray_session: 4 CPUs, 1 worker + 1 data

    first = run_sweep(plan, console=_quiet(), callbacks=[_CtrlCAfterTwoTrials()])
    assert _interrupted and first.finished and first.unfinished and not first.failed
    done_before = _files(sweep_dir, first.finished)

    second = run_sweep(load_plan(sweep_dir), console=_quiet(), resume=True)
    assert sorted(second.finished) == sorted(names) and not second.failed
    assert _files(sweep_dir, first.finished) == done_before  # finished trials were not run again

    _assert_tracked_once_per_trial(store, sweep_dir, names)

    # trials ran side by side: some two trials' [start, end] intervals overlap
    spans = sorted(((sweep_dir / "runs" / n / "config.yaml").stat().st_mtime,
                    (sweep_dir / "runs" / n / "summary.json").stat().st_mtime) for n in names)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), spans

    report = write_report(sweep_dir)
    assert [r.label for r in report.rows] == [p.label for p in plan.points] and len(report.rows) == 4
    for row in report.rows:
        assert row.finished == 1 and row.steps == 2
        for key in ("loss/total", "loss/mlm", "eval/mlm_acc", "samples_per_s", "wall_time_s"):
            assert math.isfinite(row.stats[key].mean), (row.label, key)
        retrieval = "itm" in row.label
        assert ("eval/i2t_r1" in row.stats) == retrieval  # R@1 needs ITM scores
        if retrieval:
            assert 0.0 <= row.stats["eval/i2t_r1"].mean <= 1.0 and 0.0 <= row.stats["eval/itm_acc"].mean <= 1.0
    table = [ln for ln in report.files["markdown"].read_text().splitlines() if ln.startswith("| objectives=")]
    assert len(table) == 4
    page = report.files["html"].read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    curves = {k for t in report.trials for k in t.curves}
    assert len(images) == len(curves) + len([c for c in report.columns if not c.startswith("loss/")])
    assert Image.open(io.BytesIO(base64.b64decode(images[0]))).format == "PNG"

    # resuming a finished sweep (through the CLI) re-runs nothing and shows the table again
    before = _files(sweep_dir, names)
    result = CliRunner().invoke(app, ["sweep", "--resume", str(sweep_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert _files(sweep_dir, names) == before
    assert sum(label in result.output for label in (p.label for p in plan.points)) == 4
