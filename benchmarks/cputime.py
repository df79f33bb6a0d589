"""CPU-seconds of a whole process tree over time, for benchmarks that compare sides fairly.

A side that spreads its work over helper processes (Ray's raylet, GCS, workers, Ray Data tasks) must
be charged for all of them, not only for the process that times the steps. `TreeCPU` samples the
cumulative user+system time of a root process and every descendant it can see (psutil), every
`interval` seconds in a thread; `at(t)` interpolates the tree's CPU-seconds at a wall time `t`
(time.time()), so the CPU spent between two events both sides log (two reports) is a difference.

A process that exits between two samples takes its last interval with it; the windows measured are
the steady part of a run, where the processes doing the work are alive throughout.
"""

from __future__ import annotations

import bisect
import os
import threading
import time

import psutil


def kind(proc: psutil.Process) -> str:
    """What a process of the tree is, from its title (Ray workers retitle themselves `ray::...`)."""
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "gone"
    if title.startswith("ray::"):
        name = title.split()[0][5:]
        return "ray::" + ("IDLE" if name.startswith("IDLE") else name.split(".")[0])
    for service in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env", "agent"):
        if service in title:
            return service
    if "multiprocessing.spawn" in title:  # a process of torch.multiprocessing.spawn / multiprocessing's spawn
        return "mp-spawn"
    if "multiprocessing.resource_tracker" in title:  # the helper spawn starts beside them
        return "mp-tracker"
    return "other"


def tree_cpu(root: psutil.Process) -> dict[int, tuple[str, float]]:
    """pid -> (kind, user + system seconds) of `root` ("root") and each live descendant."""
    out: dict[int, tuple[str, float]] = {}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # exited while we looked
            continue
        out[proc.pid] = ("root" if proc.pid == root.pid else kind(proc), t.user + t.system)
    return out


def tree_cpu_seconds(root: psutil.Process) -> float:
    """user + system seconds of `root` and all its live descendants."""
    return sum(cpu for _, cpu in tree_cpu(root).values())


def thread_sched(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (ns on a CPU, ns runnable but waiting for a CPU) of each thread of `pid`, from
    /proc/<pid>/task/<tid>/schedstat (Linux; {} elsewhere or when the process is gone)."""
    out: dict[int, tuple[int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                on_cpu, delay = f.read().split()[:2]
        except (OSError, ValueError):
            continue
        out[int(tid)] = (int(on_cpu), int(delay))
    return out


class TreeCPU:
    """Samples `tree_cpu_seconds` of a process tree in a thread: `with TreeCPU() as cpu: ...; cpu.at(t)`."""

    def __init__(self, pid: int | None = None, interval: float = 0.2, sched_kinds: tuple[str, ...] = ()) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.sched_kinds = sched_kinds
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.parts: list[dict[int, tuple[str, float]]] = []
        self.sched: list[dict[int, dict[int, tuple[int, int]]]] = []  # per sample: pid -> thread_sched
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-cpu", daemon=True)

    def _sample(self) -> None:
        parts = tree_cpu(self.root)
        self.times.append(time.time())
        self.parts.append(parts)
        self.sched.append({pid: thread_sched(pid) for pid, (label, _) in parts.items() if label in self.sched_kinds})
        self.cpu.append(sum(cpu for _, cpu in parts.values()))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> float:
        """The tree's CPU-seconds at wall time `t`, linearly interpolated between samples."""
        if not self.times:
            raise ValueError("no samples taken")
        i = bisect.bisect_left(self.times, t)
        if i <= 0:
            return self.cpu[0]
        if i >= len(self.times):
            return self.cpu[-1]
        t0, t1, c0, c1 = self.times[i - 1], self.times[i], self.cpu[i - 1], self.cpu[i]
        return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)

    def between(self, t0: float, t1: float) -> float:
        return self.at(t1) - self.at(t0)

    def parts_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU-seconds per process kind (as titled at the later sample) between the samples nearest to t0 and t1."""
        i0 = min(bisect.bisect_left(self.times, t0), len(self.times) - 1)
        i1 = min(bisect.bisect_left(self.times, t1), len(self.times) - 1)
        a, b = self.parts[i0], self.parts[i1]
        out: dict[str, float] = {}
        for pid, (label, cpu) in b.items():
            out[label] = out.get(label, 0.0) + cpu - a.get(pid, (label, 0.0))[1]
        return out

    def busiest_threads_between(self, t0: float, t1: float) -> list[tuple[float, float]]:
        """For each process of `sched_kinds` alive at both samples nearest to t0 and t1: (seconds on a
        CPU, seconds runnable but waiting for one) of its busiest thread in between (the thread that
        runs the training loop: Ray Train runs it in a thread of its own, a plain rank in its main one)."""
        i0 = min(bisect.bisect_left(self.times, t0), len(self.times) - 1)
        i1 = min(bisect.bisect_left(self.times, t1), len(self.times) - 1)
        a, b = self.sched[i0], self.sched[i1]
        out = []
        for pid, threads in b.items():
            before = a.get(pid)
            if not before:
                continue
            deltas = [(cpu - before[tid][0], delay - before[tid][1]) for tid, (cpu, delay) in threads.items()
                      if tid in before]
            if deltas:
                cpu_ns, delay_ns = max(deltas)
                out.append((cpu_ns / 1e9, delay_ns / 1e9))
        return out
