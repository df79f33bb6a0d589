"""`mmpt sweep`: a sweep file's trials run by Ray Tune, each trial one Ray Train run (`mmpt run`).

    driver (this process)                              Ray cluster
    plan_sweep: every check, before any trial          one Tune trial actor per trial (0 CPUs, this node):
    Tuner(points x seeds, ASHA) ─────────────────────▶   orchestrator.run.runner.run(trial config) ──▶ Ray Train
    ProgressBoard  ◀── Tune callback                     tails runs/<trial>/metrics.jsonl ──tune.report──▶ Tune
    write_report(sweep dir) at the end

The sweep directory `<out>/<name>/` holds `sweep.yaml` (the resolved plan: base config, points,
seeds; what `--resume` and `mmpt report` read), `runs/<trial>/` (normal mmpt run directories:
config.yaml, metrics.jsonl, summary.json, checkpoints), `tune/` (Tune's experiment state, which
`Tuner.restore` continues) and `logs/ray.log` (Ray's and Tune's output).

Ray Train V2 inside Tune (Ray's guide "Hyperparameter Tuning with Ray Tune"): the trial function
is only a driver that launches the Train run, so it asks for no CPU and concurrency is capped with
`max_concurrent_trials` from the resources a trial's workers need. Ray's `TuneReportCallback` would
forward the Train reports to Tune from a trainer we build; ours is built by `runner.run`, which
already turns rank 0's reports into `metrics.jsonl`, so the trial forwards each new line of that
file instead: the same records at the same cadence, the metric files staying the one source.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from orchestrator.cli.console import set_option
from orchestrator.config import ConfigError
from orchestrator.run.files import LOGS, METRICS, RAY_LOG, MetricsFile, read_summary, run_uri
from orchestrator.run.ray_local import ray_instance
from orchestrator.sweep.spec import PLAN_FILE, SweepPlan, load_plan, load_spec, plan_sweep
from orchestrator.tracking.sweep import SweepTracking

SweepSetOpt = set_option("override: dotted.key=value on the base run config, or sweep.key=value on the sweep file")
_DATA_CPUS_PER_TRIAL = 1.0  # room for a trial's Ray Data read tasks beside its training workers


@dataclass
class SweepOutcome:
    sweep_dir: str
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # trial -> last line of its error
    stopped: list[str] = field(default_factory=list)  # stopped early by the scheduler (ASHA)
    unfinished: list[str] = field(default_factory=list)  # interrupted: `--resume` continues them


# -- the trial (runs in a Tune trial actor) ----------------------------------------------------

def _numeric(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _forward_new_lines(path: Path, offset: int, report: Callable[[dict[str, Any]], None]) -> int:
    """Report each complete line of the metrics file `path` after byte `offset` (the run
    directory's one reader, orchestrator/run/files.py); returns the new offset."""
    tail = MetricsFile(str(path.parent), offset=offset)
    for record in tail.poll():
        report(_numeric(record))
    return tail.offset


def _trial(config: dict[str, Any], plan: SweepPlan, cwd: str) -> None:
    """One trial: `runner.run` of the trial's config in a thread, its metric lines to Tune.

    The last step's report reaches Tune only once the run has returned (its summary written): a
    scheduler that stops the trial on that report then stops nothing unfinished. A trial restarted
    by a resumed sweep finds its run directory: `runner.run` resumes it from the latest checkpoint
    (or only shows a finished one), and the lines already there are reported again so that Tune
    and ASHA see the trial's whole history.
    """
    from ray import tune

    from jobs.bounded import in_thread
    from orchestrator.run.runner import run

    if os.path.isdir(cwd):  # Tune starts trials in their Tune folder; data paths are relative to ours
        os.chdir(cwd)
    cfg = plan.trial_config(config["point"], int(config["seed"]))
    metrics = Path(run_uri(plan.sweep_dir, cfg.name), METRICS)
    held: list[dict[str, Any]] = []

    def forward(record: dict[str, Any]) -> None:
        if record.get("step", 0) >= cfg.train.steps and thread.is_alive():
            held.append(record)
        else:
            tune.report(record)

    thread, box = in_thread(lambda: run(cfg, console=Console(quiet=True)), "mmpt-trial")
    offset = 0
    while thread.is_alive():
        offset = _forward_new_lines(metrics, offset, forward)
        time.sleep(0.5)
    _forward_new_lines(metrics, offset, forward)
    for record in held:
        tune.report(record)
    if "error" in box:
        raise box["error"]


def _trial_name(trial: Any) -> str:
    return f"{trial.config['point']}-s{trial.config['seed']}"


# -- the driver ---------------------------------------------------------------------------------

def concurrency(plan: SweepPlan, resources: dict[str, float]) -> int:
    """Trials whose Train runs fit the cluster at once: limited by CPUs (workers' CPUs + room for
    their data tasks) and GPUs; `max_concurrent` in the sweep file overrides it."""
    setting = plan.spec.get("max_concurrent", "auto")
    if isinstance(setting, int):
        return setting
    cfgs = [plan.trial_config(p.id, plan.seeds[0]) for p in plan.points]
    cpus = max(c.scaling.num_workers * c.scaling.cpus_per_worker + _DATA_CPUS_PER_TRIAL for c in cfgs)
    fits = [resources.get("CPU", 0.0) / cpus]
    gpus = max((c.scaling.num_workers for c in cfgs if c.scaling.use_gpu), default=0)
    if gpus:
        fits.append(resources.get("GPU", 0.0) / gpus)
    return max(1, int(min(fits)))


def _scheduler(plan: SweepPlan) -> Any:
    spec = plan.spec.get("scheduler")
    if not spec:
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = max(p.steps for p in plan.points)
    # time_attr `step`, not Tune's training_iteration: a restarted trial re-reports its history, and
    # the train step is what its milestones mean. stop_last_trials=False: a trial that reached the
    # budget is done, there is nothing left to stop.
    return ASHAScheduler(time_attr="step", max_t=max_t, grace_period=spec.get("grace_period") or max(1, max_t // 4),
                         reduction_factor=spec["reduction_factor"], brackets=spec["brackets"], stop_last_trials=False)


def _tuner(plan: SweepPlan, resume: bool, callbacks: Sequence[Any], max_concurrent: int) -> Any:
    import ray
    from ray import tune

    from orchestrator.sweep.board import TuneEvents

    trainable = tune.with_parameters(_trial, plan=plan, cwd=os.getcwd())
    # The trial actor is only the Train run's driver: no CPU, and on this node, whose disk holds
    # the sweep directory.
    node = f"node:{ray.util.get_node_ip_address()}"
    trainable = tune.with_resources(trainable, {"CPU": 0, node: 0.001})
    tune_dir = Path(plan.sweep_dir, "tune")
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        return tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True, restart_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search([p.id for p in plan.points]), "seed": tune.grid_search(plan.seeds)},
        tune_config=tune.TuneConfig(metric=plan.metric, mode=plan.mode, scheduler=_scheduler(plan),
                                    max_concurrent_trials=max_concurrent, trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=tune_dir.name, storage_path=str(tune_dir.parent), verbose=0,
                                  callbacks=[TuneEvents(), *callbacks]),
    )


