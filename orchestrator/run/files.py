"""The run directory `<storage.path>/runs/<name>/`: its layout, and the one writer and the one reader
of its `metrics.jsonl`.

    config.yaml        the resolved run config (written before the workers start)
    metrics.jsonl      one JSON record per rank-0 report, appended by the driver (the only writer)
    summary.json       written when the run ends; a finished run is only shown again
    events.jsonl       the ranks' hang reports (orchestrator/run/failures.py)
    tokenizer.json     a tokenizer trained on the shards' captions when none lay beside them
    report.html        the run's report (orchestrator/report/run_page.py)
    moe_load.png       the layer x expert load heatmap of an MoE run
    checkpoint_*/      Ray Train checkpoints (named by jobs/checkpoint.py's dir_name)
    logs/ray.log       the driver's and Ray's output (a local folder for an s3:// run directory)

Every module that reads or writes one of these takes its name and path from here; readers of
metrics.jsonl see the same records: complete lines only (a half-written last line waits), a line
that does not parse is skipped, and `read_metrics` keeps one record per step (a resumed run may
have logged a step twice, before its last checkpoint; the later line wins).
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

from jobs import storage
from jobs.config import RunConfig
from orchestrator.config import ConfigError, load_config

RUNS = "runs"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVENTS = "events.jsonl"
TOKENIZER = "tokenizer.json"
REPORT = "report.html"
MOE_HEATMAP = "moe_load.png"
CHECKPOINT_PREFIX = "checkpoint_"
LOGS = "logs"
RAY_LOG = "ray.log"


def run_uri(storage_path: str, name: str) -> str:
    """Where run `name` of a config whose `storage.path` is `storage_path` keeps its files."""
    return storage.join(storage_path, RUNS, name)


def is_checkpoint(name: str) -> bool:
    return name.startswith(CHECKPOINT_PREFIX)


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint folder of a local run directory; ConfigError when it has none."""
    found = sorted(p for p in run_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir())
    if not found:
        raise ConfigError([f"{run_dir}: no {CHECKPOINT_PREFIX}* folder (the run has not saved a checkpoint yet)"])
    return found[-1]


def run_config(run_dir: Path, what: str) -> RunConfig:
    """The config a local run directory was trained with; `what` names it in the error (the field
    that gave the directory, or the directory itself)."""
    if not (run_dir / CONFIG).is_file():
        raise ConfigError([f"{what}: not a run directory (no {CONFIG})"])
    return load_config(run_dir / CONFIG)


def tokenizer_candidates(cfg: RunConfig, shard_folder: str | None, run_dir: str) -> list[str]:
    """Where a run's tokenizer is looked for, in order: `data.tokenizer`; the pretrained text
    encoder's (it reads the tokens it was trained on); beside the shards (their folder, then its
    parent); the run directory (one trained on the captions when none lay beside them)."""
    found = [cfg.data.tokenizer] if cfg.data.tokenizer else []
    found += [storage.join(cfg.model.init.text, TOKENIZER)] if cfg.model.init.text else []
    if shard_folder:
        found += [posixpath.join(shard_folder, TOKENIZER), posixpath.join(posixpath.dirname(shard_folder), TOKENIZER)]
    return [*found, storage.join(str(run_dir), TOKENIZER)]


def run_tokenizer(run_dir: Path, cfg: RunConfig) -> Path | None:
    """The tokenizer a local run directory trained with, found where the runner looks for it (local
    paths only, the shards' folder read from the config): for `mmpt export`, `mmpt generate` and a
    fine-tuning run."""
    train = cfg.data.sources()[0].shards
    first = train[0] if isinstance(train, list) else train
    candidates = tokenizer_candidates(cfg, first.rstrip("/"), str(run_dir))
    return next((Path(c) for c in candidates if "://" not in c and Path(c).is_file()), None)


