"""`mmpt submit` / `mmpt jobs` without a cluster: validation, paths, packaging, auth, credentials, errors."""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.config import ConfigError, load_config
from orchestrator.jobsapi import cluster
from orchestrator.jobsapi.cluster import Auth, ClusterError, insecure_warning, resolve_auth
from orchestrator.jobsapi.submit import (
    EXCLUDES,
    SubmitError,
    check_no_credentials,
    prepare_run,
    prepare_sweep,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "configs" / "quickstart.yaml"
LOCAL = "http://127.0.0.1:8265"
SECRET = "fake-secret-0123456789abcdef"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Ray address/auth from the outer environment (an earlier ray.init sets RAY_AUTH_MODE)."""
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MMPT_DB", f"sqlite:///{tmp_path}/jobs.db")


@pytest.fixture
def shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Relative data paths (as in a user's config) that exist under the current directory."""
    for split in ("train", "eval"):
        (tmp_path / "d" / split).mkdir(parents=True)
        (tmp_path / "d" / split / "shard-000000.tar").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return ["data.train=d/train", "data.eval=d/eval", "storage.path=out", "name=tiny"]


def _sets(entrypoint: str) -> list[str]:
    args = shlex.split(entrypoint)
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def test_a_run_becomes_mmpt_run_with_absolute_paths_and_the_same_config_hash(shards: list[str], tmp_path: Path) -> None:
    p = prepare_run(QUICKSTART, shards, address=LOCAL, working_dir=ROOT)
    rec = p.record
    assert shlex.split(rec.entrypoint)[:3] == ["mmpt", "run", "jobs/configs/quickstart.yaml"]
    assert rec.config["data"]["train"] == str(tmp_path / "d" / "train")
    assert rec.config["storage"]["path"] == str(tmp_path / "out")
    assert rec.run_dir == f"{tmp_path}/out/runs/tiny"
    assert (rec.kind, rec.name, rec.state, rec.address) == ("run", "tiny", "PENDING", LOCAL)
    assert rec.id.startswith("tiny-") and len(rec.id) == len("tiny-20250101-120000-ab12")
    # the job recomputes exactly the recorded config from its own command line
    assert load_config(QUICKSTART, _sets(rec.entrypoint)).config_hash() == rec.config_hash
    env = p.runtime_env
    assert env["working_dir"] == str(ROOT) and env["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    assert p.metadata["mmpt.config_hash"] == rec.config_hash and all(isinstance(v, str) for v in p.metadata.values())


def test_the_upload_keeps_code_and_drops_data_runs_venvs_vcs_and_secrets(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import _get_excludes  # the matcher Ray's upload applies

    excluded = _get_excludes(tmp_path, list(EXCLUDES))
    kept = ["jobs/data/pipeline.py", "jobs/configs/quickstart.yaml", "orchestrator/cli/main.py", "models/moe/layer.py"]
    dropped = ["data/shapes/train/shard-000000.tar", "runs/quickstart/metrics.jsonl", ".venv/bin/python",
               ".git/HEAD", "orchestrator/__pycache__/cli.cpython-311.pyc", ".mmpt/jobs.db", ".env",
               "deploy/key.pem", ".aws/credentials", "mmpt.egg-info/PKG-INFO"]
    assert [f for f in kept if excluded(tmp_path / f)] == []
    assert [f for f in dropped if not excluded(tmp_path / f)] == []


def test_remote_clusters_cannot_take_relative_local_paths(shards: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        prepare_run(QUICKSTART, shards, address="http://10.0.0.5:8265", working_dir=ROOT)
    assert len(err.value.problems) == 3
    assert err.value.problems[0].startswith("data.train = 'd/train': a relative local path, which the cluster at "
                                            "http://10.0.0.5:8265 cannot see")
    remote = ["data.train=s3://b/train", "data.eval=s3://b/eval", "storage.path=s3://b/out"]
    rec = prepare_run(QUICKSTART, remote, address="http://10.0.0.5:8265", working_dir=ROOT).record
    assert rec.run_dir == "s3://b/out/runs/quickstart" and _sets(rec.entrypoint) == remote


def test_what_would_not_reach_the_cluster_is_refused(shards: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.train = '/nope': no shards match '/nope'"):
        prepare_run(QUICKSTART, [*shards, "data.train=/nope"], address=LOCAL, working_dir=ROOT)
    outside = tmp_path / "my.yaml"
    outside.write_text(QUICKSTART.read_text())
    with pytest.raises(SubmitError, match=r"^CONFIG .*my.yaml: outside the working directory .* that is uploaded"):
        prepare_run(outside, shards, address=LOCAL, working_dir=ROOT)
    (tmp_path / "runs").mkdir()
    inside_runs = tmp_path / "runs" / "config.yaml"
    inside_runs.write_text(QUICKSTART.read_text())
    with pytest.raises(SubmitError, match=r"inside runs/, which is not uploaded"):
        prepare_run(inside_runs, shards, address=LOCAL, working_dir=tmp_path)
    with pytest.raises(SubmitError, match=r"^--env AWS_SECRET_ACCESS_KEY: looks like a credential"):
        prepare_run(QUICKSTART, shards, address=LOCAL, working_dir=ROOT, env=["AWS_SECRET_ACCESS_KEY=x"])


def test_credentials_in_the_job_are_refused_by_name_never_by_value(shards: list[str]) -> None:
    p = prepare_run(QUICKSTART, [*shards, f"name=run{SECRET[-8:]}"], address=LOCAL, working_dir=ROOT)
    check_no_credentials(p, {"AWS_SECRET_ACCESS_KEY": SECRET})  # a suffix is not the value: fine
    leaky = prepare_run(QUICKSTART, [*shards, f"name=x{SECRET}"], address=LOCAL, working_dir=ROOT)
    with pytest.raises(SubmitError) as err:
        check_no_credentials(leaky, {"AWS_SECRET_ACCESS_KEY": SECRET})
    assert str(err.value).startswith("the job would carry the value of AWS_SECRET_ACCESS_KEY")
    assert SECRET not in str(err.value)


def test_sweep_files_are_told_apart_from_run_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("name: r\ntrain: {steps: 5}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: a run config, not a sweep file; submit it without --sweep"):
        prepare_sweep(run, address=LOCAL, working_dir=tmp_path)
    # a file with no sweep section is told apart by the sweep schema: it names what a sweep needs
    other = tmp_path / "other.yaml"
    other.write_text("hello: world\n")
    with pytest.raises(ConfigError) as err:
        prepare_sweep(other, address=LOCAL, working_dir=tmp_path)
    assert "base: required" in err.value.problems and "space" in err.value.problems[-1]
    sweep = tmp_path / "s.yaml"
    (tmp_path / "q.yaml").write_text("name: q\n")
    sweep.write_text("name: s\nbase: q.yaml\nmetric: loss/total\nmode: min\nspace: {train.lr: {choice: [0.1, 0.2]}}\n")
    rec = prepare_sweep(sweep, ["sweep.seeds=1"], address=LOCAL, working_dir=tmp_path).record
    assert (rec.kind, rec.name, rec.entrypoint, rec.run_dir) == ("sweep", "s", "mmpt sweep s.yaml --set sweep.seeds=1", "")


def test_a_real_sweep_file_is_validated_by_the_sweep_schema() -> None:
    pytest.importorskip("orchestrator.sweep.spec")
    sweep = ROOT / "jobs" / "configs" / "sweeps" / "objectives.yaml"
    rec = prepare_sweep(sweep, ["sweep.seeds=1"], address=LOCAL, working_dir=ROOT).record
    assert rec.entrypoint == "mmpt sweep jobs/configs/sweeps/objectives.yaml --set sweep.seeds=1"
    assert rec.kind == "sweep" and rec.config["overrides"] == ["sweep.seeds=1"] and rec.id.startswith(rec.name)
    with pytest.raises(ConfigError):
        prepare_sweep(sweep, ["sweep.seeds=-1"], address=LOCAL, working_dir=ROOT)


def test_token_auth_follows_rays_mode_and_lookup_order(tmp_path: Path) -> None:
    assert resolve_auth({}, home=tmp_path) == Auth()
    assert resolve_auth({"RAY_AUTH_TOKEN": "t"}, home=tmp_path) == Auth()  # mode not token: nothing sent
    tok = tmp_path / "tok"
    tok.write_text("from-file\n")
    a = resolve_auth({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tok)}, home=tmp_path)
    assert (a.token, a.source, a.headers) == ("from-env", "RAY_AUTH_TOKEN", {"Authorization": "Bearer from-env"})
    assert resolve_auth({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tok)}, home=tmp_path).token == "from-file"
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default")
    assert resolve_auth({"RAY_AUTH_MODE": "TOKEN"}, home=tmp_path).token == "default"
    assert "from-env" not in repr(a)
    with pytest.raises(ClusterError, match=r"^RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN"):
        resolve_auth({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_unauthenticated_submission_to_a_remote_cluster_names_the_cve() -> None:
    warning = insecure_warning("http://10.0.0.5:8265", Auth())
    assert warning is not None and "CVE-2023-48022" in warning and "arbitrary code" in warning
    assert insecure_warning("http://10.0.0.5:8265", Auth("t", "RAY_AUTH_TOKEN")) is None
    assert insecure_warning("http://127.0.0.1:8265", Auth()) is None
    assert insecure_warning("http://localhost:8265", Auth()) is None


def test_addresses_are_checked() -> None:
    assert cluster.check_address("http://127.0.0.1:8265/") == "http://127.0.0.1:8265"
    for bad in ("127.0.0.1:8265", "ray://h:10001", "http://h:99999", "http://h:1/api", ""):
        with pytest.raises(ClusterError, match=r"--address"):
            cluster.check_address(bad)


# -- the CLI: one `error:` line and exit code 2 for each kind of bad input --------------------------


def _cli(args: list[str]) -> tuple[int, list[str], str]:
    res = CliRunner().invoke(app, args)
    return res.exit_code, res.stderr.strip().splitlines(), res.stdout


def _no_cluster(address: str, auth: object = None) -> None:
    raise AssertionError("contacted the cluster")


def test_cli_malformed_job_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "connect", _no_cluster)
    for cmd in (["jobs", "status", "bad/id!"], ["jobs", "logs", "../x"], ["jobs", "stop", "a b"]):
        code, err, _ = _cli(cmd)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: job id ") and "expected 1-128" in err[0]


def test_cli_invalid_config_is_rejected_before_anything_is_uploaded(shards: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "connect", _no_cluster)
    code, err, out = _cli(["submit", str(QUICKSTART), "--address", LOCAL, *sum((["--set", s] for s in shards), []),
                           "--set", "model.num_heads=-3"])
    assert code == 2 and out == ""
    assert err == ["error: model.num_heads = -3: Input should be greater than or equal to 1"]


def test_cli_unreachable_address(shards: list[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, err, _ = _cli(["submit", str(QUICKSTART), "--address", f"http://127.0.0.1:{port}", "--working-dir", str(ROOT),
                         *sum((["--set", s] for s in shards), [])])
    assert code == 2
    assert err == [f"error: http://127.0.0.1:{port}: cannot reach a Ray dashboard there (is the head running, and "
                   "is this its dashboard port, default 8265?)"]
    code, err, _ = _cli(["submit", str(QUICKSTART), "--address", "localhost:8265"])
    assert code == 2 and len(err) == 1 and "expected the Ray dashboard's http(s)://HOST:PORT" in err[0]


def test_cli_warns_about_unauthenticated_remote_submission(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(address: str, auth: object = None) -> None:
        raise ClusterError(f"{address}: cannot reach a Ray dashboard there")

    monkeypatch.setattr(cluster, "connect", unreachable)
    remote = ["data.train=s3://b/train", "data.eval=s3://b/eval", "storage.path=s3://b/out"]
    code, err, _ = _cli(["submit", str(QUICKSTART), "--address", "http://10.0.0.5:8265", *sum((["--set", s] for s in remote), [])])
    assert code == 2 and len(err) == 2
    assert err[0].startswith("warning: submitting to http://10.0.0.5:8265 without authentication") and "CVE-2023-48022" in err[0]
    assert err[1] == "error: http://10.0.0.5:8265: cannot reach a Ray dashboard there"


def test_cli_unknown_job_and_empty_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "connect", _no_cluster)
    code, err, _ = _cli(["jobs", "status", "never-submitted"])
    assert code == 2 and len(err) == 1 and err[0].startswith("error: job 'never-submitted': not in the registry sqlite:///")
    code, err, out = _cli(["jobs", "list"])
    assert (code, err, out.strip()) == (0, [], "no jobs")
    code, err, _ = _cli(["jobs", "list", "--state", "DONE"])
    assert code == 2 and err == ["error: --state 'DONE': allowed PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, LOST"]


def test_cli_list_and_status_of_ended_jobs_work_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from orchestrator.controller.registry import JobRecord, Registry

    monkeypatch.setattr(cluster, "connect", _no_cluster)  # ended jobs are not asked about again
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"steps": 6, "final_losses": {"total": 3.25, "mlm": 2.5}}))
    with Registry(f"sqlite:///{tmp_path}/jobs.db") as reg:
        reg.add(JobRecord(id="tiny-1", kind="run", name="tiny", address=LOCAL, state="SUCCEEDED", run_dir=str(run_dir)))
    code, err, out = _cli(["jobs", "list"])
    assert code == 0 and err == [] and out.splitlines()[1].split()[:4] == ["tiny-1", "tiny", "run", "SUCCEEDED"]
    code, _, out = _cli(["jobs", "list", "--json", "--state", "RUNNING"])
    assert (code, json.loads(out)) == (0, [])
    code, err, out = _cli(["jobs", "status", "tiny-1"])
    lines = out.splitlines()
    assert code == 0 and lines[0] == "tiny-1 SUCCEEDED" and "  final loss/total: 3.25" in lines
    with Registry(f"sqlite:///{tmp_path}/jobs.db") as reg:
        assert reg.get("tiny-1").final_metrics == {"steps": 6, "final_losses": {"total": 3.25, "mlm": 2.5}}  # type: ignore[union-attr]
