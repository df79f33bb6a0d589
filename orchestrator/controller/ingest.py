"""Reading a run's live metrics from its run directory (local or s3://), incrementally.

A run's driver appends one JSON record per report to `<storage.path>/runs/<name>/metrics.jsonl`
(see orchestrator/run/runner.py): `step`, `loss/<term>`, `samples_per_s`, `tokens_per_s`,
`data_wait_share`, `time`, `checkpoint` when one was saved, and for MoE models
`moe/layer{i}/load` (E expert fractions), `moe/layer{i}/dropped` and `moe/dropped`.
`MetricsTail` keeps a byte offset and parses only the lines added since its last poll (an object
store rewrites the file whole, but the file only grows, so the offset stays valid); `JobMetrics`
keeps the latest value of each series, which is all the exporter needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from jobs import storage
from models import metric_keys as mk
from orchestrator.run.files import MetricsFile


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class JobMetrics:
    """The latest value of every series a run reported."""

    step: int | None = None
    losses: dict[str, float] = field(default_factory=dict)
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    data_wait_share: float | None = None
    moe_load: dict[int, list[float]] = field(default_factory=dict)  # layer -> fraction per expert
    moe_layer_dropped: dict[int, float] = field(default_factory=dict)
    moe_dropped: float | None = None
    last_time: float | None = None
    checkpoint_time: float | None = None
    checkpoint_step: int | None = None
    records: int = 0

    def update(self, record: dict[str, Any]) -> None:
        self.records += 1
        step = _num(record.get("step"))
        if step is not None:
            self.step = int(step)
        for key, value in record.items():
            num = _num(value)
            layer = mk.moe_layer(key)
            if key.startswith(mk.LOSS) and num is not None:
                self.losses[key[len(mk.LOSS):]] = num
            elif layer is not None and layer[1] == "load" and isinstance(value, list):
                loads = [_num(v) for v in value]
                self.moe_load[layer[0]] = [v if v is not None else math.nan for v in loads]
            elif layer is not None and layer[1] == "dropped" and num is not None:
                self.moe_layer_dropped[layer[0]] = num
        for attr, key in (("samples_per_s", "samples_per_s"), ("tokens_per_s", "tokens_per_s"),
                          ("data_wait_share", "data_wait_share"), ("moe_dropped", mk.MOE_DROPPED),
                          ("last_time", "time")):
            num = _num(record.get(key))
            if num is not None:
                setattr(self, attr, num)
        if record.get("checkpoint"):
            self.checkpoint_time = _num(record.get("time")) or self.last_time
            self.checkpoint_step = self.step


class MetricsTail:
    """Follows one run's metrics.jsonl (orchestrator/run/files.py's reader); `poll()` folds what was
    appended since the last poll into `metrics` and returns how many records it read."""

    def __init__(self, run_dir: str, options: storage.StorageOptions | None = None) -> None:
        self._file = MetricsFile(run_dir, options)
        self.uri = self._file.uri
        self.metrics = JobMetrics()

    def poll(self) -> int:
        records = self._file.poll()
        if self._file.restarted:  # the run was restarted --fresh: start over
            self.metrics = JobMetrics()
        for record in records:
            self.metrics.update(record)
        return len(records)


def storage_options(config: dict[str, Any]) -> storage.StorageOptions:
    """The storage options of a resolved run config (as stored in the registry)."""
    return storage.StorageOptions.of(config.get("storage") or {})