class RunFiles:
    """The run directory of `cfg` on local disk or object storage."""

    def __init__(self, cfg: RunConfig) -> None:
        self.opts = storage.StorageOptions.of(cfg.storage)
        self.root = storage.join(cfg.storage.path, RUNS)
        self.uri = run_uri(cfg.storage.path, cfg.name)
        self._lines: dict[str, list[str]] = {}

    def path(self, name: str) -> str:
        return storage.join(self.uri, name)

    def write_json(self, name: str, obj: Any) -> None:
        storage.write_text(self.path(name), json.dumps(obj, indent=1, default=float) + "\n", self.opts)

    def read_json(self, name: str) -> Any:
        target = self.path(name)
        return json.loads(storage.read_text(target, self.opts)) if storage.exists(target, self.opts) else None

    def delete(self) -> None:
        from pyarrow.fs import FileType

        fs, path = storage.filesystem_for(self.uri, self.opts)
        if fs.get_file_info(path).type != FileType.NotFound:
            fs.delete_dir(path)

    def append_line(self, name: str, record: dict[str, Any]) -> None:
        """One JSON line at the end of `name` (metrics.jsonl, events.jsonl)."""
        line = json.dumps(record, default=float)
        target = self.path(name)
        if not storage.is_remote(target):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a") as f:
                f.write(line + "\n")
            return
        if name not in self._lines:  # object stores cannot append: keep the file's lines here
            old = storage.read_text(target, self.opts) if storage.exists(target, self.opts) else ""
            self._lines[name] = old.splitlines()
        self._lines[name].append(line)
        storage.write_text(target, "\n".join(self._lines[name]) + "\n", self.opts)

    def append_metrics(self, record: dict[str, Any]) -> None:
        self.append_line(METRICS, record)

    def local_log_dir(self) -> Path:
        """logs/ of the run: in the run directory, or under .mmpt/ here for an s3:// one."""
        if storage.is_remote(self.uri):
            return Path(".mmpt", RUNS, Path(self.uri).name, LOGS).absolute()
        return Path(self.uri, LOGS)


def _parse(chunk: bytes) -> list[dict[str, Any]]:
    records = []
    for line in chunk.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue  # a corrupt line loses one report, not the run's metrics
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsFile:
    """Follows a run directory's metrics.jsonl (local or s3://): `poll()` returns the records of
    the complete lines appended since the last poll. A file that shrank (the run restarted with
    --fresh) is read from the start again, and `restarted` says so until the next poll."""

    def __init__(self, run_dir: str, options: storage.StorageOptions | None = None, offset: int = 0) -> None:
        self.uri = storage.join(str(run_dir), METRICS)
        self.options = options
        self.offset = offset
        self.restarted = False

    def poll(self) -> list[dict[str, Any]]:
        from pyarrow import fs as pafs

        self.restarted = False
        filesystem, path = storage.filesystem_for(self.uri, self.options)
        info = filesystem.get_file_info(path)
        if info.type != pafs.FileType.File:
            return []
        size = int(info.size or 0)
        if size < self.offset:
            self.offset, self.restarted = 0, True
        if size == self.offset:
            return []
        with filesystem.open_input_file(path) as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next poll
        self.offset += end
        return _parse(chunk[:end])


def read_metrics(run_dir: str | Path, options: storage.StorageOptions | None = None) -> list[dict[str, Any]]:
    """All of a run's records, one per step, in step order (a step logged twice: the later line)."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in MetricsFile(str(run_dir), options).poll():
        by_step[int(record.get("step", 0))] = record
    return [by_step[s] for s in sorted(by_step)]


def read_summary(run_dir: str | Path, options: storage.StorageOptions | None = None) -> dict[str, Any] | None:
    """The run's summary.json (written when it finished), or None (absent or unreadable)."""
    uri = storage.join(str(run_dir), SUMMARY)
    try:
        if not storage.exists(uri, options):
            return None
        data = json.loads(storage.read_text(uri, options))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
