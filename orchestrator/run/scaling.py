"""The run config's `scaling` section as Ray resource requests: where training and preprocessing land.

    scaling.num_workers, use_gpu, cpus_per_worker,   ──▶ ray.train.ScalingConfig(**train_scaling(s))
            resources_per_worker, accelerator_type        one Ray Train worker per GPU, on the node type
                                                          that offers those resources (ray_cluster.yaml:
                                                          `gpu_train` advertises `train_gpu`)
    scaling.data_num_cpus, data_resources            ──▶ Ray Data ray_remote_args of the read/preprocess
                                                          tasks (flat_map, map_batches): on the node type
                                                          that offers them (`cpu_data` advertises `data_cpu`)

A Ray task or actor only runs on a node that has every resource it asks for, and the autoscaler
adds a node of a type that has them when none has room; so naming a custom resource that only
one node type advertises is what sends training to GPU nodes and preprocessing to CPU nodes.
With no custom resources (the local default) everything shares the one local node, as before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from jobs.config import ScalingConfig
from orchestrator.config import ConfigError


def train_scaling(s: ScalingConfig) -> dict[str, Any]:
    """Keyword arguments of `ray.train.ScalingConfig` for the run's training workers."""
    per_worker: dict[str, float] = {"CPU": s.cpus_per_worker} | ({"GPU": 1} if s.use_gpu else {})
    kwargs: dict[str, Any] = {"num_workers": s.num_workers, "use_gpu": s.use_gpu,
                              "resources_per_worker": per_worker | dict(s.resources_per_worker)}
    if s.accelerator_type is not None:
        # Ray Train adds a sliver of the `accelerator_type:<name>` resource to each worker, which
        # only nodes with that GPU kind advertise (the AWS autoscaler fills it in per instance type).
        kwargs["accelerator_type"] = s.accelerator_type
    return kwargs


def data_remote_args(s: ScalingConfig) -> dict[str, Any]:
    """`ray_remote_args` for the Ray Data tasks that read and preprocess shards; {} = Ray Data's defaults."""
    args: dict[str, Any] = {}
    if s.data_num_cpus is not None:
        args["num_cpus"] = s.data_num_cpus
    if s.data_resources:
        args["resources"] = dict(s.data_resources)
    return args



def data_cpu_share(s: ScalingConfig) -> float | None:
    """Logical CPUs each rank's Ray Data executor may use on a local Ray this run started: its share
    of `data_cpus`, never less than one task's worth. None (Ray Data's own budget) when
    `limit_data_per_rank` is off; on a cluster the runner passes None too, so that the executors
    can grow onto nodes the autoscaler adds."""
    if not s.limit_data_per_rank:
        return None
    return max(s.data_cpus / s.num_workers, s.data_num_cpus or 1.0)


POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # read by Ray Train's controller; fit() propagates it


def report_poll_s(s: ScalingConfig, environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """Seconds between the Ray Train controller's polls of the workers.

    Each poll takes at most one report from each worker, and a worker's report queue holds one:
    `ray.train.report` blocks the training loop until the previous report was polled. Ray's 2 s
    default, with reports every second or so, stalled each report by up to 2 s and each run's end
    by as much (a 6-step test run spent 30 % of its time so: benchmarks/run_latency.py). One poll is
    one small actor task per worker, so the default grows with the workers: 0.1 s up to 10 of them,
    2 s from 200.
    """
    if s.report_poll_s is not None:
        return s.report_poll_s
    raw = environ.get(POLL_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value > 0:  # Ray's controller would die on it with a traceback, after start-up
            raise ConfigError([f"{POLL_ENV}={raw!r}: seconds between Ray Train's polls must be a positive "
                               "number; unset it, or set scaling.report_poll_s"])
        return value
    return min(2.0, max(0.1, s.num_workers / 100))


@contextlib.contextmanager
def controller_env(s: ScalingConfig) -> Iterator[None]:
    """Around `trainer.fit()`: the variables Ray Train hands from this process to its controller and
    workers (today the poll interval), restored afterwards so one run's value never outlives it."""
    before = os.environ.get(POLL_ENV)
    os.environ[POLL_ENV] = f"{report_poll_s(s):g}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(POLL_ENV, None)
        else:
            os.environ[POLL_ENV] = before


def pin_data_stats_to_driver() -> None:
    """Create Ray Data's cluster-wide stats actor now, from the driver, so that it lives on the head.

    Ray Data keeps one detached stats actor per cluster, pinned to the node of the first process
    that runs a pipeline. Our pipelines run inside the Ray Train workers, so without this it would
    sit on a GPU node for the life of the cluster, and a node with a live actor is never idle: the
    autoscaler would never remove that GPU node (tests/integration/test_autoscaling.py caught it).
    """
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # a Ray Data without the actor: nothing to pin
        return
    get_or_create_stats_actor()
