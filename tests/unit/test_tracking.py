"""Experiment tracking without Ray: the three trackers fed as the run's driver feeds them, then
read back with their own readers (MLflow's client on a SQLite store, tensorboard's EventAccumulator,
W&B's offline transaction log through wandb's protobuf records)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, dump_yaml, load_config
from orchestrator.tracking import IDS_FILE, open_tracking
from tests.readers import tensorboard_images, tensorboard_scalars, tensorboard_texts, wandb_runs

pytestmark = pytest.mark.slow  # MLflow stores are created (their migrations take seconds)

RECORDS = [
    {"step": 2, "loss/total": 5.0, "loss/mlm": 4.0, "lr": 1e-4, "moe/layer0/load": [0.5, 0.25, 0.25, 0.0],
     "time": 1.0, "memory/total_bytes": 1000.0},
    {"step": 4, "loss/total": 4.0, "loss/mlm": 3.5, "lr": 2e-4, "moe/layer0/load": [0.25, 0.25, 0.25, 0.25],
     "checkpoint": "/x/checkpoint_0000004", "eval/i2t_r1": 0.5, "train/itm_acc": math.nan},
]
SUMMARY = {"name": "trk", "steps": 4, "final_losses": {"total": 4.0}, "eval": {"i2t_r1": 0.5},
           "throughput": {"samples_per_s": 12.0}, "memory": {"total_bytes": 1000.0}, "wall_time_s": 3.0}


def _cfg(tmp_path: Path, **extra: object):
    sets = {"name": "trk", "storage.path": str(tmp_path),
            "tracking.mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "unit"},
            "tracking.tensorboard": True, "tracking.wandb": {"project": "mmpt-unit", "mode": "offline"}, **extra}
    return load_config(None, {k: v for k, v in sets.items()})


def _artifacts(tmp_path: Path) -> list[Path]:
    from PIL import Image

    png, page = tmp_path / "moe_load.png", tmp_path / "report.html"
    Image.new("RGB", (40, 20), (200, 30, 30)).save(png)
    page.write_text("<!doctype html><title>r</title>")
    return [png, page]


def _track(cfg, run_dir: Path, records: list[dict], summary: dict, artifacts: list[Path]) -> dict[str, str]:
    tracking = open_tracking(cfg, str(run_dir), run_dir, dump_yaml(cfg))
    for record in records:
        tracking.log(record)
    ids = tracking.ids
    tracking.finish(summary, artifacts)
    return ids


def test_every_tracker_gets_metrics_config_summary_and_artifacts_and_a_resume_continues_them(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "runs" / "trk"
    ids = _track(cfg, run_dir, RECORDS, SUMMARY, _artifacts(tmp_path))
    assert set(ids) == {"mlflow", "tensorboard", "wandb"}
    assert json.loads((run_dir / IDS_FILE).read_text()) == ids

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("unit")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == ids["mlflow"] and run.info.run_name == "trk" and run.info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss/total")]
    assert sorted(history) == [(2, 5.0), (4, 4.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "moe/layer0/load/0")] == [(2, 0.5), (4, 0.25)]
    assert "train/itm_acc" not in run.data.metrics  # NaN is left out, not logged as a value
    assert run.data.metrics["final/eval/i2t_r1"] == 0.5 and run.data.metrics["final/steps"] == 4
    assert run.data.params["train.lr"] == "0.001" and run.data.params["name"] == "trk"
    assert run.data.params["objectives.mlm"] == "1.0" and run.data.tags["mmpt.config_hash"] == cfg.config_hash()
    assert exp.artifact_location == (tmp_path / "mlartifacts" / "unit").as_uri()  # beside the store, not in the cwd
    assert (tmp_path / "mlartifacts" / "unit" / run.info.run_id / "artifacts" / "report.html").is_file()
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"config.yaml", "summary.json", "moe_load.png", "report.html"}
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "dl"))).read_text())
    assert summary == SUMMARY

    tb = run_dir / "tensorboard"
    scalars = tensorboard_scalars(tb)
    assert [(s, round(v, 6)) for s, v in scalars["loss/total"]] == [(2, 5.0), (4, 4.0)]
    assert [s for s, _ in scalars["eval/i2t_r1"]] == [4] and "train/itm_acc" not in scalars
    texts = tensorboard_texts(tb)
    assert "name: trk" in texts["config"] and '"i2t_r1": 0.5' in texts["summary"]
    assert tensorboard_images(tb) == {"moe_load": (40, 20)}

    (wb,) = wandb_runs(run_dir / "wandb")
    assert wb["run"]["id"] == ids["wandb"] and wb["run"]["project"] == "mmpt-unit" and wb["run"]["job_type"] == "run"
    assert wb["config"]["train"]["lr"] == 0.001 and wb["config"]["name"] == "trk"
    assert wb["history"]["loss/total"] == [(2, 5.0), (4, 4.0)]
    assert wb["history"]["moe/layer0/load/3"] == [(2, 0.0), (4, 0.25)]
    assert wb["summary"]["final/loss/total"] == 4.0 and wb["exit_code"] == 0
    assert {"moe_load.png", "report.html"} <= set(wb["files"])

    # the run resumed (same run dir): the same MLflow and W&B runs continue
    more = _cfg(tmp_path, **{"train.steps": 400})
    again = _track(more, run_dir, [{"step": 6, "loss/total": 3.0}], SUMMARY | {"steps": 6}, [])
    assert again["mlflow"] == ids["mlflow"] and again["wandb"] == ids["wandb"]
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert sorted(m.step for m in client.get_metric_history(ids["mlflow"], "loss/total")) == [2, 4, 6]
    assert client.get_run(ids["mlflow"]).data.params["train.steps"] == "200"  # params are immutable in MLflow
    resumed = [r for r in wandb_runs(run_dir / "wandb") if ("loss/total" in r["history"])]
    assert {r["run"]["id"] for r in resumed} == {ids["wandb"]}


def test_sweep_trials_are_grouped_under_the_sweep(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from orchestrator.sweep.spec import SweepSpec, plan_sweep
    from orchestrator.tracking.sweep import SweepTracking

    root = Path(__file__).resolve().parents[2]
    overrides = {"tracking": {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "sw"},
                              "wandb": {"project": "mmpt-unit", "mode": "offline"}},
                 "storage": {"path": str(tmp_path)}}
    spec = SweepSpec.model_validate({"name": "grp", "base": str(root / "jobs" / "configs" / "quickstart.yaml"),
                                     "overrides": overrides, "space": {"train.lr": [1e-3, 2e-3]}, "seeds": [0],
                                     "metric": "loss/total", "mode": "min"})
    plan = plan_sweep(spec, root, tmp_path / "sweeps")
    group = SweepTracking(plan)
    names = []
    for i, point in enumerate(plan.points):
        cfg = plan.trial_config(point.id, 0)
        assert cfg.tracking.group == "grp"
        names.append(cfg.name)
        run_dir = Path(plan.sweep_dir, "runs", cfg.name)
        _track(cfg, run_dir, [{"step": 1, "loss/total": 2.0 - i}], {"steps": 1}, [])
    group.finish({}, {"point": "b", "value": 1.0}, failed=False)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    parent = [r for r in runs if r.data.tags.get("mmpt.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mmpt.kind") == "run"]
    assert len(parent) == 1 and parent[0].info.run_id == group.mlflow_parent and parent[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == sorted(names)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {group.mlflow_parent}
    assert parent[0].data.metrics["best/loss/total"] == 1.0
    wb = wandb_runs(Path(plan.sweep_dir, "runs"))
    assert sorted((r["run"]["name"], r["run"]["group"], r["run"]["job_type"]) for r in wb) == [
        (n, "grp", "trial") for n in sorted(names)]


def test_missing_client_or_unreachable_server_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        open_tracking(_cfg(tmp_path), str(tmp_path / "r"), tmp_path / "r", "")
    assert err.value.problems == ["tracking.wandb: needs the wandb package: pip install 'mmpt[tracking]' (or wandb)"]
    monkeypatch.setattr(importlib.util, "find_spec", real)

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    cfg = load_config(None, {"tracking.mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"}, "storage.path": str(tmp_path)})
    with pytest.raises(ConfigError) as err:
        open_tracking(cfg, str(tmp_path / "r"), tmp_path / "r", "")
    (line,) = err.value.problems
    assert line.startswith(f"tracking.mlflow.tracking_uri = 'http://127.0.0.1:{port}': cannot start the mlflow run (")
    with pytest.raises(ConfigError) as err:
        load_config(None, {"tracking.wandb": {"project": "p", "mode": "sometimes"}})
    assert err.value.problems[0].startswith("tracking.wandb.mode = 'sometimes': ")
