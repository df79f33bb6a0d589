"""`mmpt submit`, `mmpt jobs list|status|logs|stop`, `mmpt controller`: jobs on Ray clusters.

Every command works against the registry (`--db`, default sqlite:///.mmpt/jobs.db, or $MMPT_DB)
and the cluster each job was sent to. A user's mistake (bad config, unreachable address, rejected
token, malformed or unknown job id) is one `error:` line per problem and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.cli.console import SetOpt, fail
from orchestrator.config import ConfigError

jobs_app = typer.Typer(help="Jobs sent with `mmpt submit`: list, status, logs, stop.", no_args_is_help=True)

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

DbOpt = Annotated[str, typer.Option("--db", envvar="MMPT_DB",
                                    help="registry: sqlite:///PATH or postgresql://USER@HOST/DB")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"],
    help="Ray dashboard URL, e.g. http://127.0.0.1:8265")]
JobIdArg = Annotated[str, typer.Argument(help="submission id (from `mmpt submit` or `mmpt jobs list`)")]
_DEFAULT_DB = "sqlite:///.mmpt/jobs.db"
_END = ("SUCCEEDED", "FAILED", "STOPPED", "LOST")


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """User-fixable problems -> `error:` lines on stderr, exit code 2."""
    from orchestrator.controller.registry import RegistryError
    from orchestrator.jobsapi.cluster import ClusterError
    from orchestrator.jobsapi.submit import SubmitError

    try:
        yield
    except ConfigError as exc:
        fail(exc.problems)
    except (ClusterError, RegistryError, SubmitError) as exc:
        fail([str(exc)])


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def submit(
    config: Annotated[Path, typer.Argument(help="run config YAML (or, with --sweep, a sweep file)")],
    address: AddressOpt = None,
    set_: SetOpt = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="CONFIG is a sweep file: the job runs `mmpt sweep`")] = False,
    working_dir: Annotated[Path | None, typer.Option("--working-dir", help="folder uploaded as the job's code "
                                                     "(default: the current one)")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="NAME=VALUE for the job (no credentials)")] = None,
    job_id: Annotated[str | None, typer.Option("--id", help="submission id (default: NAME-TIME-XXXX)")] = None,
    db: DbOpt = _DEFAULT_DB,
) -> None:
    """Send a run (or a sweep) to a Ray cluster as a Ray job and register it; prints its id."""
    from orchestrator.controller.registry import Registry, check_job_id
    from orchestrator.jobsapi import cluster
    from orchestrator.jobsapi.submit import check_no_credentials, prepare_run, prepare_sweep
    from orchestrator.jobsapi.submit import submit as send

    with _user_errors():
        if job_id is not None:
            check_job_id(job_id)
        prepare = prepare_sweep if sweep else prepare_run
        prepared = prepare(config, set_ or [], address=cluster.check_address(address), working_dir=working_dir,
                           env=env or [], job_id=job_id)
        check_no_credentials(prepared)
        auth = cluster.resolve_auth()
        warning = cluster.insecure_warning(prepared.record.address, auth)
        if warning:
            _err.print(f"[yellow]warning:[/yellow] {warning}")
        with Registry(db) as registry:
            submitted = send(prepared, cluster.connect(prepared.record.address, auth), registry)
    rec = prepared.record
    _err.print(f"submitted {rec.kind} {rec.name!r} to {rec.address} as {submitted}; "
               f"follow it: mmpt jobs logs {submitted} --follow")
    _out.print(submitted)


def _refresh(registry: Any, jobs: list[Any], adopt_from: Sequence[str] = ()) -> None:
    from orchestrator.controller.reconcile import Clusters, refresh

    _, failed = refresh(registry, jobs, Clusters(), adopt_from)
    for address, problem in failed.items():
        _err.print(f"[yellow]warning:[/yellow] {problem} (states from {address} may be stale)")


def _show(rec: Any, attempts: Sequence[dict[str, Any]] = ()) -> None:
    _out.print(f"{rec.id} {rec.state}")
    _out.print(f"  {rec.kind} {rec.name!r} (config {rec.config_hash or '-'}) on {rec.address}, submitted "
               f"{_when(rec.submitted_at)} by {rec.submitter or '-'}")
    if rec.started_at or rec.ended_at:
        _out.print(f"  started {_when(rec.started_at)}, ended {_when(rec.ended_at)}")
    if rec.run_dir:
        _out.print(f"  run dir: {rec.run_dir}")
    if rec.message:
        _out.print(f"  message: {rec.message.splitlines()[0]}")
    if len(attempts) > 1 or rec.attempt > 1:
        _out.print(f"  attempts: {rec.attempt} (Ray job {rec.ray_id})")
        for a in attempts:
            _out.print(f"    {a['attempt']}. {_when(a['at'])} {a['ray_job_id']}: {a['reason']}")
    for term, value in sorted((rec.final_metrics.get("final_losses") or {}).items()):
        _out.print(f"  final loss/{term}: {value:.4g}")


@jobs_app.command("list")
def list_(
    db: DbOpt = _DEFAULT_DB,
    address: AddressOpt = None,
    state: Annotated[list[str] | None, typer.Option("--state", help="only these states (repeatable)")] = None,
    refresh: Annotated[bool, typer.Option("--refresh/--no-refresh", help="ask the clusters first")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array on stdout")] = False,
) -> None:
    """Jobs in the registry, states refreshed from their clusters (+ mmpt jobs found at --address)."""
    from orchestrator.controller.registry import Registry
    from orchestrator.controller.state import STATES
    from orchestrator.jobsapi import cluster

    with _user_errors(), Registry(db) as registry:
        bad = [s for s in state or [] if s not in STATES]
        if bad:
            raise ConfigError([f"--state {bad[0]!r}: allowed {', '.join(STATES)}"])
        if refresh:
            _refresh(registry, registry.jobs(), [cluster.check_address(address)] if address else [])
        jobs = registry.jobs(state or None)  # type: ignore[arg-type]
    if as_json:
        _out.print(json.dumps([j.to_json(with_config=False) for j in jobs], default=float))
        return
    table = Table("id", "name", "kind", "state", "attempt", "submitted (UTC)", "cluster", box=None)
    for j in jobs:
        table.add_row(j.id, j.name, j.kind, j.state, str(j.attempt), _when(j.submitted_at), j.address)
    _out.print(table if jobs else "no jobs")


@jobs_app.command("status")
def status(
    job_id: JobIdArg,
    db: DbOpt = _DEFAULT_DB,
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="block until the job ends; exit 0 only if it SUCCEEDED")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds --wait waits at most")] = 3600.0,
    as_json: Annotated[bool, typer.Option("--json", help="the record as JSON on stdout")] = False,
) -> None:
    """A job's state (asked from its cluster), times, run dir and final losses."""
    from orchestrator.controller.reconcile import finalize, find_job
    from orchestrator.controller.registry import Registry

    with _user_errors(), Registry(db) as registry:
        rec = find_job(registry, job_id, address)
        _refresh(registry, [rec])
        rec = registry.get(job_id)
        deadline = time.monotonic() + timeout
        while wait and rec.state not in _END and time.monotonic() < deadline:
            time.sleep(2.0)
            _refresh(registry, [rec])
            new = registry.get(job_id)
            if new.state != rec.state:
                _err.print(f"{job_id}: {rec.state} -> {new.state}")
            rec = new
        if finalize(registry, rec):
            rec = registry.get(job_id)
        transitions, attempts = registry.transitions(job_id), registry.attempts(job_id)
    if as_json:
        _out.print(json.dumps(rec.to_json() | {"transitions": transitions, "attempts": attempts}, default=float))
    else:
        _show(rec, attempts)
    if wait and rec.state != "SUCCEEDED":
        if rec.state not in _END:
            _err.print(f"{job_id}: still {rec.state} after {timeout:.0f} s")
        raise typer.Exit(1)


