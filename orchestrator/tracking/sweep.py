"""A sweep's tracked runs, grouped: every trial is a tracked run of its own (runner.run logs it),
its config carrying `tracking.group = <sweep name>` (orchestrator/sweep/spec.py, SweepPlan.trial_overrides).

W&B groups by that name (`group`, `job_type: trial`). MLflow nests: the sweep driver opens one
parent run first (tags `mmpt.kind: sweep`, `mmpt.group`), the trials find it by those tags and set
MLflow's `mlflow.parentRunId`, and when the sweep ends the parent gets the sweep report and the best
configuration's figure. TensorBoard needs nothing: `tensorboard --logdir sweeps/<name>/runs` shows
one run per trial.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError, validate
from orchestrator.sweep.spec import SweepPlan


class SweepTracking:
    """The sweep-level side of tracking (only MLflow has one: the parent run)."""

    def __init__(self, plan: SweepPlan) -> None:
        self.plan = plan
        self._mlflow: tuple[Any, str] | None = None
        cfg = validate(plan.base)
        section = cfg.tracking.mlflow
        if section is None:
            return
        from orchestrator.tracking import check_clients
        from orchestrator.tracking.mlflow_tracker import SWEEP_KIND, client, experiment_id, find_parent

        check_clients(cfg)
        try:
            mlflow_client = client(section)
            exp = experiment_id(mlflow_client, section.experiment)
            group = cfg.tracking.group or plan.name
            # A resumed sweep continues its parent run; trials started before find the same one.
            parent = find_parent(mlflow_client, exp, group) or mlflow_client.create_run(
                exp, run_name=plan.name, tags={"mmpt.kind": SWEEP_KIND, "mmpt.group": group,
                                               "mmpt.sweep_dir": plan.sweep_dir, "mlflow.source.name": "mmpt"}).info.run_id
        except Exception as exc:  # noqa: BLE001 - one line naming the setting, before any trial starts
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError([f"tracking.mlflow.tracking_uri = {section.tracking_uri!r}: cannot start the "
                               f"sweep's parent run ({first[:300]})"]) from None
        self._mlflow = (mlflow_client, parent)
        mlflow_client.log_text(parent, plan.to_yaml(), "sweep.yaml")

    @property
    def mlflow_parent(self) -> str | None:
        return None if self._mlflow is None else self._mlflow[1]

    def finish(self, report_files: dict[str, Path], best: dict[str, Any] | None, failed: bool) -> None:
        if self._mlflow is None:
            return
        mlflow_client, parent = self._mlflow
        for path in report_files.values():
            if path.is_file():
                mlflow_client.log_artifact(parent, str(path))
        if best:
            mlflow_client.log_dict(parent, best, "best.json")
            mlflow_client.set_tag(parent, "mmpt.best", json.dumps(best, default=float)[:5000])
            if isinstance(best.get("value"), int | float):
                mlflow_client.log_metric(parent, f"best/{self.plan.metric}", float(best["value"]))
        mlflow_client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
