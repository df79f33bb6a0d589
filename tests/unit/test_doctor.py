"""`mmpt doctor`: a GPU that torch cannot use is a failure with its fix, never a silent CPU run;
S3 buckets are reached through the configured endpoint; the config is checked against the machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.doctor import probes
from orchestrator.doctor.probes import GpuHardware, check_s3, gpu_hardware, gpu_problem, torch_fix

ROOT = Path(__file__).resolve().parents[2]
H200 = GpuHardware(nvidia=1, amd=False, driver="580.159.03", driver_cuda=(13, 0))


def test_hardware_is_seen_without_torch(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "null"):
        (dev / name).touch()
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n")
    hw = gpu_hardware(dev=str(dev), proc=str(proc))
    assert (hw.nvidia, hw.amd, hw.driver, hw.present) == (2, False, "550.54.15", True)
    assert gpu_hardware(dev=str(tmp_path / "none"), proc=str(tmp_path / "none")).present is False


@pytest.mark.parametrize(("driver_cuda", "index"), [((12, 4), "cu124"), ((13, 0), "cu128"), ((12, 7), "cu126")])
def test_torch_fix_picks_the_newest_wheel_index_the_driver_supports(driver_cuda, index) -> None:  # noqa: ANN001
    fix = torch_fix(GpuHardware(nvidia=1, amd=False, driver="x", driver_cuda=driver_cuda))
    assert fix == f"rm -rf .venv && make venv TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/{index}'"
    old = torch_fix(GpuHardware(nvidia=1, amd=False, driver="470.1", driver_cuda=(11, 4)))
    assert old.startswith("the NVIDIA driver (470.1) supports only CUDA (11, 4)")


def test_a_gpu_this_torch_cannot_use_is_one_line_with_its_fix() -> None:
    import torch

    assert not torch.cuda.is_available()  # the CPU build of the test venv
    problem = gpu_problem(H200)
    assert problem is not None and "\n" not in problem
    assert problem.startswith("this machine has 1 NVIDIA GPU(s) but torch ") and "CPU-only build" in problem
    assert problem.endswith("fix: rm -rf .venv && make venv TORCH_SPEC='torch --index-url "
                            "https://download.pytorch.org/whl/cu128'")
    assert gpu_problem(GpuHardware(nvidia=0, amd=False, driver=None, driver_cuda=None)) is None  # a CPU machine


def test_doctor_fails_when_the_gpu_is_unusable_and_the_config_wants_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "gpu_hardware", lambda: H200)
    result = CliRunner().invoke(app, ["doctor", str(ROOT / "jobs/configs/quickstart.yaml"), "--no-ray",
                                      "--set", "scaling.use_gpu=true", "--json"])
    assert result.exit_code == 1, result.output
    import json

    checks = {c["name"]: c for c in map(json.loads, result.output.splitlines())}
    assert checks["GPUs"]["status"] == "fail" and "CPU-only build" in checks["GPUs"]["detail"]
    assert checks["GPUs"]["fix"].startswith("rm -rf .venv && make venv TORCH_SPEC=")
    assert checks["scaling.use_gpu"]["status"] == "fail"
    assert checks["scaling.use_gpu"]["fix"] == checks["GPUs"]["fix"]
    assert checks["DeepSpeed"]["status"] == "ok" and checks["torch"]["status"] == "ok"


def test_doctor_on_a_cpu_machine_passes_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "gpu_hardware", lambda: GpuHardware(0, False, None, None))
    result = CliRunner().invoke(app, ["doctor", "--no-ray"])
    assert result.exit_code == 0, result.output
    assert "none on this machine: training runs on the CPU" in result.output.replace("\n", " ").replace("│", "")


def test_s3_buckets_of_the_config_are_reached_at_the_endpoint(s3_server) -> None:  # noqa: ANN001
    bucket = s3_server.create_bucket()
    checks = check_s3([f"s3://{bucket}/shards/", "s3://no-such-bucket/x", "runs/local"], s3_server.endpoint_url)
    by_name = {c.name: c for c in checks}
    assert by_name[f"S3 {bucket}"].status == "ok"
    assert by_name["S3 no-such-bucket"].status == "fail"
    assert by_name["S3 no-such-bucket"].fix == "check the bucket name in the config"
    assert [c.status for c in check_s3([], s3_server.endpoint_url)] == ["ok"]  # the endpoint alone


def test_s3_endpoint_that_does_not_answer_is_a_failure_with_a_fix(s3_server) -> None:  # noqa: ANN001
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (check,) = check_s3(["s3://some-bucket/x"], f"http://127.0.0.1:{port}", timeout_s=1)
    assert check.status == "fail" and "unreachable" in check.detail
    assert check.fix == "check storage.endpoint_url / AWS_ENDPOINT_URL and the network"
