"""Prometheus metrics of the controller (prometheus-client), built from a snapshot at scrape time.

Per-job series exist for running jobs and for jobs that ended less than a retention window ago
(so a 30-second job is not missed between two 15-second scrapes); afterwards they disappear
instead of going stale. Labels are bounded: `job` (submission id, one per live job), `term`
(loss terms of the configured objectives), `layer`/`expert` (MoE layout, capped), `state` (6).
There is no per-step label: a step is a value (`mmpt_job_step`), never a series.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.controller.ingest import JobMetrics
from orchestrator.controller.retry import REASONS
from orchestrator.controller.state import STATES, JobState, can_move

# Caps that keep a malformed record from exploding the series count.
_MAX_TERMS, _MAX_LAYERS, _MAX_EXPERTS = 64, 128, 512

# name -> help; the Grafana dashboard and its test use these names.
JOB_METRICS: dict[str, str] = {
    "mmpt_job_info": "1 for each job with live series; labels name, kind, state",
    "mmpt_job_step": "latest optimizer step reported",
    "mmpt_job_loss": "latest value of each loss term",
    "mmpt_job_samples_per_second": "training throughput, samples/s (all workers)",
    "mmpt_job_tokens_per_second": "training throughput, text tokens/s (all workers)",
    "mmpt_job_data_wait_share": "share of step time spent waiting for data (0-1)",
    "mmpt_job_moe_expert_load": "fraction of routed tokens each expert received, per MoE layer",
    "mmpt_job_moe_layer_dropped_fraction": "fraction of tokens dropped by capacity, per MoE layer",
    "mmpt_job_moe_dropped_fraction": "fraction of tokens dropped by capacity, all MoE layers",
    "mmpt_job_checkpoint_age_seconds": "seconds since the latest checkpoint (since the start before the first)",
    "mmpt_job_metrics_age_seconds": "seconds since the latest metrics record",
}


@dataclass(frozen=True)
class LiveJob:
    id: str
    name: str
    kind: str
    state: JobState
    started_at: float | None
    ended_at: float | None
    metrics: JobMetrics


@dataclass(frozen=True)
class Snapshot:
    counts: dict[JobState, int] = field(default_factory=dict)
    jobs: tuple[LiveJob, ...] = ()


class ControllerMetrics:
    """The controller's CollectorRegistry: counters updated by callbacks, gauges from `publish`ed snapshots."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter("mmpt_controller_reconcile", "reconcile passes", registry=self.registry)
        self.cluster_errors = Counter("mmpt_controller_cluster_errors", "failed Jobs API calls per cluster",
                                      ["cluster"], registry=self.registry)
        self.transitions = Counter("mmpt_job_transitions", "job state transitions applied",
                                   ["from_state", "to_state"], registry=self.registry)
        # Every edge starts at 0: a labelled counter born at 1 on its first increment has no earlier
        # sample, so `increase(...)` (the MmptJobLost alert) would never see the first job lost.
        for old in STATES:
            for new in STATES:
                if can_move(old, new):
                    self.transitions.labels(from_state=old, to_state=new)
        self.resubmissions = Counter("mmpt_job_resubmissions", "runs resubmitted after their driver or cluster "
                                     "was lost, by reason", ["reason"], registry=self.registry)
        for reason in REASONS:  # born at 0, like the transitions
            self.resubmissions.labels(reason=reason)
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self.registry.register(_JobCollector(self))

    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    @property
    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


class _JobCollector(Collector):
    def __init__(self, owner: ControllerMetrics) -> None:
        self._owner = owner

    def describe(self) -> list:  # no fixed description: families are built per scrape
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap, now = self._owner.snapshot, time.time()
        by_state = GaugeMetricFamily("mmpt_jobs", "jobs in the registry by state", labels=["state"])
        for state in STATES:
            by_state.add_metric([state], snap.counts.get(state, 0))
        yield by_state
        fams = {name: GaugeMetricFamily(name, doc, labels=_labels(name)) for name, doc in JOB_METRICS.items()}
        for job in snap.jobs:
            _add_job(fams, job, now)
        yield from fams.values()


def _labels(name: str) -> list[str]:
    extra = {"mmpt_job_info": ["name", "kind", "state"], "mmpt_job_loss": ["term"],
             "mmpt_job_moe_expert_load": ["layer", "expert"], "mmpt_job_moe_layer_dropped_fraction": ["layer"]}
    return ["job", *extra.get(name, [])]


def _add_job(fams: dict[str, GaugeMetricFamily], job: LiveJob, now: float) -> None:
    m, jid = job.metrics, job.id
    fams["mmpt_job_info"].add_metric([jid, job.name, job.kind, job.state], 1.0)
    # A finished job's ages stop growing at its end: it is not "late", it is done.
    clock = job.ended_at if job.ended_at is not None else now
    for name, value in (("mmpt_job_step", m.step), ("mmpt_job_samples_per_second", m.samples_per_s),
                        ("mmpt_job_tokens_per_second", m.tokens_per_s),
                        ("mmpt_job_data_wait_share", m.data_wait_share),
                        ("mmpt_job_moe_dropped_fraction", m.moe_dropped),
                        ("mmpt_job_metrics_age_seconds", None if m.last_time is None else max(0.0, clock - m.last_time))):
        if value is not None:
            fams[name].add_metric([jid], float(value))
    for term, value in sorted(m.losses.items())[:_MAX_TERMS]:
        fams["mmpt_job_loss"].add_metric([jid, term], value)
    for layer, loads in sorted(m.moe_load.items())[:_MAX_LAYERS]:
        for expert, value in enumerate(loads[:_MAX_EXPERTS]):
            fams["mmpt_job_moe_expert_load"].add_metric([jid, str(layer), str(expert)], value)
    for layer, value in sorted(m.moe_layer_dropped.items())[:_MAX_LAYERS]:
        fams["mmpt_job_moe_layer_dropped_fraction"].add_metric([jid, str(layer)], value)
    since = m.checkpoint_time if m.checkpoint_time is not None else job.started_at
    if since is not None:
        fams["mmpt_job_checkpoint_age_seconds"].add_metric([jid], max(0.0, clock - since))
