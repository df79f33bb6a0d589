"""`mmpt doctor [CONFIG]`: what this machine (and the config's storage) can run, with a fix per gap.

    torch and its build (CUDA / ROCm / CPU), the GPUs the machine has and whether torch can use them,
    bf16, NCCL, DeepSpeed's accelerator and ops, Ray and the resources it sees (a local Ray, or the
    cluster at --address / RAY_ADDRESS), S3 reachability of the buckets the config names.

Exit code 1 when something the machine or the config needs is missing (a GPU torch cannot use is
a failure, never a silent CPU fallback), else 0. `--json` prints the checks as JSON lines.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from orchestrator.cli.console import SetOpt, console
from orchestrator.doctor.probes import Check, check_deepspeed, check_ray, check_s3, check_torch

_STYLE = {"ok": "[green]ok[/green]", "info": "[dim]info[/dim]", "warn": "[yellow]warn[/yellow]",
          "fail": "[red]FAIL[/red]"}


def config_checks(config: Path, overrides: list[str], machine: list[Check]) -> tuple[list[Check], list[str], str | None]:
    """(checks of the config against the machine, the s3 URIs it names, its endpoint)."""
    from jobs.config import RunConfig
    from orchestrator.config import ConfigError, load_config

    try:
        cfg: RunConfig = load_config(config, overrides)
    except ConfigError as exc:
        return [Check("config", "fail", p) for p in exc.problems], [], None
    out = [Check("config", "ok", f"{config}: {cfg.name}, {cfg.model.preset}, {cfg.scaling.num_workers} workers")]
    gpus = next((c for c in machine if c.name == "GPUs"), None)
    usable = gpus is not None and gpus.status == "ok"
    if cfg.scaling.use_gpu and not usable:
        out.append(Check("scaling.use_gpu", "fail", "true, but no GPU is usable here",
                         (gpus.fix if gpus is not None and gpus.fix else "--set scaling.use_gpu=false")))
    elif not cfg.scaling.use_gpu and usable:
        out.append(Check("scaling.use_gpu", "warn", "false: the GPUs here will not be used",
                         "--set scaling.use_gpu=true"))
    uris = [u for src in cfg.data.sources() for u in ([src.shards] if isinstance(src.shards, str) else src.shards)]
    uris += [u for u in ([cfg.data.eval] if isinstance(cfg.data.eval, str) else cfg.data.eval or [])]
    uris += [cfg.storage.path] + ([cfg.data.tokenizer] if cfg.data.tokenizer else [])
    return out, uris, cfg.storage.endpoint_url


def run_checks(config: Path | None = None, overrides: list[str] | None = None, address: str | None = None,
               ray: bool = True) -> list[Check]:
    checks = check_torch() + check_deepspeed()
    uris: list[str] = []
    endpoint = None
    if config is not None:
        extra, uris, endpoint = config_checks(config, overrides or [], checks)
        checks += extra
    if ray:
        checks += check_ray(address)
    return checks + check_s3(uris, endpoint)


def render(checks: list[Check]) -> Table:
    table = Table(title="mmpt doctor", title_justify="left", show_lines=False)
    for col in ("check", "status", "what it found"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.name, _STYLE[c.status], c.detail + (f"\n[bold]fix:[/bold] {c.fix}" if c.fix else ""))
    return table


def doctor_cmd(
    config: Annotated[Path | None, typer.Argument(help="also check this run config (GPUs, S3 buckets)")] = None,
    set_: SetOpt = None,
    address: Annotated[str | None, typer.Option(help="check this Ray cluster instead of a local Ray")] = None,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="skip starting a local Ray")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per check")] = False,
) -> None:
    """What this machine can run: torch/CUDA, GPUs, NCCL, DeepSpeed, Ray, S3 -- and the fix for each gap."""
    checks = run_checks(config, set_ or [], address, ray=not no_ray)
    if as_json:
        for c in checks:
            typer.echo(json.dumps(asdict(c)))
    else:
        console.print(render(checks))
    failed = [c for c in checks if c.status == "fail"]
    if failed and not as_json:
        console.print(f"[red]{len(failed)} problem(s)[/red]: " + "; ".join(c.name for c in failed), highlight=False)
    raise typer.Exit(1 if failed else 0)