@jobs_app.command("logs")
def logs(
    job_id: JobIdArg,
    db: DbOpt = _DEFAULT_DB,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until the job ends")] = False,
) -> None:
    """The job's driver output (credential values redacted)."""
    import asyncio

    from orchestrator.controller.reconcile import find_job
    from orchestrator.controller.registry import Registry
    from orchestrator.jobsapi import cluster
    from orchestrator.jobsapi.credentials import redact

    with _user_errors():
        with Registry(db) as registry:
            rec = find_job(registry, job_id, address)
        client = cluster.connect(rec.address)
        ray_id = rec.ray_id  # the current attempt's Ray job
        with cluster.errors(rec.address):
            if not follow or client.get_job_status(ray_id).is_terminal():
                sys.stdout.write(redact(client.get_job_logs(ray_id)))
                return
            shown = asyncio.run(cluster.follow_logs(client, ray_id, redact))
            rest = client.get_job_logs(ray_id)  # whatever the stream had not delivered when the job ended
            if rest.startswith(shown):
                sys.stdout.write(redact(rest[len(shown):]))


@jobs_app.command("stop")
def stop(job_id: JobIdArg, db: DbOpt = _DEFAULT_DB, address: AddressOpt = None) -> None:
    """Ask the cluster to stop a job (it becomes STOPPED); a LOST one is stopped in the registry, so no
    controller resubmits it."""
    from orchestrator.controller.reconcile import find_job
    from orchestrator.controller.registry import Registry
    from orchestrator.controller.state import Transition
    from orchestrator.jobsapi import cluster

    with _user_errors(), Registry(db) as registry:
        rec = find_job(registry, job_id, address)
        if rec.state == "LOST":
            reason = "stopped on request while lost: not resubmitted"
            registry.apply(Transition(job_id, "LOST", "STOPPED", reason), ended_at=time.time(), message=reason)
            rec = registry.get(job_id)
            _out.print(f"{job_id} {rec.state}" + (" (was lost: it will not be resubmitted)" if rec.state == "STOPPED" else ""))
            return
        client = cluster.connect(rec.address)
        with cluster.errors(rec.address):
            stopping = client.stop_job(rec.ray_id)
        deadline = time.monotonic() + 30.0
        while True:  # a stop takes effect within seconds; show the state it reached
            _refresh(registry, [rec])
            rec = registry.get(job_id)
            if not stopping or rec.state in _END or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    _out.print(f"{job_id} {rec.state}" + ("" if stopping else " (had already ended)"))


