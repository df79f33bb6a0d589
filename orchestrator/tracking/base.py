"""What every tracker gets from the driver, and the one way reports become tracker scalars.

The driver (orchestrator/run/runner.py) is the only process that sees every report of a run: rank 0's
metrics reach it through Ray Train's callback and the run's hub actor, and it writes `metrics.jsonl`. Trackers
hang off that loop, so the workers never import a tracker, never hold its credentials, and a
tracker that falls over costs a warning, never the run: the run directory stays the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from models import metric_keys as mk

# Keys of a report that are bookkeeping, not series: the step is the x axis, the rest are not numbers.
_NOT_SERIES = frozenset({"step", "time", "checkpoint"})


@dataclass(frozen=True)
class TrackedRun:
    """One run as the trackers see it."""

    name: str
    run_dir: str  # local path or s3:// URI of runs/<name>/
    local_dir: Path  # where trackers that write files put them (the run dir, or .mmpt/runs/<name> for s3://)
    config: dict[str, Any]  # the resolved RunConfig, as written to config.yaml
    config_yaml: str
    config_hash: str
    group: str | None = None  # the sweep a trial belongs to
    resumed_ids: dict[str, str] = field(default_factory=dict)  # tracker -> its run id, when resuming


class Tracker(Protocol):
    """A tracker backend: opened when the run starts, fed each report, closed with the summary."""

    name: str

    @property
    def run_id(self) -> str: ...

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def finish(self, summary: dict[str, Any], artifacts: list[Path], failed: bool) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric series of a report: lists (MoE per-expert load) become `key/i`, non-finite and
    non-numeric values are left out (a tracker rejects NaN or logs it as a gap; the run's file keeps it)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_SERIES:
            continue
        items = enumerate(value) if isinstance(value, list | tuple) else [(None, value)]
        for i, v in items:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                continue
            out[key if i is None else f"{key}/{i}"] = float(v)
    return out


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: the `--set` spelling of every setting."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flat(value, f"{name}.")
        else:
            out[name] = value
    return out


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers as `final/...` scalars (final losses, eval, throughput, memory, MoE)."""
    picked = mk.keyed(mk.LOSS, summary.get("final_losses") or {})
    picked |= mk.keyed(mk.EVAL, summary.get("eval") or {})
    picked |= {k: v for k, v in (summary.get("throughput") or {}).items()}
    picked |= mk.keyed(mk.MEMORY, summary.get("memory") or {})
    picked |= {"steps": summary.get("steps"), "wall_time_s": summary.get("wall_time_s"),
               mk.DATA + "bad_total": (summary.get("data") or {}).get("bad_total")}
    return scalars(picked)
