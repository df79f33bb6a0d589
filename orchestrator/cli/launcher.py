"""`mmpt cluster up | down | status | dashboard`: the Ray cluster launcher on ray_cluster.yaml.

Each command is one `ray` cluster-launcher command, run from the folder of the cluster file (its
file_mounts sync `.` = this repository to the nodes); `--dry-run` prints that command instead:

    up         ray up [--yes] ray_cluster.yaml               start or update the head node
    down       ray down [--yes] ray_cluster.yaml             terminate every node
    status     ray exec ray_cluster.yaml 'ray status'        nodes, resources, pending demands
    dashboard  ray dashboard --port P ray_cluster.yaml       SSH tunnel to the head's 127.0.0.1:8265

The dashboard only listens on the head's loopback, so `dashboard` (an SSH port-forward) is how the
browser and `mmpt submit --address http://127.0.0.1:8265` reach it (README: Security defaults).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from orchestrator.cli.console import fail

cluster_app = typer.Typer(help="The Ray cluster of ray_cluster.yaml: up, down, status, dashboard.",
                          no_args_is_help=True)

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Ray cluster launcher file")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print the ray command instead of running it")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="don't ask for confirmation")]
_DEFAULT = Path("ray_cluster.yaml")
# The image name ray_cluster.yaml ships with: `up` refuses it, nodes could never pull it.
_PLACEHOLDER_IMAGE = "ghcr.io/your-org/"


def _ray_cli() -> str:
    """The `ray` beside this Python (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if found is None:
        fail("the `ray` command is not installed here; pip install 'ray[default]' (the cluster launcher)")
    return str(found)


def _cluster_file(config: Path) -> Path:
    if not config.is_file():
        fail(f"--config {config}: file not found (run from the mmpt repository or pass --config PATH)")
    return config.resolve()


def _load(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        fail(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(data, dict):
        fail(f"--config {path}: expected a Ray cluster launcher mapping, got {type(data).__name__}")
    return data


def _preflight(path: Path) -> None:
    """What `ray up` would fail on late (or never notice): missing mounted files, the placeholder image."""
    cfg = _load(path)
    image = (cfg.get("docker") or {}).get("image", "")
    if image.startswith(_PLACEHOLDER_IMAGE):
        fail(f"docker.image = {image!r} in {path.name}: the placeholder; build infra/docker/Dockerfile, push "
              "it where the nodes can pull it and set its name")
    for remote, local in (cfg.get("file_mounts") or {}).items():
        source = Path(str(local)).expanduser()
        source = source if source.is_absolute() else path.parent / source
        if not source.exists():
            hint = "; create it with: ray get-auth-token --generate" if source.name == "auth_token" else ""
            fail(f"file_mounts.{remote} = {local!r} in {path.name}: {source} does not exist{hint}")


def _run(argv: list[str], cluster_file: Path, dry_run: bool) -> None:
    """Run `ray <argv>` in the cluster file's folder, or print exactly that command."""
    cmd = [_ray_cli(), *argv]
    where = cluster_file.parent
    line = shlex.join(cmd)
    if where != Path.cwd().resolve():
        line = f"cd {shlex.quote(str(where))} && {line}"
    if dry_run:
        _out.print(line)
        return
    _err.print(f"$ {line}")
    raise typer.Exit(subprocess.call(cmd, cwd=where))


@cluster_app.command("up")
def up(config: ConfigOpt = _DEFAULT, yes: YesOpt = False, dry_run: DryRunOpt = False,
       no_restart: Annotated[bool, typer.Option("--no-restart", help="update files/setup without restarting Ray "
                                                "(running jobs keep running)")] = False) -> None:
    """Start the cluster's head node, or update a running cluster to the file (`ray up`)."""
    path = _cluster_file(config)
    if not dry_run:
        _preflight(path)
    _run(["up", *(["--yes"] if yes else []), *(["--no-restart"] if no_restart else []), str(path)],
         path, dry_run)


@cluster_app.command("down")
def down(config: ConfigOpt = _DEFAULT, yes: YesOpt = False, dry_run: DryRunOpt = False) -> None:
    """Terminate every node of the cluster (`ray down`)."""
    path = _cluster_file(config)
    _run(["down", *(["--yes"] if yes else []), str(path)], path, dry_run)


@cluster_app.command("status")
def status(config: ConfigOpt = _DEFAULT, dry_run: DryRunOpt = False) -> None:
    """Nodes by type, resource use and pending demands (`ray status` on the head)."""
    path = _cluster_file(config)
    _run(["exec", str(path), "ray status"], path, dry_run)


@cluster_app.command("dashboard")
def dashboard(config: ConfigOpt = _DEFAULT, dry_run: DryRunOpt = False,
              port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535,
                                                help="local port of the tunnel")] = 8265) -> None:
    """Tunnel the head's dashboard and Jobs API to http://127.0.0.1:PORT over SSH (`ray dashboard`)."""
    path = _cluster_file(config)
    if not dry_run:
        _err.print(f"dashboard and Jobs API: http://127.0.0.1:{port} (Ctrl-C closes the tunnel); submit with "
                   f"RAY_AUTH_MODE=token mmpt submit --address http://127.0.0.1:{port} CONFIG")
    _run(["dashboard", "--port", str(port), str(path)], path, dry_run)