def controller(
    db: DbOpt = _DEFAULT_DB,
    port: Annotated[int, typer.Option("--port", help="HTTP port for /metrics and /jobs (0: any free one)")] = 9400,
    host: Annotated[str, typer.Option("--host", help="bind address; keep 127.0.0.1 unless a proxy guards it")] = "127.0.0.1",
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="seconds between reconcile passes")] = 10.0,
    address: Annotated[list[str] | None, typer.Option("--address", help="also register mmpt jobs found on this "
                                                      "cluster (repeatable)")] = None,
    retention: Annotated[float, typer.Option("--retention", help="seconds a finished job's series stay on "
                                             "/metrics")] = 600.0,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Ray jobs per run at most, the first included, "
                                              "when its driver or cluster is lost (1: never resubmit)")] = 3,
    backoff: Annotated[float, typer.Option("--backoff", help="seconds before the first resubmission; doubles "
                                           "(--backoff-factor) with each attempt")] = 30.0,
    backoff_factor: Annotated[float, typer.Option("--backoff-factor", help="backoff growth per attempt")] = 2.0,
    backoff_cap: Annotated[float, typer.Option("--backoff-cap", help="seconds between attempts at most")] = 600.0,
    unreachable_grace: Annotated[float, typer.Option("--unreachable-grace", help="seconds a cluster may not answer "
                                                     "before its jobs count as lost")] = 120.0,
    give_up_after: Annotated[float, typer.Option("--give-up-after", help="seconds a lost run waits for its "
                                                 "cluster before it is FAILED")] = 3600.0,
) -> None:
    """Keep the job registry in sync with the clusters and export Prometheus metrics (until Ctrl-C / SIGTERM)."""
    import logging
    import signal
    import threading

    from orchestrator.controller.reconcile import Controller
    from orchestrator.controller.registry import Registry
    from orchestrator.controller.retry import RetryConfigError, RetryPolicy
    from orchestrator.controller.server import start_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        policy = RetryPolicy(max_attempts=max_attempts, backoff_s=backoff, backoff_factor=backoff_factor,
                             backoff_cap_s=backoff_cap, unreachable_grace_s=unreachable_grace,
                             give_up_after_s=give_up_after)
    except RetryConfigError as exc:
        fail(str(exc).split("; "))
    with _user_errors():
        registry = Registry(db)
        # the API reads through its own connection: a commit of the reconcile loop (an fsync that a
        # busy disk stretches to seconds) never holds /jobs behind the writer's lock
        api_registry = Registry(db)
        ctl = Controller(registry, adopt_from=address or [], retention_s=retention, policy=policy)
    try:
        server = start_server(api_registry, ctl.metrics, host, port)
    except OSError as exc:
        fail([f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})"])
    stop_event = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_event.set())
    bound_host, bound_port = server.server_address[:2]
    print(f"controller: http://{bound_host}:{bound_port}/metrics and /jobs; registry {registry.display_url}; "
          f"{len(registry.jobs())} jobs; reconciling every {interval:g} s; lost runs resubmitted up to "
          f"{policy.max_attempts} attempts, backoff {policy.backoff_s:g} s x{policy.backoff_factor:g} "
          f"(cap {policy.backoff_cap_s:g} s)", flush=True)
    try:
        ctl.run(stop_event, interval)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        api_registry.close()
        registry.close()
