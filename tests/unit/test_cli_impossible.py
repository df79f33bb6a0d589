"""`mmpt run` as a new user types it: an impossible run is one line on stderr and exit 2 before Ray
starts, in seconds (it used to print its banner and hang: --set train.batch_size=1000000)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from jobs.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("shapes")
    write_synthetic(str(out), samples=64, shards=2, seed=1, image_size=32, eval_samples=32, vocab_size=200)
    return out


def _mmpt(config: Path, *sets: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    args = [a for s in sets for a in ("--set", s)]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli.main", "run", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=None if env is None else os.environ | env)
    return proc, time.monotonic() - started


@pytest.mark.parametrize(("sets", "starts"), [
    (["train.batch_size=1000000"], "error: train.batch_size = 1000000: a step needs 1000000 samples per worker, "
                                   "but worker 0's share of data.train holds 32"),
    (["storage.path=/sys/kernel/mmpt"], "error: storage.path = '/sys/kernel/mmpt': /sys/kernel/mmpt/runs/quickstart "
                                        "is in a kernel filesystem (sys)"),
])
def test_an_impossible_run_is_one_line_and_exit_2_before_ray(shapes: Path, tmp_path: Path, sets: list[str],
                                                             starts: str) -> None:
    storage = [] if any(s.startswith("storage.path") for s in sets) else [f"storage.path={tmp_path}"]
    proc, took = _mmpt(QUICKSTART, f"data.train={shapes}/train", f"data.eval={shapes}/eval", "data.image_size=32",
                       *storage, *sets)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(starts)
    assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""  # no banner: nothing started
    assert took < 60
    assert not (tmp_path / "runs").exists()


def test_a_bad_ray_train_poll_interval_is_one_line_and_exit_2_before_ray(shapes: Path, tmp_path: Path) -> None:
    proc, _ = _mmpt(QUICKSTART, f"data.train={shapes}/train", f"data.eval={shapes}/eval", "data.image_size=32",
                    f"storage.path={tmp_path}", env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "soon"})
    assert proc.returncode == 2 and proc.stdout.strip() == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S='soon': seconds between Ray Train's polls "
                                   "must be a positive number; unset it, or set scaling.report_poll_s")
    assert not (tmp_path / "runs").exists()


def test_a_config_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "cp1252.yaml"
    config.write_bytes(b"name: \x93quoted\x94\n")
    proc, _ = _mmpt(config)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {config}: not UTF-8 text (byte 0x93 at offset 6); save the config as UTF-8"
