"""MLflow: one MLflow run per mmpt run, with MLflow's own client (`mlflow.MlflowClient`).

Params are the resolved config in `--set` spelling (`train.lr`, `moe.num_experts`), metrics every
report's scalars at their step, artifacts `config.yaml`, `summary.json`, the MoE heatmap and the run
report. A sweep's trials are children of one parent run per sweep (`mlflow.parentRunId`, MLflow's
nesting tag), which the sweep driver opens first (orchestrator/tracking/sweep.py) and which holds the
sweep report. `mlflow-skinny` is enough: with SQLAlchemy it writes a SQLite store, and it talks to
a tracking server over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from jobs.config import MLflowTracking
from orchestrator.run.files import CONFIG, SUMMARY
from orchestrator.tracking.base import TrackedRun, flat, summary_scalars

_BATCH = 1000  # MLflow's log_batch limits: 1000 metrics, 100 params, 100 tags per request
_PARAM_BATCH = 100
_PARAM_MAX = 6000  # longest param value MLflow stores
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")
SWEEP_KIND = "sweep"


def client(section: MLflowTracking) -> Any:
    """An MlflowClient on the section's store; a plain folder is MLflow's file store."""
    from mlflow import MlflowClient

    uri = section.tracking_uri
    if "://" not in uri or uri.startswith("file:"):
        # MLflow 3 keeps its file store behind an opt-in (it prefers a database); a folder is the user's choice.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if "://" not in uri:
            uri = Path(uri).absolute().as_uri()
    return MlflowClient(tracking_uri=uri)


def _artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (`mlartifacts/`, as `mlflow
    server` names it); MLflow's own default there is `./mlruns` in whatever directory the driver runs
    in. A server or a file store decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.absolute().parent / "mlartifacts").as_uri()


def experiment_id(mlflow_client: Any, name: str) -> str:
    """The experiment's id, created when missing (two trials creating it at once: one wins, both use it)."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        root = _artifact_root(mlflow_client.tracking_uri)
        return mlflow_client.create_experiment(name, artifact_location=None if root is None else f"{root}/{name}")
    except MlflowException:
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def find_parent(mlflow_client: Any, exp_id: str, group: str) -> str | None:
    """The run id of the sweep `group`'s parent run (the newest, when the sweep was started over)."""
    runs = mlflow_client.search_runs([exp_id], filter_string=f"tags.`mmpt.kind` = '{SWEEP_KIND}' and "
                                     f"tags.`mmpt.group` = '{group}'", order_by=["attributes.start_time DESC"],
                                     max_results=1)
    return runs[0].info.run_id if runs else None


def _key(name: str) -> str:
    return _BAD_KEY.sub("_", name)


def _params(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in flat(config).items():
        text = json.dumps(value) if isinstance(value, list | dict | bool) or value is None else str(value)
        out[_key(key)[:250]] = text[:_PARAM_MAX]
    return out


class MLflowTracker:
    name = "mlflow"

    def __init__(self, section: MLflowTracking, run: TrackedRun) -> None:
        from mlflow.entities import Param, RunStatus

        self._client = client(section)
        exp = experiment_id(self._client, section.experiment)
        tags = {"mmpt.run_dir": run.run_dir, "mmpt.config_hash": run.config_hash, "mmpt.kind": "run",
                "mlflow.source.name": "mmpt", "mlflow.runName": run.name}
        if run.group:
            tags["mmpt.group"] = run.group
            parent = find_parent(self._client, exp, run.group)
            if parent is not None:
                tags["mlflow.parentRunId"] = parent
        old = run.resumed_ids.get(self.name)
        existing: dict[str, str] = {}
        if old is not None and self._exists(old):  # a resumed run continues its MLflow run
            self._id = old
            self._client.update_run(old, status=RunStatus.to_string(RunStatus.RUNNING))
            existing = dict(self._client.get_run(old).data.params)
        else:
            self._id = self._client.create_run(exp, run_name=run.name, tags=tags).info.run_id
        # Params are immutable in MLflow: a resumed run keeps those it was started with.
        params = [Param(k, v) for k, v in _params(run.config).items() if k not in existing]
        for i in range(0, len(params), _PARAM_BATCH):
            self._client.log_batch(self._id, params=params[i:i + _PARAM_BATCH])
        self._client.log_text(self._id, run.config_yaml, CONFIG)

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(run_id)
            return True
        except MlflowException:
            return False

    @property
    def run_id(self) -> str:
        return self._id

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_key(k), v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), _BATCH):
            self._client.log_batch(self._id, metrics=metrics[i:i + _BATCH])

    def finish(self, summary: dict[str, Any], artifacts: list[Path], failed: bool) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(summary.get("steps") or 0)
        final = [Metric(_key(f"final/{k}"), v, now, step) for k, v in summary_scalars(summary).items()]
        if final:
            self._client.log_batch(self._id, metrics=final)
        if summary:
            self._client.log_dict(self._id, summary, SUMMARY)
        for path in artifacts:
            self._client.log_artifact(self._id, str(path))
        self._client.set_terminated(self._id, status="FAILED" if failed else "FINISHED")
