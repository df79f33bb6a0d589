"""`mmpt cluster up|down|status|dashboard`: the exact `ray` command, run from the cluster file's
folder, with the user's mistakes as one `error:` line and exit code 2."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import orchestrator.cli.launcher as cluster
from orchestrator.cli.main import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ray_cluster.yaml with a real image name, in its own folder, and a HOME holding a token."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text("t" * 32)
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    cfg["docker"]["image"] = "123456789012.dkr.ecr.us-west-2.amazonaws.com/mmpt:0.1.0"
    path = tmp_path / "repo" / "ray_cluster.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def fake_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `ray` that records its folder and arguments, and exits 3."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "ray"
    script.write_text(f'#!/bin/sh\necho "$PWD $*" >> {calls}\nexit 3\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(cluster, "_ray_cli", lambda: str(script))
    return calls


def _mmpt(*args: str):  # noqa: ANN202 - click's Result
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(("args", "ray_args"), [
    (["up", "--yes"], ["up", "--yes", "{f}"]),
    (["up", "--no-restart"], ["up", "--no-restart", "{f}"]),
    (["down", "-y"], ["down", "--yes", "{f}"]),
    (["status"], ["exec", "{f}", "ray status"]),
    (["dashboard", "--port", "9265"], ["dashboard", "--port", "9265", "{f}"]),
])
def test_dry_run_prints_the_exact_ray_command(cluster_file: Path, args: list[str], ray_args: list[str]) -> None:
    res = _mmpt("cluster", *args, "--config", str(cluster_file), "--dry-run")
    assert res.exit_code == 0, res.output
    line = res.stdout.strip()
    where, _, command = line.partition(" && ")
    assert where == f"cd {cluster_file.parent}"  # ray_cluster.yaml's `.` mount is the folder it lives in
    argv = shlex.split(command)
    assert Path(argv[0]).name == "ray"
    assert argv[1:] == [a.format(f=cluster_file) for a in ray_args]


def test_commands_run_ray_in_the_cluster_folder_and_pass_its_exit_code(cluster_file: Path, fake_ray: Path) -> None:
    for args in (["up", "-y"], ["down", "-y"], ["status"]):
        res = _mmpt("cluster", *args, "--config", str(cluster_file))
        assert res.exit_code == 3, res.output
    assert fake_ray.read_text().splitlines() == [
        f"{cluster_file.parent} up --yes {cluster_file}",
        f"{cluster_file.parent} down --yes {cluster_file}",
        f"{cluster_file.parent} exec {cluster_file} ray status",
    ]


def test_missing_cluster_file_is_one_line(tmp_path: Path) -> None:
    res = _mmpt("cluster", "down", "--config", str(tmp_path / "nope.yaml"), "--dry-run")
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"error: --config {tmp_path / 'nope.yaml'}: file not found "
                                  "(run from the mmpt repository or pass --config PATH)")


def test_up_refuses_the_placeholder_image(cluster_file: Path, fake_ray: Path) -> None:
    cfg = yaml.safe_load(cluster_file.read_text())
    cfg["docker"]["image"] = "ghcr.io/your-org/mmpt:0.1.0"
    cluster_file.write_text(yaml.safe_dump(cfg))
    res = _mmpt("cluster", "up", "-y", "--config", str(cluster_file))
    assert res.exit_code == 2 and not fake_ray.exists()
    assert res.stderr.strip() == ("error: docker.image = 'ghcr.io/your-org/mmpt:0.1.0' in ray_cluster.yaml: the "
                                  "placeholder; build infra/docker/Dockerfile, push it where the nodes can pull it "
                                  "and set its name")


def test_up_without_the_auth_token_says_how_to_make_one(cluster_file: Path, fake_ray: Path, tmp_path: Path) -> None:
    (tmp_path / "home" / ".ray" / "auth_token").unlink()
    res = _mmpt("cluster", "up", "-y", "--config", str(cluster_file))
    assert res.exit_code == 2 and not fake_ray.exists()
    assert res.stderr.strip() == (f"error: file_mounts.~/.ray/auth_token = '~/.ray/auth_token' in ray_cluster.yaml: "
                                  f"{tmp_path}/home/.ray/auth_token does not exist; create it with: "
                                  "ray get-auth-token --generate")


def test_the_shipped_cluster_file_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    res = _mmpt("cluster", "up", "--dry-run")
    assert res.exit_code == 0, res.output
    assert shlex.split(res.stdout)[1:] == ["up", str(ROOT / "ray_cluster.yaml")]
