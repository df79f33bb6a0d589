"""Experiment tracking: the `tracking` section's trackers, fed by the run's driver.

    tracking:
      mlflow: {tracking_uri: sqlite:///mlflow.db, experiment: mmpt}
      tensorboard: true
      wandb: {project: mmpt, mode: offline}

`open_tracking` opens every tracker the config names (a missing client library or an unreachable
store is a one-line ConfigError before Ray starts); `RunTracking.log` gets each report as the driver
writes it to metrics.jsonl; `finish` the summary and the artifacts. The trackers' run ids are kept
in `runs/<name>/tracking.json`, so a resumed run continues the same tracked runs. A tracker that
fails mid-run is dropped with a warning in logs/ray.log: the run directory is the record, a
tracker only mirrors it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs import storage
from jobs.config import RunConfig
from orchestrator.config import ConfigError
from orchestrator.tracking.base import TrackedRun, Tracker, scalars

log = logging.getLogger(__name__)

IDS_FILE = "tracking.json"
# tracker -> (module that must import, what to install)
_CLIENTS = {"mlflow": ("mlflow", "mlflow-skinny"), "tensorboard": ("tensorboardX", "tensorboardX"),
            "wandb": ("wandb", "wandb")}


def _opener(name: str, cfg: RunConfig) -> Callable[[TrackedRun], Tracker]:
    if name == "mlflow":
        from orchestrator.tracking.mlflow_tracker import MLflowTracker

        return lambda run: MLflowTracker(cfg.tracking.mlflow, run)  # type: ignore[arg-type]
    if name == "tensorboard":
        from orchestrator.tracking.tensorboard_tracker import TensorBoardTracker

        return TensorBoardTracker
    from orchestrator.tracking.wandb_tracker import WandbTracker

    return lambda run: WandbTracker(cfg.tracking.wandb, run)  # type: ignore[arg-type]


def _where(name: str, cfg: RunConfig) -> str:
    section = getattr(cfg.tracking, name)
    if name == "mlflow":
        return f"tracking.mlflow.tracking_uri = {section.tracking_uri!r}"
    if name == "wandb":
        return f"tracking.wandb.project = {section.project!r}"
    return "tracking.tensorboard = true"


def check_clients(cfg: RunConfig) -> None:
    """ConfigError naming each enabled tracker whose client library is not installed."""
    import importlib.util

    missing = [f"tracking.{name}: needs the {_CLIENTS[name][1]} package: pip install 'mmpt[tracking]' "
               f"(or {_CLIENTS[name][1]})" for name in cfg.tracking.enabled
               if importlib.util.find_spec(_CLIENTS[name][0]) is None]
    if missing:
        raise ConfigError(missing)


class RunTracking:
    """The open trackers of one run (possibly none)."""

    def __init__(self, trackers: list[Tracker], run: TrackedRun | None = None) -> None:
        self.trackers = trackers
        self.run = run

    @property
    def ids(self) -> dict[str, str]:
        return {t.name: t.run_id for t in self.trackers}

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops the run
                log.warning("tracking: %s failed to %s (%s: %s); it is dropped for the rest of the run",
                            tracker.name, what, type(exc).__name__, exc)
                self.trackers.remove(tracker)

    def log(self, record: dict[str, Any]) -> None:
        series, step = scalars(record), int(record.get("step", 0))
        if series:
            self._each("log a report", lambda t: t.log(series, step))

    def finish(self, summary: dict[str, Any], artifacts: list[Path], failed: bool = False) -> None:
        present = [p for p in artifacts if p.is_file()]
        self._each("finish", lambda t: t.finish(summary, present, failed))
        self.trackers = []


def open_tracking(cfg: RunConfig, run_dir: str, local_dir: Path, config_yaml: str,
                  opts: storage.StorageOptions | None = None) -> RunTracking:
    """Open the config's trackers (none: an empty RunTracking); ConfigError when one cannot start."""
    if not cfg.tracking.enabled:
        return RunTracking([])
    check_clients(cfg)
    ids_uri = storage.join(run_dir, IDS_FILE)
    resumed = json.loads(storage.read_text(ids_uri, opts)) if storage.exists(ids_uri, opts) else {}
    local_dir.mkdir(parents=True, exist_ok=True)
    run = TrackedRun(name=cfg.name, run_dir=run_dir, local_dir=local_dir, config=cfg.to_dict(),
                     config_yaml=config_yaml, config_hash=cfg.config_hash(), group=cfg.tracking.group,
                     resumed_ids=resumed)
    opened: list[Tracker] = []
    try:
        for name in cfg.tracking.enabled:
            try:
                opened.append(_opener(name, cfg)(run))
            except Exception as exc:  # noqa: BLE001 - shown as one line naming the setting
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ConfigError([f"{_where(name, cfg)}: cannot start the {name} run ({first[:300]})"]) from None
    except ConfigError:
        RunTracking(opened).finish({}, [], failed=True)
        raise
    tracking = RunTracking(opened, run)
    storage.write_text(ids_uri, json.dumps(tracking.ids, indent=1) + "\n", opts)
    return tracking


__all__ = ["IDS_FILE", "RunTracking", "check_clients", "open_tracking"]
