"""The `mmpt` command line.

A user's mistake (bad config, missing shards) is one line per problem on stderr and exit code 2;
tracebacks are for bugs only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from orchestrator import jobs_cli
from orchestrator.cluster import cluster_app
from orchestrator.config import ConfigError, load_config
from orchestrator.plan import plan_cmd

app = typer.Typer(help="mmpt: multimodal pretraining on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Make and inspect image-text shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# -- sub-command groups: each lives in its own module and is registered here with one line --
app.add_typer(jobs_cli.jobs_app, name="jobs")
app.add_typer(cluster_app, name="cluster")
app.command("submit")(jobs_cli.submit)
app.command("controller")(jobs_cli.controller)
app.command("plan")(plan_cmd)

console = Console()
err_console = Console(stderr=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: dotted.key=value (repeatable)")]


def _fail(problems: list[str]) -> None:
    for p in problems:
        err_console.print(f"[red]error:[/red] {p}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


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
    from orchestrator.runner import RunFailed
    from orchestrator.runner import run as run_job

    try:
        cfg = load_config(config, set_ or [])
        run_job(cfg, address=address, console=console, fresh=fresh)
    except ConfigError as exc:
        _fail(exc.problems)
    except RunFailed as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@data_app.command("synth")
def data_synth(
    out: Annotated[str, typer.Option("--out", help="folder or s3://bucket/prefix")],
    samples: Annotated[int, typer.Option(min=1, help="training samples")] = 4000,
    shards: Annotated[int, typer.Option(min=1, help="training shards")] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    image_size: Annotated[int, typer.Option("--image-size", min=16, help="pixels (square)")] = 64,
    eval_samples: Annotated[int | None, typer.Option("--eval-samples", help="held-out samples")] = None,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint")] = None,
) -> None:
    """Write a synthetic 'shapes world' dataset as WebDataset shards + tokenizer.json."""
    from rich.progress import Progress

    from jobs.data.synth import write_synthetic
    from jobs.storage import StorageOptions

    total = samples + (eval_samples if eval_samples is not None else max(64, samples // 10))
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("writing shards", total=total)
        try:
            res = write_synthetic(out, samples=samples, shards=shards, seed=seed, image_size=image_size,
                                  eval_samples=eval_samples, options=StorageOptions(endpoint_url=endpoint_url),
                                  progress=lambda n: progress.update(task, completed=n))
        except (OSError, ValueError) as exc:
            _fail([f"--out {out}: {exc}"])
    console.print(f"wrote {res.train_samples} train samples in {len(res.train_shards)} shards, "
                  f"{res.eval_samples} eval samples, tokenizer {res.tokenizer}", soft_wrap=True, highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
