"""What a training worker sets on its host before it builds anything: threads, and malloc's policy.

A training step frees and allocates the same tensors every step: activations of a few MB, gradients
set to None by the optimizer or by DeepSpeed's ZeRO once reduced. glibc's malloc gives freed memory
at the top of its heap back to the kernel as soon as more than its trim threshold is free there
(128 KiB at start, at most 64 MiB as its dynamic thresholds rise), so the next step grows the heap
again and every 4 KiB page it touches faults and is zeroed by the kernel: ~2.3 us a page on this
VM, about 1.2 ms for each fresh 2 MiB activation. Counted with getrusage on one MoE layer step of the
quickstart's shape (D 128, F 256, 2048 tokens): a median of 994 page faults per step at 4 experts and
512 at 64 with glibc's defaults, 0 with `retain` (benchmarks/host_memory.py).

`host_memory: retain` (the default) fixes both thresholds: blocks below 32 MiB (the ceiling of
glibc's own dynamic mmap threshold) come from the heap, and freed heap memory stays mapped up to
1 GiB at the top: a worker keeps the memory of its largest step, as jemalloc and tcmalloc do
(PyTorch's CPU performance guide suggests those). Blocks of 32 MiB and more are still mmapped and
unmapped on free: with the heap alone, repeated large aligned blocks fragment it without bound
(each new one lands above the last). The MoE experts' largest gradients avoid that cost themselves
(models/moe/host_experts.GradBuffers). `system` leaves glibc's defaults. Linux with glibc only;
elsewhere both do nothing.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Literal

import torch

HostMemory = Literal["retain", "system"]

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, the most mallopt accepts
TRIM_THRESHOLD = 2**30


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others: no mallopt with these parameters
    return libc


def retain_host_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (module docstring); True if it took."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def setup_worker_host(cpus_per_worker: float, host_memory: HostMemory) -> None:
    """A training worker's first step: torch's intra-op threads = its CPUs, and malloc's policy."""
    torch.set_num_threads(max(1, int(cpus_per_worker)))
    if host_memory == "retain":
        retain_host_memory()
