"""Ctrl-C in the middle of `mmpt run`: a clean stop in seconds (exit 130, one line, no traceback), no
Ray process left behind, and the same command resumes from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.config import load_config
from orchestrator.run.runner import run
from tests.integration.conftest import QUICKSTART, ROOT, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 14


def _checkpointed_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"checkpoint"' in x]
    return max(steps, default=0)


def test_sigint_mid_run_stops_cleanly_and_the_run_resumes(ray_session, shapes_data, tmp_path) -> None:
    overrides = tiny(shapes_data, tmp_path, name="interrupted", **{
        "train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 2, "data.eval": "null"})
    cmd = [sys.executable, "-m", "orchestrator.cli.main", "run", str(QUICKSTART), *[a for o in overrides for a in ("--set", o)]]
    # its own session, like a terminal's foreground job: Ctrl-C reaches the whole process group
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = tmp_path / "runs" / "interrupted" / "metrics.jsonl"
    seen: set[int] = set()
    deadline = time.monotonic() + 240
    try:
        while _checkpointed_step(metrics) < 2 and proc.poll() is None and time.monotonic() < deadline:
            seen |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            time.sleep(0.2)
        seen |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert proc.poll() is None, proc.communicate()
        before = _checkpointed_step(metrics)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=60)
        stopped_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert stopped_s < 30
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted")
    assert len(seen) >= 3  # Ray's GCS, raylet and workers were children of the driver
    def alive() -> list[int]:
        out = []
        for pid in seen:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.monotonic() + 15  # a worker still tearing down on a loaded machine: seconds, not forever
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], [psutil.Process(p).cmdline()[:3] for p in left]
    assert before < STEPS
    # the same command again resumes from its last committed checkpoint
    result = run(load_config(QUICKSTART, overrides))
    assert result.summary["steps"] == STEPS
    resumed_at = result.metrics[0]["step"]
    # the step after a checkpoint committed before the stop (the one seen, or one that landed with the signal)
    assert (resumed_at - 1) % 2 == 0 and before <= resumed_at - 1 < STEPS
