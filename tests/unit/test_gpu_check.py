"""The prepared GPU check (benchmarks/gpu_check.sh): never a silent skip on a GPU machine, and on a
machine without a GPU it runs the same code small on the CPU, ending with a verified checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_a_gpu_torch_cannot_use_fails_the_check_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    from benchmarks import gpu_check
    from orchestrator.doctor import probes

    monkeypatch.setattr(probes, "gpu_hardware", lambda: probes.GpuHardware(1, False, "580.1", (13, 0)))
    monkeypatch.setattr(sys, "argv", ["gpu_check"])
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main()
    assert exit_.value.code == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu check FAILED: this machine has 1 NVIDIA GPU(s) but torch ")
    assert "fix: rm -rf .venv && make venv TORCH_SPEC=" in out[0]


def test_mfu_peak_table_knows_the_pcie_h100_apart() -> None:
    from benchmarks.gpu_check import peak_flops

    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Tesla T4") is None


@pytest.mark.slow  # a few DeepSpeed engines and a short loop on the CPU (~40 s)
def test_gpu_check_runs_on_the_cpu_and_verifies_its_checkpoint() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--steps", "2", "--warmup", "1",
                          "--loop-steps", "4"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert out.startswith("device: CPU")
    for name in ("dense", "MoE x8 (top-1)", "dense, old boolean masks"):
        assert re.search(rf"^  {re.escape(name)} .* [\d.]+ samples/s$", out, re.M), (name, out)
    assert re.search(r"^  4 steps in .* loss [\d.]+ -> [\d.]+; eval on 256 held-out samples", out, re.M), out
    assert (m := re.search(r"checkpoint: saved and restored into a fresh engine: (\d+)/(\d+) tensors equal", out))
    assert m.group(1) == m.group(2) and int(m.group(1)) > 50
    assert out.rstrip().splitlines()[-1].startswith("gpu check passed in ")
