"""orchestrator/run/ray_local.py: the processes of a Ray instance this driver started are reaped."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from orchestrator.run.ray_local import _descendants, reap

# a process that ignores SIGTERM and SIGINT, like a Train worker stuck in a collective
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_reap_kills_a_process_that_outlives_the_grace_period_and_spares_none() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN])
    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    started = time.monotonic()
    killed = reap([psutil.Process(proc.pid), psutil.Process(quick.pid)], grace_s=1.0)
    assert killed == [proc.pid]
    assert _gone(proc.pid) and _gone(quick.pid)
    assert time.monotonic() - started < 5


def test_descendants_include_grandchildren_started_before_the_snapshot() -> None:
    # a child that starts a stubborn grandchild, then waits on it (raylet -> worker)
    code = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {STUBBORN!r}]).wait()"
    parent = subprocess.Popen([sys.executable, "-c", code])
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        procs = started = _descendants([psutil.Process(parent.pid)])
        assert len(procs) == 2
        grandchild = next(p for p in procs if p.pid != parent.pid)
        parent.kill()  # the grandchild is orphaned, as workers are when the raylet stops
        parent.wait()
        assert grandchild.is_running()
        assert sorted(reap(procs, grace_s=0.5)) == [grandchild.pid]
        assert _gone(grandchild.pid)
    finally:  # only what this test started: the test session's own Ray and servers are children too
        for proc in [psutil.Process(parent.pid), *started] if parent.poll() is None else started:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
