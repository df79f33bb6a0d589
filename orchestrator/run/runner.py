"""`mmpt run`: one pretraining run on a Ray cluster (a local one by default).

The driver checks everything a user can get wrong before any Ray process starts (config, shards,
tokenizer), writes the resolved config into `runs/<name>/`, then hands the job to Ray Train and
turns the workers' reports into progress lines, `metrics.jsonl` and `summary.json`.

Reports travel worker -> Ray Train controller -> `_ReportForwarder` (a Ray Train callback, in the
controller) -> the run's hub actor (orchestrator/run/hub.py) -> this process, which is the only writer of the run's metric files.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from jobs import storage
from jobs.config import RunConfig
from models import metric_keys as mk
from orchestrator.config import ConfigError, dump_yaml
from orchestrator.report.expert_load import load_table, moe_summary, save_heatmap
from orchestrator.run.data_plan import DataPlan, plan_data
from orchestrator.run.failures import append_event, failure_cause
from orchestrator.run.files import CONFIG, MOE_HEATMAP, RAY_LOG, SUMMARY, RunFiles
from orchestrator.run.progress import ProgressView, capture_output, summary_tables
from orchestrator.run.ray_local import ray_instance
from orchestrator.run.scaling import report_poll_s

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """Training stopped with an error; the full traceback is in the run's log."""

    def __init__(self, cause: str, log_file: Path) -> None:
        self.cause, self.log_file = cause, log_file
        super().__init__(f"training failed: {cause} (full traceback: {log_file})")

    def __reduce__(self) -> tuple[type[RunFailed], tuple[str, Path]]:
        # a sweep's trial raises it in a Tune actor; Tune pickles it back to the driver
        return RunFailed, (self.cause, self.log_file)


def _root_cause(exc: BaseException) -> str:
    """The last line of the innermost traceback: what a user acts on, without Ray's wrapping."""
    import traceback

    text = "".join(traceback.format_exception(exc))
    print(text, file=sys.stderr)  # into the run's log (fd 2 is captured while training)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not set(ln.strip()) <= set("^~ ")]
    return lines[-1] if lines else type(exc).__name__


@dataclass
class RunResult:
    run_dir: str
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _make_forwarder(hub: Any) -> Any:
    from ray.train import UserCallback

    class _ReportForwarder(UserCallback):
        """Runs in the Ray Train controller: forwards rank 0's report to the driver's inbox (RunHub)."""

        def __init__(self, hub: Any) -> None:
            self.hub = hub

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            record = dict(metrics[0])
            if checkpoint is not None:
                record["checkpoint"] = checkpoint.path
            self.hub.put.remote(record)

    return _ReportForwarder(hub)


def pipeline_spec(cfg: RunConfig, plan: DataPlan, files: RunFiles) -> Any:
    """What every worker's Ray Data tasks need to turn this run's shards into batches."""
    from jobs.data.pipeline import PipelineSpec

    return PipelineSpec(tokenizer_uri=plan.tokenizer, image_size=cfg.data.image_size,
                        max_text_len=cfg.data.max_text_len, max_objects=cfg.data.max_objects,
                        storage=files.opts, image_column=cfg.data.image_column,
                        caption_column=cfg.data.caption_column, **plan.pipeline)


def _trainer(cfg: RunConfig, plan: DataPlan, files: RunFiles, callback: Any, ledger: Any, own_ray: bool) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.train_loop import WorkerJob, train_func
    from orchestrator.run.scaling import (
        data_cpu_share,
        data_remote_args,
        pin_data_stats_to_driver,
        train_scaling,
    )

    pin_data_stats_to_driver()  # else Ray Data pins it to a GPU node, which then never scales down
    spec = pipeline_spec(cfg, plan, files)
    fs, root = storage.filesystem_for(files.root, files.opts)
    # No `datasets=`: each worker builds its own deterministic Ray Data pipeline (jobs.data.stream),
    # so that its position in the data is exact and checkpointable.
    job = WorkerJob(run=cfg.to_dict(), text=plan.text, pipeline=spec, ledger=ledger, events=callback.hub,
                    train_sources=plan.train,
                    train_weights=plan.weights, eval_shards=plan.eval, run_dir=files.uri,
                    grounded_words=plan.grounded_words,
                    # where the workers' Ray Data tasks run (scaling.data_*: e.g. CPU nodes)
                    data_remote_args=data_remote_args(cfg.scaling),
                    data_cpu_limit=data_cpu_share(cfg.scaling) if own_ray else None)
    if cfg.finetune is not None:
        from jobs.transfer.finetune_loop import finetune_func as train_func  # same job, a task head's loop
    return TorchTrainer(
        train_func,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(**train_scaling(cfg.scaling)),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=root, storage_filesystem=fs, callbacks=[callback],
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )


