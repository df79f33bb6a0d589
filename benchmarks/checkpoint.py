"""The step-time cost of a checkpoint to object storage, blocking upload vs background upload, side by side.

One Ray Train run (TorchTrainer, `--workers` workers) on a fixed compute step; a checkpoint of
`--mib` MiB per rank every `--every` steps, saved and reported by mmpt's own
`jobs.checkpoint.report` to S3 (moto on 127.0.0.1), the upload mode alternating checkpoint by
checkpoint (blocking, background, blocking, ...), so both modes see the same machine at the same
time. The cost of one checkpoint is the wall time of its window (the checkpoint step and the
`every - 1` steps after it) minus as many plain steps (the median step before the first
checkpoint). CPU-seconds are of every process of the run (this driver with the S3 server, Ray's
processes, the workers): the upload is the same work either way, only where it waits differs.
Every checkpoint must be committed (Ray Train's registry) for the figures to print.

    .venv/bin/python -m benchmarks.checkpoint [--mib 48] [--every 6] [--checkpoints 6] [--workers 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from typing import Any


class _Engine:
    """What jobs.checkpoint needs of DeepSpeed's engine: a save that writes `mib` MiB of tensors."""

    def __init__(self, mib: int) -> None:
        import torch

        self.state = {f"w{i}": torch.randn(1024, 256) for i in range(mib)}  # 1 MiB each

    def save_checkpoint(self, folder: str, tag: str) -> None:
        import torch

        os.makedirs(os.path.join(folder, tag), exist_ok=True)
        torch.save(self.state, os.path.join(folder, tag, f"mp_rank_{os.getpid()}_model_states.pt"))


def _cpu_seconds(root_pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _train(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from jobs import checkpoint as ckpt

    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(1)
    engine, state = _Engine(config["mib"]), ckpt.TrainerState()
    a = torch.randn(192, 192)
    log: list[dict[str, float]] = []
    for step in range(1, config["steps"] + 1):
        t0, c0 = time.perf_counter(), _cpu_seconds(config["driver_pid"]) if rank == 0 else 0.0
        for _ in range(config["matmuls"]):
            a = torch.tanh(a @ a)  # the step's compute: fixed work
        state.step = step
        metrics = {"step": step}
        if step % config["every"] == 0:
            index = step // config["every"] - 1
            background = index % 2 == 1
            ckpt.report(metrics, engine, state, rank, {"epoch": 0, "unit": 0, "offset": step},
                        background=background)
        else:
            ray.train.report(metrics)
        if rank == 0:
            log.append({"step": step, "wall": time.perf_counter() - t0,
                        "cpu": _cpu_seconds(config["driver_pid"]) - c0})
    if rank == 0:
        import json

        with open(config["out"], "w") as f:
            json.dump(log, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=48, help="checkpoint size per rank")
    parser.add_argument("--every", type=int, default=6, help="steps between checkpoints")
    parser.add_argument("--checkpoints", type=int, default=6, help="checkpoints in all (half in each mode)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--matmuls", type=int, default=60, help="work per step")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION":
                       "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(key, value)

    import tempfile

    import boto3
    import ray
    import ray.train
    from moto.server import ThreadedMotoServer
    from ray.train.torch import TorchTrainer

    from jobs import storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    warm = args.every - 1
    steps = args.every * args.checkpoints + args.every - 1  # the last window ends before the run does
    out = os.path.join(tempfile.mkdtemp(prefix="mmpt-ckpt-bench-"), "steps.json")
    ray.init(num_cpus=args.workers + 1, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        fs, root = storage.filesystem_for("s3://bench/runs", storage.StorageOptions(endpoint_url=endpoint))
        trainer = TorchTrainer(
            _train, train_loop_config={"mib": args.mib, "every": args.every, "steps": steps, "out": out,
                                       "matmuls": args.matmuls, "driver_pid": os.getpid()},
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers),
            run_config=ray.train.RunConfig(name="ckpt-bench", storage_path=root, storage_filesystem=fs,
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
        result = trainer.fit()
    finally:
        ray.shutdown()
    import json

    log = json.load(open(out))
    committed = result.checkpoint.path if result.checkpoint is not None else None
    last = args.every * args.checkpoints
    if committed is None or not committed.endswith(f"checkpoint_{last:07d}"):
        raise SystemExit(f"the last checkpoint (step {last}) was not committed: {committed}")
    base = statistics.median(r["wall"] for r in log[:warm])
    base_cpu = statistics.median(r["cpu"] for r in log[:warm])
    cost: dict[str, list[float]] = {"blocking": [], "background": []}
    on_step: dict[str, list[float]] = {"blocking": [], "background": []}
    cpu: dict[str, list[float]] = {"blocking": [], "background": []}
    for index in range(args.checkpoints):
        mode = "background" if index % 2 else "blocking"
        start = (index + 1) * args.every - 1  # 0-based position of the checkpoint step
        window = log[start:start + args.every]
        cost[mode].append(sum(r["wall"] for r in window) - base * len(window))
        on_step[mode].append(window[0]["wall"] - base)
        cpu[mode].append(sum(r["cpu"] for r in window) - base_cpu * len(window))
    mean = {m: statistics.mean(v) for m, v in cost.items()}
    print(f"checkpoint: {args.mib} MiB per rank x {args.workers} worker(s) to S3 (moto on 127.0.0.1), every "
          f"{args.every} steps, {args.checkpoints // 2} per mode, interleaved; plain step {base * 1e3:.0f} ms")
    print(f"{'':34}{'blocking':>12}{'background':>12}{'ratio':>9}")
    rows = [("step-time cost per checkpoint (s)", mean),
            ("  on the checkpoint step itself (s)", {m: statistics.mean(v) for m, v in on_step.items()}),
            ("CPU-s per checkpoint window", {m: statistics.mean(v) for m, v in cpu.items()})]
    for label, vals in rows:
        ratio = vals["blocking"] / vals["background"] if vals["background"] > 1e-9 else float("inf")
        print(f"{label:34}{vals['blocking']:12.3f}{vals['background']:12.3f}{ratio:8.1f}x")
    print(f"latest committed checkpoint: {committed}")
    server.stop()


if __name__ == "__main__":
    main()
