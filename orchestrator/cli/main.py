"""The `mmpt` command line.

A user's mistake (bad config, missing shards) is one line per problem on stderr and exit code 2;
tracebacks are for bugs only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli import jobs as jobs_commands
from orchestrator.cli.console import SetOpt, console, err_console, fail
from orchestrator.cli.data import data_app
from orchestrator.cli.launcher import cluster_app
from orchestrator.config import ConfigError, load_config
from orchestrator.run.memory_plan import plan_cmd

app = typer.Typer(help="mmpt: multimodal pretraining on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.add_typer(data_app, name="data")
# -- sub-command groups: each lives in its own module and is registered here with one line --
app.add_typer(__import__("orchestrator.cli.models", fromlist=["models_app"]).models_app, name="models")
app.add_typer(jobs_commands.jobs_app, name="jobs")
app.add_typer(cluster_app, name="cluster")
app.command("submit")(jobs_commands.submit)
app.command("controller")(jobs_commands.controller)
app.command("plan")(plan_cmd)
app.command("doctor")(__import__("orchestrator.doctor", fromlist=["doctor_cmd"]).doctor_cmd)
app.command("sweep")(__import__("orchestrator.sweep.driver", fromlist=["sweep_cmd"]).sweep_cmd)
app.command("report")(__import__("orchestrator.report.sweep_report", fromlist=["report_cmd"]).report_cmd)
app.command("export")(__import__("orchestrator.trained.export", fromlist=["export_cmd"]).export_cmd)
app.command("generate")(__import__("orchestrator.trained.generate", fromlist=["generate_cmd"]).generate_cmd)
app.command("finetune")(__import__("orchestrator.run.finetune", fromlist=["finetune_cmd"]).finetune_cmd)



@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="run config YAML (e.g. jobs/configs/quickstart.yaml)")],
    set_: SetOpt = None,
    address: Annotated[str | None, typer.Option(help="join this Ray cluster instead of starting one")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="delete runs/<name>/ first instead of resuming it")] = False,
) -> None:
    """Run one pretraining job: Ray Data -> Ray Train + DeepSpeed, progress, summary.

    Re-running a config resumes runs/<name>/ from its latest checkpoint.
    """
    from orchestrator.run.runner import RunFailed
    from orchestrator.run.runner import run as run_job

    try:
        cfg = load_config(config, set_ or [])
        run_job(cfg, address=address, console=console, fresh=fresh)
    except ConfigError as exc:
        fail(exc.problems)
    except RunFailed as exc:
        fail([str(exc)], code=1)
    except KeyboardInterrupt:  # Ray is shut down by now (runner's finally); checkpoints committed so far stay
        sys.stderr.write("interrupted: run the same command again to resume from the last checkpoint\n")
        sys.stderr.flush()
        raise typer.Exit(130) from None


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