def _fit_following(cfg: RunConfig, trainer: Any, hub: Any, view_console: Console, files: RunFiles, tracking: Any,
                   records: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, Any]:
    """`trainer.fit()` on a thread while this one shows rank 0's reports and writes metrics.jsonl;
    returns {"result": ...} or {"error": ...}. Ctrl-C lands here, on the main thread."""
    import ray

    from jobs.bounded import in_thread
    from orchestrator.run.scaling import controller_env

    title = f"{cfg.name} · {cfg.model.preset} · {cfg.scaling.num_workers} workers · ZeRO-{cfg.deepspeed.zero_stage}"
    with controller_env(cfg.scaling), ProgressView(view_console, cfg.train.steps, title) as view:
        thread, box = in_thread(trainer.fit, "mmpt-fit")
        first: tuple[float, int] | None = None
        while True:
            alive = thread.is_alive()  # read before draining: nothing is put after the fit ends
            inbox = ray.get(hub.drain.remote())
            if not inbox:
                if not alive:
                    break
                time.sleep(0.25)
            for record in inbox:
                record["time"] = time.time()
                if "event" in record:  # a worker's hang report (jobs/watchdog.py): not a metric
                    events.append(record)
                    append_event(files, record)
                    view_console.print(f"[yellow]{record['message']}[/] (restarting from the latest "
                                       "checkpoint if train.max_failures allows)", soft_wrap=True)
                    continue
                records.append(record)
                files.append_metrics(record)
                tracking.log(record)
                step = int(record.get("step", 0))
                first = first or (record["time"], step)
                rate = (step - first[1]) / max(record["time"] - first[0], 1e-9)
                eta = (cfg.train.steps - step) / rate if rate > 0 else None
                view.update(record, eta)
        thread.join()
    return box


def _show(out: Console, summary: dict[str, Any], run_dir: str) -> None:
    for table in summary_tables(summary):
        out.print(table)
    out.print(f"run directory: {run_dir}", soft_wrap=True, highlight=False)


