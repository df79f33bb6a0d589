"""What this machine can run: each probe returns `Check`s with a status, what it saw and, for each
missing piece, the one-line fix.

Probes import what they look at lazily (torch, DeepSpeed, Ray, boto3) so that a missing package is
a finding, not a crash, and `gpu_problem` (used by the GPU benchmarks too) costs no Ray import.

GPU hardware is detected without torch (device nodes, the driver's /proc entry, nvidia-smi), so a
venv whose torch cannot use the GPUs the machine has is told apart from a machine without GPUs:
the first is a failure with a fix, the second is a CPU machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "info", "warn", "fail"]
# PyTorch's CUDA wheel indexes, newest first: pick the newest the driver supports.
_TORCH_CUDA_INDEXES = ((12, 8), (12, 6), (12, 4), (12, 1), (11, 8))


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class GpuHardware:
    """What the machine has, seen without torch."""

    nvidia: int  # /dev/nvidiaN device nodes (or nvidia-smi -L lines)
    amd: bool  # /dev/kfd (ROCm)
    driver: str | None  # NVIDIA driver version
    driver_cuda: tuple[int, int] | None  # the newest CUDA the driver supports (nvidia-smi's "CUDA Version")

    @property
    def present(self) -> bool:
        return self.nvidia > 0 or self.amd


def gpu_hardware(dev: str = "/dev", proc: str = "/proc/driver/nvidia/version") -> GpuHardware:
    nodes = [n for n in os.listdir(dev) if re.fullmatch(r"nvidia\d+", n)] if os.path.isdir(dev) else []
    driver = None
    if os.path.exists(proc):
        with open(proc) as f:
            found = re.search(r"Kernel Module\s+([\d.]+)", f.read())
        driver = found.group(1) if found else None
    driver_cuda = None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            text = subprocess.run([smi], capture_output=True, text=True, timeout=15).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        if m := re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text):
            driver_cuda = (int(m.group(1)), int(m.group(2)))
        if m := re.search(r"Driver Version:\s*([\d.]+)", text):
            driver = driver or m.group(1)
        nodes = nodes or [ln for ln in text.splitlines() if re.match(r"\|\s+\d+\s+NVIDIA", ln)]
    return GpuHardware(nvidia=len(nodes), amd=os.path.exists(os.path.join(dev, "kfd")), driver=driver,
                       driver_cuda=driver_cuda)


def torch_fix(hw: GpuHardware) -> str:
    """The reinstall that gives this venv a torch for the machine's GPUs (the Makefile's TORCH_SPEC)."""
    if hw.amd and not hw.nvidia:
        return "rm -rf .venv && make venv TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/rocm6.2'"
    index = next((f"cu{a}{b}" for a, b in _TORCH_CUDA_INDEXES if hw.driver_cuda is None or (a, b) <= hw.driver_cuda),
                 None)
    if index is None:
        return (f"the NVIDIA driver ({hw.driver}) supports only CUDA {hw.driver_cuda}: upgrade the driver "
                "to one that supports CUDA >= 11.8")
    return f"rm -rf .venv && make venv TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/{index}'"


def gpu_problem(hw: GpuHardware | None = None) -> str | None:
    """One line: why the GPUs this machine has cannot be used by this torch; None if there is no GPU
    or torch can use them. (No GPU at all is not a problem: that is a CPU machine.)"""
    hw = hw or gpu_hardware()
    if not hw.present:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    kind = f"{hw.nvidia} NVIDIA GPU(s)" if hw.nvidia else "an AMD GPU"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or os.environ.get("CUDA_VISIBLE_DEVICES") == "-1":
        return f"this machine has {kind} but CUDA_VISIBLE_DEVICES hides them: unset it"
    build = torch.version.cuda or torch.version.hip
    if not build:
        return f"this machine has {kind} but torch {torch.__version__} is a CPU-only build; fix: {torch_fix(hw)}"
    return (f"this machine has {kind} (driver {hw.driver}, CUDA {hw.driver_cuda}) but torch {torch.__version__} "
            f"(built for CUDA {build}) cannot use them; fix: {torch_fix(hw)}")


def check_torch() -> list[Check]:
    hw = gpu_hardware()
    try:
        import torch
    except ImportError:
        return [Check("torch", "fail", "not installed", "make venv (installs TORCH_SPEC, default torch==2.13.0)")]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}" if torch.version.hip \
        else "CPU-only build"
    out = [Check("torch", "ok", f"{torch.__version__} ({build})")]
    problem = gpu_problem(hw)
    if problem:
        out.append(Check("GPUs", "fail", problem.split("; fix: ")[0], problem.split("; fix: ")[-1]
                         if "; fix: " in problem else None))
        return out
    if not hw.present:
        out.append(Check("GPUs", "info", "none on this machine: training runs on the CPU, gloo between "
                                         "workers (scaling.use_gpu=false)"))
        return out
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    props = torch.cuda.get_device_properties(0)
    out.append(Check("GPUs", "ok", f"{len(names)} visible: {', '.join(sorted(set(names)))}; "
                                   f"{props.total_memory / 2**30:.0f} GiB, compute capability "
                                   f"{props.major}.{props.minor}, driver {hw.driver}"))
    if torch.cuda.is_bf16_supported():
        out.append(Check("bf16", "ok", "supported (train.precision=bf16)"))
    else:
        out.append(Check("bf16", "warn", f"compute capability {props.major}.{props.minor} < 8.0 has no bf16 "
                                         "tensor cores", "--set train.precision=fp32"))
    import torch.distributed as dist

    if dist.is_nccl_available():
        version = ".".join(map(str, torch.cuda.nccl.version()))
        out.append(Check("NCCL", "ok", f"{version}: Ray Train uses it between GPU workers"))
    else:
        out.append(Check("NCCL", "fail", "this torch has no NCCL: multi-GPU runs cannot communicate",
                         torch_fix(hw)))
    return out


def check_deepspeed() -> list[Check]:
    import contextlib
    import io

    try:
        # DeepSpeed logs its accelerator choice to stdout at import: that is this check's finding.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from models.deepspeed_import import import_deepspeed

            deepspeed = import_deepspeed()
            from deepspeed.accelerator import get_accelerator
    except ImportError as exc:
        return [Check("DeepSpeed", "fail", f"cannot import: {exc}", "pip install deepspeed")]
    accel = get_accelerator()
    out = [Check("DeepSpeed", "ok", f"{deepspeed.__version__}, accelerator {accel._name}"
                                    f"{' (DS_ACCELERATOR)' if os.environ.get('DS_ACCELERATOR') else ''}")]
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
        from deepspeed.ops.op_builder.builder import probe_is_compatible
        from torch.utils.cpp_extension import is_ninja_available
    except ImportError:
        return out
    # mmpt's optimizer is torch's AdamW, so no DeepSpeed op is required; these two are what
    # `deepspeed.offload_optimizer` (cpu_adam) and a fused GPU Adam would JIT-compile.
    wanted = [name for name in ("cpu_adam", "fused_adam") if name in ALL_OPS]
    prebuilt = sorted(name for name, yes in installed_ops.items() if yes)
    compatible = [name for name in wanted if probe_is_compatible(ALL_OPS[name], False)]
    detail = (f"ops prebuilt: {', '.join(prebuilt) or 'none'} (JIT-compiled on first use otherwise); "
              f"compatible here: {', '.join(compatible) or 'none'} of {', '.join(wanted)}")
    ninja = is_ninja_available()
    out.append(Check("DeepSpeed ops", "ok" if ninja or prebuilt else "warn",
                     detail + ("" if ninja else "; no ninja: JIT ops cannot build"),
                     None if ninja or prebuilt else "pip install ninja"))
    return out


def check_ray(address: str | None) -> list[Check]:
    try:
        import ray
    except ImportError as exc:
        return [Check("Ray", "fail", f"cannot import: {exc}", "pip install 'ray[default,train,tune,data]'")]
    import logging

    address = address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    try:
        if started:
            kwargs = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
            ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception as exc:  # noqa: BLE001 - any failure to start/join is the finding
        where = f"join {address}" if address else "start a local Ray"
        fix = "check the address (ray status) and RAY_AUTH_MODE / token" if address else "see /tmp/ray/session_latest/logs"
        return [Check("Ray", "fail", f"{ray.__version__}: cannot {where}: {str(exc).splitlines()[0]}", fix)]
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    where = f"cluster at {address}" if address else "a local Ray would get"
    gpus = resources.get("GPU", 0)
    detail = (f"{ray.__version__}; {where}: {len(nodes)} node(s), {resources.get('CPU', 0):.0f} CPUs, "
              f"{gpus:.0f} GPUs, {resources.get('memory', 0) / 2**30:.0f} GiB memory")
    return [Check("Ray", "ok", detail)]


def check_s3(uris: list[str], endpoint_url: str | None, timeout_s: float = 5.0) -> list[Check]:
    """Reachability of the buckets the config names (or, with none, of the endpoint itself)."""
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    buckets = sorted({u[len("s3://"):].split("/", 1)[0] for u in uris if u.startswith("s3://")})
    if not buckets and not endpoint:
        return [Check("S3", "info", "the config names no s3:// path and no endpoint is set (AWS_ENDPOINT_URL)")]
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as exc:
        return [Check("S3", "fail", f"cannot import boto3: {exc}", "pip install boto3")]
    where = endpoint or "AWS"
    session = boto3.session.Session()
    if session.get_credentials() is None:
        return [Check("S3", "fail", f"{where}: no credentials found",
                      "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials or an instance role")]
    client = session.client("s3", endpoint_url=endpoint, config=Config(
        connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1}))
    out: list[Check] = []
    for bucket in buckets or [None]:
        try:
            if bucket is None:
                n = len(client.list_buckets().get("Buckets", []))
                out.append(Check("S3", "ok", f"{where} reachable, {n} bucket(s) visible"))
            else:
                client.head_bucket(Bucket=bucket)
                out.append(Check(f"S3 {bucket}", "ok", f"reachable at {where}"))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            fix = "check the bucket name in the config" if code in ("404", "NoSuchBucket") else \
                "check the credentials' permissions on the bucket"
            out.append(Check(f"S3 {bucket or ''}".strip(), "fail", f"{where}: {code}", fix))
        except BotoCoreError as exc:
            out.append(Check(f"S3 {bucket or ''}".strip(), "fail", f"{where} unreachable: {exc}",
                             "check storage.endpoint_url / AWS_ENDPOINT_URL and the network"))
    return out
