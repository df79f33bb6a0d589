"""A real `mmpt run` (2 Ray Train workers, MoE) tracked by MLflow, TensorBoard and W&B (offline) at
once; each tracker read back with its own reader must hold the same series as metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.runner import run
from tests.integration.conftest import QUICKSTART, tiny
from tests.readers import tensorboard_images, tensorboard_scalars, wandb_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_run_is_tracked_by_mlflow_tensorboard_and_wandb(ray_session, shapes_data, tmp_path) -> None:
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(QUICKSTART, tiny(shapes_data, tmp_path, name="tracked", **{
        "tracking.mlflow": {"tracking_uri": store, "experiment": "it"}, "tracking.tensorboard": True,
        "tracking.wandb": {"project": "mmpt-it", "mode": "offline"}}))
    result = run(cfg)
    run_dir = Path(result.run_dir)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [(r["step"], r["loss/total"]) for r in records]
    assert [s for s, _ in want] == [2, 3, 4, 6]
    ids = json.loads((run_dir / "tracking.json").read_text())

    client = MlflowClient(tracking_uri=store)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("it").experiment_id])
    assert mlrun.info.run_id == ids["mlflow"] and mlrun.info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "loss/total")) == want
    assert mlrun.data.params["model.hidden_size"] == "32" and mlrun.data.params["moe.num_experts"] == "4"
    assert mlrun.data.metrics["final/eval/i2t_r1"] == result.summary["eval"]["i2t_r1"]
    load = [client.get_metric_history(mlrun.info.run_id, f"moe/layer0/load/{e}")[-1].value for e in range(4)]
    assert load == pytest.approx(records[-1]["moe/layer0/load"])
    assert {f.path for f in client.list_artifacts(mlrun.info.run_id)} == {"config.yaml", "summary.json",
                                                                          "moe_load.png", "report.html"}

    tb = tensorboard_scalars(run_dir / "tensorboard")
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in tb["loss/total"]] == want
    assert [s for s, _ in tb["samples_per_s"]] == [2, 3, 4, 6]
    assert "moe_load" in tensorboard_images(run_dir / "tensorboard")

    (wb,) = wandb_runs(run_dir / "wandb")
    assert wb["run"]["id"] == ids["wandb"] and wb["config"]["model"]["preset"] == "vilt"
    assert wb["history"]["loss/total"] == [(s, pytest.approx(v)) for s, v in want]
    assert wb["summary"]["final/steps"] == 6 and wb["exit_code"] == 0
    assert {"moe_load.png", "report.html"} <= set(wb["files"])
    assert (run_dir / "report.html").read_text().startswith("<!doctype html>")
