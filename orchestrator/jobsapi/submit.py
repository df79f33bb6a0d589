"""`mmpt submit`: send a run (or a sweep) to a Ray cluster as a Ray job, and register it.

The job is the working directory (uploaded as the runtime_env `working_dir`, without data, run
outputs, virtualenvs, VCS and secrets files) plus the command `mmpt run CONFIG --set ...`: the same
config file and overrides a local run takes, so a job computes exactly the resolved config that
was validated and recorded here (same `config_hash`). Everything a user can get wrong is checked
before anything is uploaded: the config (schema and cross-section checks), local shards when the
cluster runs on this machine, paths a remote cluster could not see, the sweep file.

Relative local paths (data.train, data.eval, data.tokenizer, storage.path) would resolve inside
the job's unpacked working dir, where data/ is excluded and outputs vanish with the job: for a
cluster on this machine they are made absolute (extra `--set`s); for a remote one they are errors.

Credentials are never part of the job (see orchestrator/jobsapi/credentials.py).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import secrets
import shlex
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import storage
from jobs.config import RunConfig
from orchestrator.config import ConfigError, load_config, load_raw, validate
from orchestrator.controller.registry import JobRecord, Registry
from orchestrator.jobsapi import cluster
from orchestrator.jobsapi.credentials import credential_values, is_credential_name, leaks
from orchestrator.run.files import run_uri

# gitwildmatch patterns relative to the working dir (Ray's runtime_env `excludes`). Top-level
# folders are anchored with "/" so that e.g. the code package jobs/data/ is still uploaded.
EXCLUDES: tuple[str, ...] = (
    "/data/", "/runs/", "/.mmpt/", "/.venv/", "/venv/", "/env/", ".git/", "__pycache__/", "*.pyc",
    ".pytest_cache/", ".ruff_cache/", ".mypy_cache/", "*.egg-info/", ".ipynb_checkpoints/", "node_modules/",
    ".env", ".env.*", "*.pem", "*.key", ".aws/", ".ray/", ".ssh/",
)
_TOP_EXCLUDED = {p.strip("/") for p in EXCLUDES if p.startswith("/")}
_LOCAL_PATH_FIELDS = ("data.train", "data.eval", "data.tokenizer", "storage.path")


class SubmitError(ValueError):
    """A submission problem the user can fix (one line)."""


@dataclass(frozen=True)
class Prepared:
    """A validated job, ready to send: its registry record and its runtime env."""

    record: JobRecord
    runtime_env: dict[str, Any] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, str]:
        return self.record.metadata()


def _submitter() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def new_job_id(name: str) -> str:
    """`<name>-<UTC yyyymmdd-HHMMSS>-<4 hex>`: sortable, readable, unique enough per cluster."""
    return f"{name[:48]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def _inside(path: Path, working_dir: Path, what: str) -> str:
    """`path` relative to the working dir; SubmitError if it would not be uploaded."""
    try:
        rel = path.resolve().relative_to(working_dir)
    except ValueError:
        raise SubmitError(f"{what} {path}: outside the working directory {working_dir} that is uploaded; "
                          "move it inside, or pass --working-dir") from None
    if rel.parts and rel.parts[0] in _TOP_EXCLUDED:
        raise SubmitError(f"{what} {path}: inside {rel.parts[0]}/, which is not uploaded (excluded: "
                          f"{', '.join(sorted(_TOP_EXCLUDED))}); copy it elsewhere in {working_dir}")
    return rel.as_posix()


def _working_dir(path: str | Path | None) -> Path:
    wd = Path(path or os.getcwd()).resolve()
    if not wd.is_dir():
        raise SubmitError(f"--working-dir {path}: not a directory")
    return wd


def _env_vars(pairs: Sequence[str]) -> dict[str, str]:
    out = {"PYTHONUNBUFFERED": "1"}  # job logs stream line by line (`mmpt jobs logs --follow`)
    for item in pairs:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SubmitError(f"--env {item!r}: expected NAME=VALUE")
        if is_credential_name(name):
            raise SubmitError(f"--env {name}: looks like a credential; job env vars are stored in the cluster's "
                              "job metadata, so give credentials to the cluster nodes' environment instead")
        out[name] = value
    return out


def _path_fixups(cfg: RunConfig, address: str, base: Path) -> list[str]:
    """Overrides that make relative local paths absolute (cluster on this machine), or ConfigError."""
    local_cluster = cluster.is_loopback(address)
    fixes: list[str] = []
    problems: list[str] = []
    for dotted in _LOCAL_PATH_FIELDS:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        relative = [v for v in items if not storage.is_remote(v) and not os.path.isabs(os.path.expanduser(v))]
        if not relative:
            continue
        if not local_cluster:
            problems.append(f"{dotted} = {value!r}: a relative local path, which the cluster at {address} cannot "
                            "see (data/ and runs/ are not uploaded); use s3://... or an absolute path on storage "
                            "the cluster mounts")
            continue
        fixed = [v if v not in relative else str((base / v).resolve()) for v in items]
        fixes.append(f"{dotted}={json.dumps(fixed if isinstance(value, list) else fixed[0])}")
    if problems:
        raise ConfigError(problems)
    return fixes


def _all_local(cfg: RunConfig) -> bool:
    paths = [cfg.data.train] if isinstance(cfg.data.train, str) else list(cfg.data.train)
    if cfg.data.eval:
        paths += [cfg.data.eval] if isinstance(cfg.data.eval, str) else list(cfg.data.eval)
    return not any(storage.is_remote(p) for p in [*paths, cfg.storage.path])


def _check_shards(cfg: RunConfig) -> None:
    """Missing shards fail here, in a second, rather than in the job after its upload and start-up."""
    from jobs.data.reader import SHARD_SUFFIXES

    for dotted, spec in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if spec:
            try:
                storage.expand_shards(spec, suffixes=SHARD_SUFFIXES)
            except (ValueError, OSError) as exc:
                raise ConfigError([f"{dotted} = {spec!r}: {exc}"]) from None


def prepare_run(config: str | Path, overrides: Sequence[str] = (), *, address: str,
                working_dir: str | Path | None = None, env: Sequence[str] = (), job_id: str | None = None) -> Prepared:
    """Validate a run for submission; ConfigError / SubmitError name what to fix."""
    address = cluster.check_address(address)
    wd = _working_dir(working_dir)
    cfg = load_config(config, overrides)
    fixes = _path_fixups(cfg, address, Path.cwd())
    if fixes:
        cfg = load_config(config, [*overrides, *fixes])
    if cluster.is_loopback(address) and _all_local(cfg):
        _check_shards(cfg)
    rel = _inside(Path(config), wd, "CONFIG")
    entrypoint = shlex.join(["mmpt", "run", rel, *[a for o in [*overrides, *fixes] for a in ("--set", o)]])
    run_dir = run_uri(cfg.storage.path, cfg.name)
    runtime_env = _runtime_env(wd, env)
    # The record keeps the runtime env (a local path, not the gcs:// package): a controller that
    # resubmits the run after its cluster lost it (controller/retry.py) uploads it again.
    record = JobRecord(id=job_id or new_job_id(cfg.name), kind="run", name=cfg.name, address=address,
                       config_hash=cfg.config_hash(), config=cfg.to_dict(), entrypoint=entrypoint,
                       submitter=_submitter(), run_dir=run_dir, runtime_env=runtime_env)
    return Prepared(record, runtime_env)


def _check_sweep(path: Path, raw: Mapping[str, Any], overrides: Sequence[str]) -> None:
    """ConfigError unless `path` is a valid sweep file (with `overrides` applied, as `mmpt sweep` will)."""
    if set(raw) <= set(RunConfig.model_fields):
        validate(raw)  # a broken run config: say what is wrong with it first
        raise ConfigError([f"{path}: a run config, not a sweep file; submit it without --sweep"])
    from orchestrator.sweep.spec import load_spec  # the sweep file's schema

    load_spec(path, list(overrides))  # its ConfigError names every problem


def prepare_sweep(sweep: str | Path, overrides: Sequence[str] = (), *, address: str,
                  working_dir: str | Path | None = None, env: Sequence[str] = (), job_id: str | None = None) -> Prepared:
    """Validate a sweep file for submission as the job `mmpt sweep FILE [--set ...]`.

    The sweep's base config and output folder are resolved by `mmpt sweep` inside the job, relative
    to the uploaded sweep file: keep them inside the working dir, data on shared or object storage.
    """
    address = cluster.check_address(address)
    wd = _working_dir(working_dir)
    path = Path(sweep)
    raw = load_raw(path)
    _check_sweep(path, raw, overrides)
    rel = _inside(path, wd, "SWEEP")
    name = str(raw.get("name") or path.stem)
    resolved = {"sweep": json.loads(json.dumps(raw, default=str)), "overrides": list(overrides)}
    record = JobRecord(id=job_id or new_job_id(re.sub(r"[^A-Za-z0-9_.-]", "_", name)), kind="sweep", name=name,
                       address=address,
                       config_hash=hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:12],
                       config=resolved, submitter=_submitter(),
                       entrypoint=shlex.join(["mmpt", "sweep", rel, *[a for o in overrides for a in ("--set", o)]]))
    return Prepared(record, _runtime_env(wd, env))


def _runtime_env(wd: Path, env: Sequence[str]) -> dict[str, Any]:
    return {"working_dir": str(wd), "excludes": list(EXCLUDES), "env_vars": _env_vars(env)}


def check_no_credentials(prepared: Prepared, env: Mapping[str, str] | None = None) -> None:
    """SubmitError if the job's entrypoint, runtime env or metadata carries the value of a credential
    variable of `env` (default os.environ): the cluster stores and shows all three."""
    rec = prepared.record
    found = leaks([rec.entrypoint, json.dumps(prepared.runtime_env), json.dumps(prepared.metadata)],
                  credential_values(env))
    if found:
        raise SubmitError(f"the job would carry the value of {', '.join(found)} (in its command line, env or "
                          "config); credentials must reach the cluster through its nodes' environment")


def submit(prepared: Prepared, client: Any, registry: Registry, env: Mapping[str, str] | None = None) -> str:
    """Send the job and register it (PENDING); returns its submission id. Checks credentials first."""
    check_no_credentials(prepared, env)
    rec = prepared.record
    try:
        job_id = cluster.submit_job(client, rec.address, entrypoint=rec.entrypoint, submission_id=rec.id,
                                    runtime_env=prepared.runtime_env, metadata=prepared.metadata)
    except ValueError as exc:  # Ray's packaging: working dir too large, bad excludes
        raise SubmitError(f"--working-dir {prepared.runtime_env['working_dir']}: {str(exc).splitlines()[0]}") from None
    registry.add(rec)
    return job_id
