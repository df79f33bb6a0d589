"""One way to start or join Ray for `mmpt run` and `mmpt sweep`, and to leave nothing behind.

`ray.shutdown()` stops the GCS and the raylet this driver started; their worker processes notice and
exit on their own, which on a loaded machine can take longer than the user waits (a Train worker
inside a gloo collective, a DeepSpeed teardown). A Ctrl-C must not leave `ray::RayTrainWorker`
processes holding cores and memory, so after the shutdown the processes of the Ray instance this
driver started are given a grace period and then killed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

REAP_GRACE_S = 5.0  # after ray.shutdown(): how long a worker may take to exit before it is killed


def _descendants(roots: list[psutil.Process]) -> list[psutil.Process]:
    """`roots` and everything they started, as far as it is still running."""
    out: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            out.setdefault(root.pid, root)
            for child in root.children(recursive=True):
                out.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    return list(out.values())


def reap(procs: list[psutil.Process], grace_s: float = REAP_GRACE_S) -> list[int]:
    """Wait up to `grace_s` for `procs` to exit, then SIGKILL the rest; returns the killed pids."""
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return [p.pid for p in alive]


@contextmanager
def ray_instance(address: str | None, num_cpus: int) -> Iterator[bool]:
    """Join Ray at `address` (or $RAY_ADDRESS, as inside a Ray job), reuse an initialised one, or start
    a local one with `num_cpus`. Yields True when this call connected (and disconnects on exit).

    A local instance started here is shut down on exit however the block ended (Ctrl-C included), and
    its processes (the GCS, raylet and agents `ray.init` started, and the workers they started) are
    reaped: given `REAP_GRACE_S` to exit, then killed."""
    import ray

    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kwargs)
        try:
            yield True
        finally:
            ray.shutdown()  # disconnects this driver; the cluster is not ours to stop
        return
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    ray.init(num_cpus=max(1, int(num_cpus)), **kwargs)
    started = [p for p in me.children() if p.pid not in before]  # Ray's own: nothing else runs in ray.init
    try:
        yield True
    finally:
        procs = _descendants(started)  # before the shutdown: the raylet's workers are still its children
        try:
            ray.shutdown()
        finally:
            reap(procs)