def _pretrain(plan: SweepPlan, view: Console) -> None:
    """A transfer sweep's pretraining run, before any trial (only shown again once it has finished)."""
    cfg = plan.pretrain_config()
    if cfg is None:
        return
    from orchestrator.run.runner import run

    view.print(f"pretraining {cfg.name} ({cfg.model.preset}, {cfg.train.steps} steps) for the trials to start from",
               highlight=False)
    run(cfg, console=Console(file=view.file, quiet=True))


def _outcome(plan: SweepPlan, status: dict[str, str], errors: dict[str, str]) -> SweepOutcome:
    out = SweepOutcome(sweep_dir=plan.sweep_dir)
    for point_id, seed in plan.trials:
        name = plan.trial_name(point_id, seed)
        summary = read_summary(run_uri(plan.sweep_dir, name))
        if name in errors:
            out.failed[name] = errors[name]
        elif summary is not None and summary.get("steps", 0) >= plan.point(point_id).steps:
            out.finished.append(name)
        elif status.get(name) == "done":  # Tune ended it before its last step: the scheduler's call
            out.stopped.append(name)
        else:
            out.unfinished.append(name)
    return out


def run_sweep(plan: SweepPlan, *, console: Console | None = None, address: str | None = None,
              resume: bool = False, cpus: int | None = None, callbacks: Sequence[Any] = ()) -> SweepOutcome:
    """Run (or with `resume`, continue) the plan's trials; returns which finished, failed or not."""
    import ray

    from orchestrator.run.progress import capture_output
    from orchestrator.sweep.board import ProgressBoard, showing

    out = console or Console()
    sweep_dir = Path(plan.sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (sweep_dir / PLAN_FILE).write_text(plan.to_yaml())
    # Trials report eval/ metrics only at eval steps; ASHA skips reports without its metric, and
    # Tune's strict check would instead fail the trial on the first report without it.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    with capture_output(sweep_dir / LOGS / RAY_LOG) as stream:
        view = Console(file=stream, force_terminal=out.is_terminal, width=out.width, quiet=out.quiet)
        with ray_instance(address, cpus or os.cpu_count() or 1):
            limit = concurrency(plan, ray.cluster_resources())
            view.print(f"sweep {plan.name}: {len(plan.points)} points x {len(plan.seeds)} seeds = "
                       f"{len(plan.trials)} trials, up to {limit} at once · {sweep_dir}", highlight=False)
            for warning in plan.warnings:
                view.print(f"note: {warning}", highlight=False, soft_wrap=True)
            _pretrain(plan, view)
            board = ProgressBoard(plan, view)
            tracked = SweepTracking(plan)  # the trials' group (an MLflow parent run), before any trial
            with showing(board):
                _tuner(plan, resume, callbacks, limit).fit()
    outcome = _outcome(plan, board.status, board.errors)
    if tracked.mlflow_parent is not None:
        _finish_tracking(tracked, outcome)
    return outcome


def _finish_tracking(tracked: Any, outcome: SweepOutcome) -> None:
    from orchestrator.report.sweep_report import best_row, write_report

    report = write_report(tracked.plan.sweep_dir)
    best = best_row(report.rows, tracked.plan.metric, tracked.plan.mode)
    tracked.finish(report.files, best and {"point": best.point, "label": best.label, "metric": tracked.plan.metric,
                                           "value": best.stats[tracked.plan.metric].mean},
                   failed=bool(outcome.failed))


# -- the command ------------------------------------------------------------------------------

def prepare(sweep_file: str | Path, overrides: list[str], fresh: bool = False) -> SweepPlan:
    """Sweep file -> checked plan; ConfigError when anything is wrong or the directory is taken."""
    spec, spec_dir = load_spec(sweep_file, overrides)
    plan = plan_sweep(spec, spec_dir)
    target = Path(plan.sweep_dir)
    if (target / PLAN_FILE).exists():
        if not fresh:
            raise ConfigError([f"out = {spec.out!r}: sweep directory {target} exists; continue it with "
                               f"`mmpt sweep --resume {target}`, or start over with --fresh"])
        shutil.rmtree(target)
    return plan


def sweep_cmd(
    sweep_file: Annotated[Path | None, typer.Argument(help="sweep file (e.g. jobs/configs/sweeps/objectives.yaml)")] = None,
    set_: SweepSetOpt = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue the sweep in this directory")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="delete an existing sweep directory first")] = False,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster instead of starting one")] = None,
    cpus: Annotated[int | None, typer.Option(help="CPUs a local Ray advertises (default: this machine's)")] = None,
) -> None:
    """Run an ablation sweep with Ray Tune, then write its comparison table and HTML report."""
    from orchestrator.cli.console import console, err_console, fail
    from orchestrator.report.sweep_report import show_report

    if (sweep_file is None) == (resume is None):
        fail(["give a sweep file, or --resume SWEEP_DIR (not both)"])
    if resume is not None and set_:
        fail(["--set does not apply to --resume: a sweep continues with the plan it started with"])
    try:
        plan = load_plan(resume) if resume is not None else prepare(sweep_file, set_ or [], fresh)  # type: ignore[arg-type]
    except ConfigError as exc:
        fail(exc.problems)
    outcome = run_sweep(plan, console=console, address=address, resume=resume is not None, cpus=cpus)
    show_report(plan.sweep_dir, console)
    for name, why in outcome.failed.items():
        err_console.print(f"[red]trial {name} failed:[/red] {why}", highlight=False, soft_wrap=True)
    if outcome.stopped:
        console.print(f"stopped early by ASHA: {', '.join(outcome.stopped)}", highlight=False, soft_wrap=True)
    if outcome.unfinished:
        console.print(f"interrupted: {len(outcome.unfinished)} trial(s) unfinished; continue with: "
                      f"mmpt sweep --resume {plan.sweep_dir}", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    if outcome.failed:
        raise typer.Exit(1)
