"""jobs/worker_host.py: a training worker's malloc keeps the memory a step frees for the next one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import ScalingConfig

ROOT = Path(__file__).resolve().parents[2]

# Fifty 2 MiB activations written and freed per "step". The child first pins glibc's trim threshold
# at its initial 128 KiB (glibc's dynamic thresholds rise with what a process frees, so left alone
# whether the heap's top is handed back varies run to run): freed memory then always goes back to the
# kernel and the next step faults on every page again, unless the worker's policy keeps it. In a
# child: mallopt is process-wide.
STEPS = """
import ctypes, json, resource, sys, torch
from jobs.worker_host import M_TRIM_THRESHOLD, setup_worker_host
assert ctypes.CDLL(None).mallopt(M_TRIM_THRESHOLD, 128 * 1024)
setup_worker_host(1, sys.argv[1])
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    acts = [torch.empty(2048, 256).fill_(1.0) for _ in range(50)]
    del acts
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
print(json.dumps(faults))
"""


def _faults(policy: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", STEPS, policy], cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retain_stops_the_page_faults_of_memory_freed_every_step() -> None:
    pages = 50 * 2048 * 256 * 4 // 4096  # every page of the fifty activations
    system, retain = _faults("system"), _faults("retain")
    assert min(system[2:]) >= pages // 2, system  # handed back: the heap shrinks and regrows each step
    assert max(retain[2:]) < pages // 20, retain  # once grown, the heap keeps the step's memory


def test_workers_retain_host_memory_by_default() -> None:
    assert ScalingConfig().host_memory == "retain"
    assert ScalingConfig(host_memory="system").host_memory == "system"
