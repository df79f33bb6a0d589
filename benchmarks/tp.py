"""Megatron tensor parallelism, tp 1 vs tp 2 side by side on 2 ranks: step time and per-rank
parameter bytes (#15).

Two gloo processes (CPU, DeepSpeed engines built by jobs.engine.build_engine from one RunConfig,
ZeRO-1, fp32), the same model (a ViLT-style single-stream encoder, no MoE) at each setting:
- tp 1: 2 data-parallel ranks, each a whole copy of the model, each its own batch of B samples;
- tp 2: 1 data-parallel group of 2 ranks, each half of every attention and FFN matrix (Megatron's
  column / row split, jobs/tensor_parallel.py), both computing the same B samples.
The settings alternate round by round (the first one changes every round), so drift hits both
alike. Per rank: model-state bytes (jobs/memory.measure_model_states) beside what `mmpt plan`
counts for the setting, and the median step time (forward + backward + optimizer step) and CPU
seconds per step of the rank. Samples per second are global: B x dp / step time. On CPUs, tp buys
memory, not speed (each layer adds an all-reduce in forward and backward; the matmuls are halved).

    .venv/bin/python -m benchmarks.tp [--hidden 256] [--layers 4] [--heads 4] [--batch 8] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

VOCAB = 1000
WORLD = 2


def _cfg(args: argparse.Namespace, tp: int) -> Any:
    from jobs.config import RunConfig

    return RunConfig.model_validate({
        "model": {"preset": "vilt", "hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
                  "dropout": 0.0},
        "parallel": {"tp_size": tp},
        "moe": {"num_experts": 0},
        "data": {"image_size": 32, "max_text_len": 24},
        "train": {"batch_size": args.batch, "precision": "fp32"},
        "deepspeed": {"zero_stage": 1},
        "scaling": {"num_workers": WORLD},
    })


def _setting(rank: int, args: argparse.Namespace, tp: int) -> dict[str, float]:
    import torch

    from jobs.engine import build_engine
    from jobs.memory import measure_model_states, watch_gradients
    from models import build_pretrainer
    from models.config import ImageSpec, TextSpec

    cfg = _cfg(args, tp)
    torch.manual_seed(0)
    model = build_pretrainer(cfg.model, cfg.moe, cfg.active_objectives, TextSpec(vocab_size=VOCAB, max_len=24),
                             ImageSpec(size=32))
    engine = build_engine(cfg, model)
    watch_gradients(engine)
    gen = torch.Generator().manual_seed(rank // tp)  # the ranks of a tp group compute the same samples
    batches = [{"image": torch.randn(args.batch, 3, 32, 32, generator=gen),
                "input_ids": torch.randint(5, VOCAB, (args.batch, 24), generator=gen),
                "attention_mask": torch.ones(args.batch, 24, dtype=torch.long)} for _ in range(args.steps + 2)]
    wall, cpu, memory = [], [], {}
    for i, batch in enumerate(batches):
        torch.manual_seed(1000 + i)  # masking draws: the same on the ranks of a tp group
        t0, c0 = time.perf_counter(), time.process_time()
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        if i == 0:
            memory = measure_model_states(engine)
        if i >= 2:  # two warm-up steps
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    engine.destroy()
    return {"params_bytes": memory["memory/params_bytes"], "total_bytes": memory["memory/total_bytes"],
            "step_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "tp": memory["memory/tp"],
            "dp": memory["memory/dp"]}


def _worker(rank: int, port: int, args: argparse.Namespace, out: str, tp: int, tag: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import logging

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    Path(out, f"{tag}-rank{rank}.json").write_text(json.dumps(_setting(rank, args, tp)))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="samples per rank and step")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per setting and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch.multiprocessing as mp

    from orchestrator.run.memory_plan import count_model, estimate

    # a fresh pair of processes per setting and round: DeepSpeed keeps its tensor-parallel groups in
    # module state, so an engine of another tp size cannot follow in the same process
    per_setting: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as out:
        for r in range(args.rounds):
            for tp in ((1, 2) if r % 2 == 0 else (2, 1)):
                tag = f"r{r}-tp{tp}"
                mp.start_processes(_worker, args=(_free_port(), args, out, tp, tag), nprocs=WORLD, join=True,
                                   start_method="spawn")
                per_setting[tp] += [json.loads(Path(out, f"{tag}-rank{k}.json").read_text()) for k in range(WORLD)]
    print(f"vilt, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, fp32, ZeRO-1, {WORLD} ranks (gloo, "
          f"1 thread each), batch {args.batch} per rank, {args.steps} timed steps x {args.rounds} rounds, alternating")
    print(f"{'setting':<14}{'params/rank':>12}{'planned':>10}{'states/rank':>13}{'step (med)':>12}"
          f"{'CPU-s/step':>12}{'samples/s':>11}")
    rows = {}
    for tp in (1, 2):
        cfg = _cfg(args, tp)
        plan = estimate(cfg, count_model(cfg, VOCAB), gpus=WORLD, stage=1, ep=1)
        per = per_setting[tp]
        step = statistics.median(p["step_s"] for p in per)
        cpu = statistics.median(p["cpu_s"] for p in per)
        params = max(p["params_bytes"] for p in per)
        states = max(p["total_bytes"] for p in per)
        dp = int(per[0]["dp"])
        rows[tp] = (params, step)
        print(f"{f'tp {tp} x dp {dp}':<14}{params / 2**20:>10.2f} M{plan.params / 2**20:>8.2f} M{states / 2**20:>11.2f} M"
              f"{step * 1e3:>10.1f} ms{cpu:>12.3f}{args.batch * dp / step:>11.1f}")
    print(f"tp 2 / tp 1: parameter bytes per rank {rows[2][0] / rows[1][0]:.3f} (baseline tp 1 = 1.000), "
          f"step time {rows[2][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