def run(cfg: RunConfig, *, address: str | None = None, console: Console | None = None,
        fresh: bool = False) -> RunResult:
    """Run `cfg` to completion; raises ConfigError before starting anything for a user mistake.

    A run directory that already holds checkpoints of `cfg.name` is resumed from the latest one
    (Ray Train restores it); one whose summary shows all `train.steps` done is only shown again.
    `fresh=True` deletes the run directory first.
    """
    from orchestrator.run import preflight

    if cfg.finetune is not None:  # the pretrained run's architecture and checkpoint (orchestrator/run/finetune.py)
        from orchestrator.run.finetune import resolve

        cfg = resolve(cfg)
    files = RunFiles(cfg)
    out = console or Console()
    preflight.check_endpoint(cfg)
    report_poll_s(cfg.scaling)  # a bad RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: one line now, not after Ray started
    preflight.check_storage(cfg, files)
    if fresh:
        files.delete()
    done = files.read_json(SUMMARY)
    if done is not None and done.get("steps", 0) >= cfg.train.steps:
        out.print(f"{cfg.name} already finished {done['steps']} steps; showing its summary "
                  "(--fresh to train again, or raise train.steps to continue)", highlight=False)
        _show(out, done, files.uri)
        return RunResult(run_dir=files.uri, summary=done)
    preflight.check_resume(cfg, files)
    from orchestrator.report.run_page import write_for_run
    from orchestrator.tracking import check_clients, open_tracking

    check_clients(cfg)
    plan = plan_data(cfg, files, out)
    preflight.check_data(cfg, plan, files)
    init = _plan_init(cfg, plan, files, out)
    from orchestrator.run.dalle_dvae import resolve_dalle

    cfg = resolve_dalle(cfg, files.uri, files.opts)  # preset dalle: the frozen dVAE's weights and shape
    config_yaml = dump_yaml(cfg)
    try:
        storage.write_text(files.path(CONFIG), config_yaml, files.opts)
    except OSError as exc:
        raise ConfigError([f"storage.path = {cfg.storage.path!r}: cannot write {files.path(CONFIG)} "
                           f"({preflight.storage_error(exc)})"]) from None
    if cfg.finetune is not None:
        from orchestrator.run.finetune import write_init

        write_init(cfg, files.uri, files.opts)
    log_dir = files.local_log_dir()
    started = time.time()
    records: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    with capture_output(log_dir / RAY_LOG) as stream:
        view_console = Console(file=stream, force_terminal=out.is_terminal, width=out.width, quiet=out.quiet)
        # experiment trackers (tracking: section) mirror what this driver writes; workers never see them
        tracking = open_tracking(cfg, files.uri, log_dir.parent, config_yaml, files.opts)
        cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.scaling.data_cpus
        try:
            with ray_instance(address, round(cpus)) as own_ray:
                import ray

                from jobs.data.ledger import DataBudgetExceeded, check_budget
                from orchestrator.run.hub import RunHub

                # One actor: the bad-sample ledger the workers write to and the inbox of rank 0's reports.
                hub = ledger = ray.remote(RunHub).options(num_cpus=0).remote()
                trainer = _trainer(cfg, plan, files, _make_forwarder(hub), ledger, own_ray)
                box = _fit_following(cfg, trainer, hub, view_console, files, tracking, records, events)
                if "error" in box:
                    cause = failure_cause(_root_cause(box["error"]), ledger, cfg, events)
                    raise RunFailed(cause, log_dir / RAY_LOG) from box["error"]
                bad = ray.get(ledger.totals.remote())
                try:  # the workers judge the budget at each report; reads that landed after the last one count too
                    check_budget(bad, cfg.data.max_bad_fraction)
                except DataBudgetExceeded as exc:
                    raise RunFailed(str(exc), log_dir / RAY_LOG) from None
        except BaseException:
            tracking.finish({}, [log_dir / RAY_LOG], failed=True)
            raise
    summary = _summary(cfg, records, box.get("result"), time.time() - started, log_dir)
    summary["data"] = {"bad_samples": bad["by_reason"], "bad_total": bad["bad"], "bad_fraction": bad["fraction"],
                       "samples_checked": bad["samples"], "worst_shards": bad["worst_shards"]}
    if cfg.moe.enabled:
        summary["moe"] = _moe_outputs(records, files, log_dir)
    if init is not None:
        summary["init"] = init.summary()
    if events:
        summary["events"] = events
    files.write_json(SUMMARY, summary)
    tracking.finish(summary, [log_dir.parent / MOE_HEATMAP, write_for_run(files.uri, files.opts, log_dir.parent)])
    _show(out, summary, files.uri)
    if cfg.moe.enabled and (table := load_table(records)) is not None:
        out.print(table)
    return RunResult(run_dir=files.uri, summary=summary, metrics=records)


def _plan_init(cfg: RunConfig, plan: DataPlan, files: RunFiles, out: Console) -> Any:
    """`model.init` checked and planned on the driver (jobs/pretrained/load.py); the workers apply it."""
    from jobs.pretrained.load import InitError, plan_for_run
    from models.config import TextSpec

    try:
        init = plan_for_run(cfg, TextSpec(**plan.text), files.opts)
    except InitError as exc:
        raise ConfigError([str(exc)]) from None
    for line in init.lines() if init is not None else []:
        out.print(line, highlight=False, soft_wrap=True)
    return init


def _moe_outputs(records: list[dict[str, Any]], files: RunFiles, log_dir: Path) -> dict[str, Any]:
    """Per-layer expert-load summary, and the layer x expert load heatmap PNG in the run dir."""
    summary = moe_summary(records)
    local = log_dir.parent / MOE_HEATMAP
    if save_heatmap(records, local) is not None:
        if storage.is_remote(files.uri):
            storage.write_bytes(files.path(MOE_HEATMAP), local.read_bytes(), files.opts)
        summary["heatmap"] = files.path(MOE_HEATMAP)
    return summary


def _summary(cfg: RunConfig, records: list[dict[str, Any]], result: Any, wall_s: float, log_dir: Path) -> dict[str, Any]:
    last = records[-1] if records else {}
    ckpt = getattr(getattr(result, "checkpoint", None), "path", None)
    return {
        "name": cfg.name,
        "config_hash": cfg.config_hash(),
        "steps": int(last.get("step", 0)),
        "wall_time_s": wall_s,
        "final_losses": mk.strip(mk.LOSS, last),
        "train_metrics": mk.strip(mk.TRAIN, last),
        "eval": mk.last_of(mk.EVAL, records),
        "throughput": {k: last.get(k) for k in mk.THROUGHPUT},
        "samples_seen": last.get("samples_seen"),
        "checkpoint": ckpt,
        "logs": str(log_dir),
        # rank 0's model-state bytes (jobs/memory.py), reported once with the first report
        "memory": mk.first_of(mk.MEMORY, records),
    }
