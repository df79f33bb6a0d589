"""Reconciling the registry with the clusters, once (`mmpt jobs`) or on an interval (`mmpt controller`).

One pass: list the jobs of every cluster that has an active job (one Jobs API call per cluster),
turn what each job's cluster says into an event, let the state machine decide, apply the decision
as a compare-and-set in the registry, then hand each applied transition to the callbacks (log
line, Prometheus counter). The pass itself has no side effect besides the registry: what happens
on a transition hangs off `Controller.callbacks`. An ended run without final metrics gets them
from its summary.json (`finalize`), whichever process saw it end.

A cluster that does not answer yields no event for its jobs (they keep their state); a cluster
that answers without a job we believed active makes it LOST. Jobs sent by `mmpt submit` carry
their record in Ray job metadata, so a controller watching a cluster (`--address`) also registers
jobs it never saw submitted (another submitter, another registry, a crash between submit and
register).

Runs whose driver or cluster was lost are resubmitted by the controller (not by one-shot `mmpt
jobs` commands): a cluster silent for longer than `RetryPolicy.unreachable_grace_s` makes its
active jobs LOST, and each pass ends by asking `retry.decide` about every LOST run: wait out the
backoff, resubmit (only to a cluster that answered in this pass), or give up (FAILED). A
resubmission is sent before it is recorded, under a deterministic Ray id (`<id>-a<N>`): a
controller killed in between sends the same id again next time and the cluster says it already
has it, so a run is never sent twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from orchestrator.controller import retry, state
from orchestrator.controller.ingest import MetricsTail, storage_options
from orchestrator.controller.metrics import ControllerMetrics, LiveJob, Snapshot
from orchestrator.controller.registry import JobRecord, Registry
from orchestrator.controller.retry import GiveUp, Resubmit, RetryPolicy
from orchestrator.controller.state import ACTIVE, TERMINAL, Event, Transition, decide
from orchestrator.jobsapi import cluster
from orchestrator.jobsapi.cluster import ClusterError, ClusterJob, ClusterUnreachable
from orchestrator.jobsapi.credentials import redact, safe_url
from orchestrator.run.files import read_summary

log = logging.getLogger("mmpt.controller")

Listing = dict[str, ClusterJob]
_FINAL_KEYS = ("steps", "final_losses", "eval", "throughput", "wall_time_s", "checkpoint")
Callback = Callable[[Transition, JobRecord], None]
ResubmitCallback = Callable[[Resubmit, JobRecord], None]


class Clusters:
    """Jobs API clients by address, made on first use and dropped after an error."""

    def __init__(self, connect: Callable[[str], Any] | None = None) -> None:
        self._connect = connect or (lambda address: cluster.connect(address))
        self._clients: dict[str, Any] = {}

    def client(self, address: str) -> Any:
        if address not in self._clients:
            self._clients[address] = self._connect(address)
        return self._clients[address]

    def listing(self, address: str) -> Listing:
        try:
            return cluster.list_jobs(self.client(address), address)
        except ClusterError:
            self._clients.pop(address, None)
            raise

    def submit(self, address: str, **job: Any) -> str:
        try:
            return cluster.submit_job(self.client(address), address, **job)
        except ClusterError:
            self._clients.pop(address, None)
            raise


def observe(ray_id: str, listing: Listing) -> Event:
    cj = listing.get(ray_id)
    if cj is None:
        return state.Vanished()
    cause = retry.classify(cj)
    if cause is not None:
        return state.Died(cause, (cj.message.strip().splitlines() or [""])[0])
    return state.Observed(cj.status, cj.message)


def sync(registry: Registry, jobs: Iterable[JobRecord], listing: Listing, now: float | None = None) -> list[tuple[Transition, JobRecord]]:
    """Apply what `listing` (one cluster's jobs) says about `jobs`; returns the transitions applied."""
    now = time.time() if now is None else now
    applied: list[tuple[Transition, JobRecord]] = []
    for job in jobs:
        t = decide(job.id, job.state, observe(job.ray_id, listing))
        if t is None:
            continue
        cj = listing.get(job.ray_id)
        ended = (cj.end_time or now) if t.new in TERMINAL and cj else (now if t.new == "LOST" else None)
        if registry.apply(t, at=now, started_at=cj.start_time if cj else None, ended_at=ended,
                          message=cj.message if cj else t.reason):
            applied.append((t, registry.get(job.id) or job))
    return applied


def adopt(registry: Registry, address: str, listing: Listing) -> list[str]:
    """Register the mmpt jobs on a cluster that the registry does not know; returns their ids."""
    added = []
    for cj in listing.values():
        rec = JobRecord.from_metadata(cj.id, address, dict(cj.metadata), cj.entrypoint)
        if rec is not None and registry.get(rec.id) is None and registry.add(rec):
            added.append(rec.id)
    return added


def refresh(registry: Registry, jobs: Iterable[JobRecord], clusters: Clusters,
            adopt_from: Iterable[str] = (), now: float | None = None,
            ) -> tuple[list[tuple[Transition, JobRecord]], dict[str, str]]:
    """One pass over the clusters of `jobs` (+ `adopt_from`); returns (transitions, {address: error})."""
    by_address: dict[str, list[JobRecord]] = {a: [] for a in adopt_from}
    for job in jobs:
        if job.state in ACTIVE or job.state == "LOST":
            by_address.setdefault(job.address, []).append(job)
    applied: list[tuple[Transition, JobRecord]] = []
    failed: dict[str, str] = {}
    for address, group in by_address.items():
        try:
            listing = clusters.listing(address)
        except ClusterError as exc:
            failed[address] = str(exc)
            continue
        if address in adopt_from:
            for job_id in adopt(registry, address, listing):
                log.info("registered %s, found on %s", job_id, address)
                rec = registry.get(job_id)
                if rec is not None:
                    group.append(rec)
        applied += sync(registry, group, listing, now)
    return applied, failed


def finalize(registry: Registry, rec: JobRecord, tail: MetricsTail | None = None) -> bool:
    """Store an ended run's final metrics (summary.json, else its last metrics record); True if stored.

    Whoever sees a run ended first (the controller, or `mmpt jobs status`) applies the transition,
    so this is a check on the record ("ended, no final metrics yet"), not a transition callback.
    """
    if rec.state not in TERMINAL or rec.kind != "run" or not rec.run_dir or rec.final_metrics:
        return False
    options = storage_options(rec.config)
    try:
        summary = read_summary(rec.run_dir, options) or {}
        final = {k: summary[k] for k in _FINAL_KEYS if k in summary}
        if not final:
            tail = tail or MetricsTail(rec.run_dir, options)
            tail.poll()
            m = tail.metrics
            if m.records:
                final = {"steps": m.step, "final_losses": m.losses,
                         "throughput": {"samples_per_s": m.samples_per_s, "tokens_per_s": m.tokens_per_s}}
    except OSError as exc:
        log.warning("%s: cannot read the run directory %s (%s)", rec.id, rec.run_dir, exc)
        return False
    if final:
        registry.set_final_metrics(rec.id, final)
    return bool(final)


class Controller:
    """The long-running reconcile loop behind `mmpt controller`."""

    def __init__(self, registry: Registry, *, metrics: ControllerMetrics | None = None,
                 adopt_from: Iterable[str] = (), retention_s: float = 600.0,
                 clusters: Clusters | None = None, policy: RetryPolicy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self._unreachable_since: dict[str, float] = {}
        self.metrics = metrics or ControllerMetrics()
        self.adopt_from = [cluster.check_address(a) for a in adopt_from]
        self.retention_s = retention_s
        self.clusters = clusters or Clusters()
        self._tails: dict[str, MetricsTail] = {}
        self.callbacks: list[Callback] = [self._log, self._count]
        self.resubmit_callbacks: list[ResubmitCallback] = [self._log_resubmit, self._count_resubmit]
        self._finalized: set[str] = set()  # tried this process; a restart tries again once

    def reconcile_once(self) -> list[Transition]:
        jobs = self.registry.jobs()
        applied, failed = refresh(self.registry, jobs, self.clusters, self.adopt_from, self.clock())
        for address, problem in failed.items():
            log.warning("cluster %s: %s", safe_url(address), problem)
            self.metrics.cluster_errors.labels(cluster=safe_url(address)).inc()
        applied += self._unreachable(jobs, failed)
        applied += self._retry(failed)
        for t, rec in applied:
            self._fire(self.callbacks, t, rec)
        for rec in self.registry.jobs(TERMINAL):
            if rec.id not in self._finalized and not rec.final_metrics:
                self._finalized.add(rec.id)
                finalize(self.registry, rec, self._tails.get(rec.id))
        self.metrics.reconciles.inc()
        self._publish()
        return [t for t, _ in applied]

    def _fire(self, callbacks: Iterable[Callable[[Any, JobRecord], None]], event: Any, rec: JobRecord) -> None:
        for callback in callbacks:
            try:
                callback(event, rec)
            except Exception:  # a failing side effect must not stop reconciliation
                log.exception("callback %s failed for %s", getattr(callback, "__name__", callback), event)

    def _unreachable(self, jobs: list[JobRecord], failed: dict[str, str]) -> list[tuple[Transition, JobRecord]]:
        """Active jobs of clusters silent for longer than the grace period become LOST."""
        now = self.clock()
        for address in list(self._unreachable_since):
            if address not in failed:
                del self._unreachable_since[address]
        applied = []
        for address in failed:
            silent = now - self._unreachable_since.setdefault(address, now)
            if silent < self.policy.unreachable_grace_s:
                continue
            for job in jobs:
                t = decide(job.id, job.state, state.Unreachable(silent)) if job.address == address else None
                if t is not None and self.registry.apply(t, at=now, ended_at=now, message=t.reason):
                    applied.append((t, self.registry.get(job.id) or job))
        return applied

    def _retry(self, failed: dict[str, str]) -> list[tuple[Transition, JobRecord]]:
        """Resubmit or give up on the LOST runs whose backoff is over (retry.py decides)."""
        applied = []
        for rec in self.registry.jobs(["LOST"]):
            decision = retry.decide(rec, self.policy, self.clock())
            if isinstance(decision, Resubmit) and rec.address not in failed:
                problem = self._resubmit(rec, decision)
                decision = GiveUp(f"cannot resubmit attempt {decision.attempt}: {problem}") if problem else None
            if isinstance(decision, GiveUp):
                t = Transition(rec.id, "LOST", "FAILED", decision.message)
                now = self.clock()
                if self.registry.apply(t, at=now, ended_at=now, message=decision.message):
                    applied.append((t, self.registry.get(rec.id) or rec))
        return applied

    def _resubmit(self, rec: JobRecord, d: Resubmit) -> str | None:
        """Send attempt `d` of `rec` and record it; a one-line problem when the cluster refuses it (the
        run cannot be sent: give up), None when sent or when the cluster is down (try again next pass)."""
        metadata = rec.metadata() | {"mmpt.job_id": rec.id, "mmpt.attempt": str(d.attempt)}
        try:
            self.clusters.submit(rec.address, entrypoint=rec.entrypoint, submission_id=d.ray_job_id,
                                 runtime_env=rec.runtime_env, metadata=metadata)
        except ClusterUnreachable as exc:
            log.warning("%s: attempt %d not sent yet: %s", rec.id, d.attempt, exc)
            return None
        except ClusterError as exc:
            if "already exists" not in str(exc):  # sent by an earlier pass or another controller
                return str(exc)
        except (ValueError, OSError) as exc:  # Ray packing the working dir: missing, too large
            return redact(f"working dir {rec.runtime_env.get('working_dir')}: {str(exc).splitlines()[0]}")
        if self.registry.resubmitted(rec.id, rec.attempt, d.attempt, d.ray_job_id, d.reason, at=self.clock()):
            self._fire(self.resubmit_callbacks, d, self.registry.get(rec.id) or rec)
            return None
        now = self.registry.get(rec.id)
        if now is not None and now.state in TERMINAL:  # stopped (`mmpt jobs stop`) while this was sent
            log.warning("%s: %s while attempt %d was sent; stopping %s", rec.id, now.state, d.attempt, d.ray_job_id)
            try:
                with cluster.errors(rec.address):
                    self.clusters.client(rec.address).stop_job(d.ray_job_id)
            except ClusterError as exc:
                log.warning("%s: cannot stop %s: %s", rec.id, d.ray_job_id, exc)
        return None

    def run(self, stop: threading.Event, interval_s: float) -> None:
        while not stop.is_set():
            try:
                self.reconcile_once()
            except Exception:  # keep serving; the next pass retries
                log.exception("reconcile pass failed")
            stop.wait(interval_s)

    # -- callbacks -----------------------------------------------------------------------------

    def _log(self, t: Transition, rec: JobRecord) -> None:
        log.info("%s (%s): %s -> %s (%s)", t.job_id, rec.name, t.old, t.new, t.reason)

    def _count(self, t: Transition, rec: JobRecord) -> None:
        self.metrics.transitions.labels(from_state=t.old, to_state=t.new).inc()

    def _log_resubmit(self, d: Resubmit, rec: JobRecord) -> None:
        log.info("%s (%s): resubmitted as %s, attempt %d of %d (%s)", rec.id, rec.name, d.ray_job_id, d.attempt,
                 self.policy.max_attempts, d.reason)

    def _count_resubmit(self, d: Resubmit, rec: JobRecord) -> None:
        self.metrics.resubmissions.labels(reason=d.reason).inc()

    # -- metrics -------------------------------------------------------------------------------

    def _tail(self, rec: JobRecord) -> MetricsTail:
        if rec.id not in self._tails:
            self._tails[rec.id] = MetricsTail(rec.run_dir, storage_options(rec.config))
        return self._tails[rec.id]

    def _live(self, rec: JobRecord, now: float) -> bool:
        if rec.kind != "run" or not rec.run_dir:
            return False
        if rec.state == "RUNNING":
            return True
        return rec.state != "PENDING" and rec.ended_at is not None and now - rec.ended_at <= self.retention_s

    def _publish(self) -> None:
        now = time.time()
        live: list[LiveJob] = []
        for rec in self.registry.jobs():
            if not self._live(rec, now):
                self._tails.pop(rec.id, None)
                continue
            tail = self._tail(rec)
            try:
                tail.poll()
            except OSError as exc:  # storage unreachable: keep the last values, say why once per pass
                log.warning("%s: cannot read %s (%s)", rec.id, tail.uri, exc)
            live.append(LiveJob(rec.id, rec.name, rec.kind, rec.state, rec.started_at, rec.ended_at, tail.metrics))
        self.metrics.publish(Snapshot(counts=self.registry.counts(), jobs=tuple(live)))


def find_job(registry: Any, job_id: str, address: str | None) -> Any:
    """The job's registry record (`mmpt jobs status|logs|stop`); one found only on the cluster at `address` is registered first."""
    from orchestrator.config import ConfigError
    from orchestrator.controller.registry import check_job_id

    check_job_id(job_id)
    rec = registry.get(job_id)
    if rec is not None:
        return rec
    if not address:
        raise ConfigError([f"job {job_id!r}: not in the registry {registry.display_url}; pass --address to look "
                           "it up on a cluster"])
    address = cluster.check_address(address)
    listing = Clusters().listing(address)
    if job_id in listing:
        adopt(registry, address, {job_id: listing[job_id]})
        rec = registry.get(job_id)
        if rec is not None:
            return rec
        raise ConfigError([f"job {job_id!r}: on {address} but not sent by `mmpt submit`; use `ray job status`"])
    raise ConfigError([f"job {job_id!r}: not in the registry {registry.display_url} and not on the cluster at {address}"])
