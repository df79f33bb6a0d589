"""What mmpt's orchestration costs per training step: mmpt (Ray Data + Ray Train + DeepSpeed) against a
plain torch.distributed loop with the same DeepSpeed engine, side by side in one run.

Both train the same model (jobs/configs/quickstart.yaml, shrunk by the overrides below) on the same
synthetic shards for the same steps on 2 ranks (gloo, 1 CPU thread each):
- mmpt: `orchestrator.run.runner.run`, a fresh local Ray per run; its per-report `step_time_s`.
- plain: 2 processes (torch.multiprocessing + gloo), `jobs.engine.build_engine` on the same config,
  each rank reading its shards (rank::world) in-process with the function the pipeline's Ray Data
  tasks run (`jobs.data.pipeline._unit_batches`: read, decode, tokenize) and the same
  `jobs.data.batch.to_model_batch`, no prefetching; step time measured exactly as the train loop
  does (report windows of `log_every` steps, the report's own work outside the window).
The machine is noisy, so the two run in turn (alternating which goes first) for several pairs; the
figure is the median over pairs of (mmpt mean steady step time / plain mean steady step time),
first and last reports excluded (the first holds the start of the data pipeline; mmpt's reports are
timed where its driver sees them, and the last one arrives after the training thread has ended).
Report windows are split in two: steady ones, and those holding an epoch boundary (the first step
of an epoch: steps_per_epoch = samples per rank // batch, the same on both sides), each side's mean
shown for both kinds. CPU cost counts every process of each side (benchmarks/cputime.py: mmpt's
driver, Ray's GCS, raylet, workers and Ray Data tasks; plain's ranks), as CPU-seconds per steady step. Start-up is measured
from the same point on both sides (the benchmark hands the config over: `run(...)` / `mp.spawn`)
to the end of the first step, estimated as (time of the first report) - (log_every - 1) x (steady
step time). Where a step's time goes: each rank's training thread (the busiest thread of a Ray Train
worker or a plain rank) per steady step, from Linux's /proc/<pid>/task/<tid>/schedstat: time on a
CPU, time runnable but waiting for a CPU (another process had it), and the rest asleep (waiting for
the other rank inside a collective, for data, or for the GIL another thread of the process holds).

    flock /tmp/mmpt-ray.lock .venv/bin/python benchmarks/overhead.py [--pairs 3] [--steps 80] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# `python benchmarks/overhead.py` puts benchmarks/ first on sys.path, where a sibling script named like
# a package (benchmarks/models.py) would shadow it: import the repository's packages, never siblings.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from benchmarks.cputime import TreeCPU  # noqa: E402 - after the path fix

WORLD = 2  # ranks by default (--set scaling.num_workers=N for another count)
SAMPLES = 1024  # 4 shards; 32 steps per epoch at batch 16 per rank
BENCH = {"data.image_size": 32, "data.max_text_len": 24, "data.eval": "null", "train.batch_size": 16,
         "train.log_every": 10, "train.checkpoint_every": 0, "train.warmup_steps": 5,
         "scaling.num_workers": WORLD, "scaling.cpus_per_worker": 1}


@dataclass
class Timing:
    steady_step_s: float  # mean step time over the steady reports after the first
    boundary_step_s: float  # mean step time over the reports whose window holds an epoch boundary (nan: none)
    steady_wait_s: float  # of which waiting for the next batch (mean over ranks)
    boundary_wait_s: float
    cpu_per_step_s: float  # CPU-seconds of every process of the side per steady step
    startup_s: float  # launch -> end of the first step (estimated, see the module doc)
    cpu_by_kind: dict[str, float]  # CPU-seconds per step by process kind, first report to the one before the last
    # Each rank's training thread per steady step (mean over ranks): seconds on a CPU, seconds
    # runnable but waiting for a CPU (preempted by another process), the rest of the step asleep
    # (waiting for the other rank in a collective, for data, or for the GIL another thread holds).
    thread_cpu_s: float
    thread_runqueue_s: float


@dataclass
class Window:
    step: int  # the last step of the report window
    at: float  # wall time (time.time()) the report was seen
    step_s: float
    wait_s: float


def _holds_boundary(w: Window, log_every: int, steps_per_epoch: int) -> bool:
    first = w.step - log_every + 1  # the window holds steps first..w.step
    return any((s - 1) % steps_per_epoch == 0 and s > 1 for s in range(first, w.step + 1))


def _mean(xs: list[float]) -> float:
    return statistics.mean(xs) if xs else float("nan")


def _timing(windows: list[Window], t0: float, log_every: int, steps_per_epoch: int, cpu: TreeCPU) -> Timing:
    # not the first report (it holds the pipeline's start) nor the last: mmpt's reports are timed where
    # the driver sees them, a poll or two after the rank made them, and the last one arrives after
    # the training thread is gone (its window would hold idle time on the CPU-time side)
    later = windows[1:-1]
    steady = [w for w in later if not _holds_boundary(w, log_every, steps_per_epoch)]
    boundary = [w for w in later if _holds_boundary(w, log_every, steps_per_epoch)]
    step_s = _mean([w.step_s for w in steady])
    # CPU over consecutive steady windows: from the report before each one to its own report
    prev = {id(b): a for a, b in zip(windows, windows[1:], strict=False)}
    cpu_s = sum(cpu.between(prev[id(w)].at, w.at) for w in steady)
    steps = sum(w.step - prev[id(w)].step for w in steady)
    last = windows[-2] if len(windows) > 2 else windows[-1]  # the last report lands after the workers exit
    span = max(last.step - windows[0].step, 1)
    by_kind = {k: v / span for k, v in cpu.parts_between(windows[0].at, last.at).items()}
    # per step of each (steady window, rank): its training thread's CPU and run-queue seconds
    per_step = [(c / (w.step - prev[id(w)].step), d / (w.step - prev[id(w)].step))
                for w in steady for c, d in cpu.busiest_threads_between(prev[id(w)].at, w.at)]
    return Timing(step_s, _mean([w.step_s for w in boundary]), _mean([w.wait_s for w in steady]),
                  _mean([w.wait_s for w in boundary]), cpu_s / max(steps, 1),
                  windows[0].at - t0 - (log_every - 1) * step_s, by_kind,
                  _mean([c for c, _ in per_step]), _mean([d for _, d in per_step]))


# -- mmpt ---------------------------------------------------------------------------------------------

def _mmpt(cfg: Any, steps_per_epoch: int) -> Timing:
    from rich.console import Console

    from orchestrator.run.runner import run

    with TreeCPU(sched_kinds=("ray::RayTrainWorker",)) as cpu:
        t0 = time.time()
        result = run(cfg, console=Console(quiet=True), fresh=True)
    windows = [Window(r["step"], r["time"], r["step_time_s"], r["data_wait_s"])
               for r in result.metrics if "step_time_s" in r]
    return _timing(windows, t0, cfg.train.log_every, steps_per_epoch, cpu)


# -- plain torch.distributed ----------------------------------------------------------------------

def _batches(shards: list[str], spec: Any, batch_size: int):  # noqa: ANN202 - Iterator[dict[str, Tensor]]
    """This rank's shards, read and preprocessed in-process by the function each Ray Data task of
    the pipeline runs (one shard -> columnar batches), re-cut to `batch_size`, forever."""
    import numpy as np
    import torch

    from jobs.data.local import local_items
    from jobs.data.pipeline import _unit_batches

    pending: dict[str, Any] | None = None
    while True:
        for shard in shards:
            for cols in _unit_batches(local_items([shard], spec), spec, seed=None, epoch=0, ledger=None):
                pending = cols if pending is None else {k: np.concatenate([pending[k], cols[k]]) for k in cols}
                while len(pending["input_ids"]) >= batch_size:
                    yield {k: torch.from_numpy(v[:batch_size]) for k, v in pending.items()}
                    pending = {k: v[batch_size:] for k, v in pending.items()}


def _plain_worker(rank: int, port: int, run: dict[str, Any], text: dict[str, int], spec: Any,
                  shards: list[str], result_file: str) -> None:
    world = int(run["scaling"]["num_workers"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import logging
    import warnings

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - DeepSpeed's op-builder and group prints; errors still raise
    warnings.filterwarnings("ignore")

    import torch
    import torch.distributed as dist

    from jobs.config import RunConfig
    from jobs.data.batch import to_model_batch
    from jobs.engine import build_engine, diversify_experts
    from models import build_pretrainer
    from models.config import ImageSpec, TextSpec

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    cfg = RunConfig.model_validate(run)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(cfg.train.seed)  # the same initialisation as jobs/train_loop.py
    model = build_pretrainer(cfg.model, cfg.moe, cfg.active_objectives, TextSpec(**text),
                             ImageSpec(size=cfg.data.image_size))
    if cfg.moe.enabled:
        diversify_experts(model, cfg.train.seed, ep_rank=rank % cfg.moe.ep_size)
    engine = build_engine(cfg, model)
    torch.manual_seed(cfg.train.seed * 1000 + rank + 1)
    batches = _batches(shards[rank::world], spec, cfg.train.batch_size)

    windows: list[list[float]] = []  # [step, wall time, step time, wait]
    t0, loss, wait = time.perf_counter(), 0.0, 0.0
    for step in range(1, cfg.train.steps + 1):
        t_wait = time.perf_counter()
        raw = next(batches)
        wait += time.perf_counter() - t_wait
        batch = to_model_batch(raw, engine.device, torch.float32)
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        loss += out["loss"].item()
        if step % cfg.train.log_every == 0:
            elapsed = time.perf_counter() - t0
            means = torch.tensor([loss, wait]) / cfg.train.log_every
            dist.all_reduce(means)  # what a plain loop logs; outside the window, as in the train loop
            windows.append([step, time.time(), elapsed / cfg.train.log_every, float(means[1]) / world])
            t0, loss, wait = time.perf_counter(), 0.0, 0.0
    if rank == 0:
        Path(result_file).write_text(json.dumps(windows))
    dist.destroy_process_group()


def _plain(cfg: Any, data: Path, tmp: Path, steps_per_epoch: int) -> Timing:
    import torch.multiprocessing as mp

    from jobs import storage
    from jobs.data.pipeline import PipelineSpec
    from jobs.data.tokenizer import load_tokenizer, text_spec

    opts = storage.StorageOptions()
    shards = storage.expand_shards(str(data / "train"), opts)
    tokenizer = str(data / "tokenizer.json")
    ts = text_spec(load_tokenizer(tokenizer, opts), cfg.data.max_text_len)
    text = {k: getattr(ts, k) for k in ("vocab_size", "max_len", "pad_id", "unk_id", "cls_id", "sep_id", "mask_id")}
    spec = PipelineSpec(tokenizer_uri=tokenizer, image_size=cfg.data.image_size, max_text_len=cfg.data.max_text_len,
                        max_objects=cfg.data.max_objects, storage=opts)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / "plain.json"
    # the spawned ranks only: not multiprocessing's resource tracker, whose idle thread averaged in
    # as a "rank" halved the training-thread figures of a 1-rank run (a third off at 2 ranks)
    with TreeCPU(sched_kinds=("mp-spawn",)) as cpu:
        t0 = time.time()
        mp.spawn(_plain_worker, args=(port, cfg.to_dict(), text, spec, shards, str(out)), nprocs=cfg.scaling.num_workers, join=True)
    windows = [Window(int(step), at, step_s, wait) for step, at, step_s, wait in json.loads(out.read_text())]
    return _timing(windows, t0, cfg.train.log_every, steps_per_epoch, cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "jobs/configs/quickstart.yaml"))
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--old-set", dest="old_set", action="append", default=[],
                    help="overrides that restore an old behaviour: adds an mmpt-old side run with them")
    args = ap.parse_args()

    from jobs.data.synth import write_synthetic
    from orchestrator.config import load_config

    with tempfile.TemporaryDirectory(prefix="mmpt-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        write_synthetic(str(data), samples=SAMPLES, shards=4, seed=1, image_size=32, eval_samples=64)
        sets = {**BENCH, "data.train": str(data / "train"), "storage.path": str(tmp), "train.steps": args.steps}
        cfg = load_config(args.config, [f"{k}={v}" for k, v in sets.items()] + args.overrides)
        print(f"overhead: {args.config} ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
              f"{cfg.moe.num_experts} experts), {cfg.scaling.num_workers} ranks x {cfg.scaling.cpus_per_worker:g} CPU, "
              f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.train.precision}, batch {cfg.train.batch_size}/rank, "
              f"{args.steps} steps, reports every {cfg.train.log_every} (first and last excluded), {args.pairs} pairs",
              flush=True)
        sides = ["mmpt", "plain"] + (["mmpt-old"] if args.old_set else [])
        old_cfg = load_config(args.config, [f"{k}={v}" for k, v in sets.items()] + args.overrides + args.old_set)
        steps_per_epoch = (SAMPLES // cfg.scaling.num_workers) // cfg.train.batch_size
        got: dict[str, list[Timing]] = {side: [] for side in sides}
        for pair in range(args.pairs):
            order = sides[pair % len(sides):] + sides[:pair % len(sides)]  # rotate who goes first
            for who in order:
                side_cfg = (old_cfg if who == "mmpt-old" else cfg).model_copy(update={"name": f"overhead-{pair}"})
                got[who].append(_plain(side_cfg, data, tmp, steps_per_epoch) if who == "plain"
                                else _mmpt(side_cfg, steps_per_epoch))
            line = [f"pair {pair + 1} ({order[0]} first):"]
            for who in sides:
                t = got[who][-1]
                line.append(f"{who} {1000 * t.steady_step_s:.1f} ms/step (wait {1000 * t.steady_wait_s:.1f}; "
                            f"epoch-boundary windows {1000 * t.boundary_step_s:.1f}, wait {1000 * t.boundary_wait_s:.1f}), "
                            f"{t.cpu_per_step_s:.3f} CPU-s/step, first step at {t.startup_s:.1f} s; "
                            f"a rank's training thread per step: {1000 * t.thread_cpu_s:.1f} ms on a CPU, "
                            f"{1000 * t.thread_runqueue_s:.1f} ms waiting for one, "
                            f"{1000 * (t.steady_step_s - t.thread_cpu_s - t.thread_runqueue_s):.1f} ms asleep);")
            print(" ".join(line), flush=True)
            for who in sides:
                parts = sorted(got[who][-1].cpu_by_kind.items(), key=lambda kv: -kv[1])
                print(f"  {who} CPU-s/step by process: " + ", ".join(f"{k} {v:.3f}" for k, v in parts if v >= 0.0005),
                      flush=True)
    plain = got["plain"]
    for who in [s for s in sides if s != "plain"]:
        ratios = [m.steady_step_s / p.steady_step_s for m, p in zip(got[who], plain, strict=True)]
        boundary = [m.boundary_step_s / p.boundary_step_s for m, p in zip(got[who], plain, strict=True)]
        cpu = [m.cpu_per_step_s / p.cpu_per_step_s for m, p in zip(got[who], plain, strict=True)]
        print(f"{who}/plain steady step time: {statistics.median(ratios):.2f} (min {min(ratios):.2f}, "
              f"max {max(ratios):.2f}; median of {len(ratios)} interleaved pairs); epoch-boundary windows "
              f"{statistics.median(boundary):.2f}; CPU-seconds per step {statistics.median(cpu):.2f}")
    for who in sides:
        print(f"start-up, median time to first step: {who} {statistics.median(t.startup_s for t in got[who]):.1f} s")
    print("where a steady step's time goes, per rank's training thread (median over pairs, ms): on a CPU / "
          "runnable, waiting for a CPU / asleep")
    for who in sides:
        ts = got[who]
        on, rq = statistics.median(t.thread_cpu_s for t in ts), statistics.median(t.thread_runqueue_s for t in ts)
        step = statistics.median(t.steady_step_s for t in ts)
        print(f"  {who:9s} step {1000 * step:6.1f} = {1000 * on:6.1f} on a CPU + {1000 * rq:5.1f} waiting for a CPU "
              f"+ {1000 * (step - on - rq):5.1f} asleep")


if __name__ == "__main__":
    main()
