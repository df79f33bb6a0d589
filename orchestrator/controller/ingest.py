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

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from jobs import storage

_MOE_LOAD = re.compile(r"^moe/layer(\d+)/load$")
_MOE_DROPPED = re.compile(r"^moe/layer(\d+)/dropped$")


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
            if key.startswith("loss/") and num is not None:
                self.losses[key[5:]] = num
            elif (m := _MOE_LOAD.match(key)) and isinstance(value, list):
                loads = [_num(v) for v in value]
                self.moe_load[int(m.group(1))] = [v if v is not None else math.nan for v in loads]
            elif (m := _MOE_DROPPED.match(key)) and num is not None:
                self.moe_layer_dropped[int(m.group(1))] = num
        for attr, key in (("samples_per_s", "samples_per_s"), ("tokens_per_s", "tokens_per_s"),
                          ("data_wait_share", "data_wait_share"), ("moe_dropped", "moe/dropped"),
                          ("last_time", "time")):
            num = _num(record.get(key))
            if num is not None:
                setattr(self, attr, num)
        if record.get("checkpoint"):
            self.checkpoint_time = _num(record.get("time")) or self.last_time
            self.checkpoint_step = self.step


class MetricsTail:
    """Follows one run's metrics.jsonl; `poll()` reads what was appended since the last poll."""

    def __init__(self, run_dir: str, options: storage.StorageOptions | None = None) -> None:
        self.uri = storage.join(run_dir, "metrics.jsonl")
        self.options = options
        self.metrics = JobMetrics()
        self._offset = 0

    def poll(self) -> int:
        """Parse new complete lines; returns how many records were read (0 when the file is absent)."""
        from pyarrow import fs as pafs

        filesystem, path = storage.filesystem_for(self.uri, self.options)
        info = filesystem.get_file_info(path)
        if info.type != pafs.FileType.File:
            return 0
        size = int(info.size or 0)
        if size < self._offset:  # the run was restarted --fresh: start over
            self.metrics, self._offset = JobMetrics(), 0
        if size == self._offset:
            return 0
        with filesystem.open_input_file(path) as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        end = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next poll
        count = 0
        for line in chunk[:end].splitlines():
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue  # a corrupt line loses one report, not the job's metrics
            if isinstance(record, dict):
                self.metrics.update(record)
                count += 1
        self._offset += end
        return count


def read_summary(run_dir: str, options: storage.StorageOptions | None = None) -> dict[str, Any] | None:
    """The run's summary.json (written when it finished), or None."""
    uri = storage.join(run_dir, "summary.json")
    try:
        if not storage.exists(uri, options):
            return None
        data = json.loads(storage.read_text(uri, options))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def storage_options(config: dict[str, Any]) -> storage.StorageOptions:
    """The storage options of a resolved run config (as stored in the registry)."""
    section = config.get("storage") or {}
    return storage.StorageOptions(endpoint_url=section.get("endpoint_url"), region=section.get("region"))
