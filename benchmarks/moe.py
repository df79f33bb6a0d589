"""MoE layer speed against a FLOP-matched dense FFN, and dropped tokens on shapes-world batches.

Side by side in one run, for top-1 at capacity factor 1.0 / 1.25 / 2.0, top-1 dropless, top-2
(GShard) and noisy top-2:
1. ep_size 1, one process, one thread: tokens/s of the MoE layer (forward + backward) divided by
   tokens/s of a dense FFN with the same FLOPs per token (top-2: a dense FFN twice as wide), for our
   layer (indexed dispatch) and DeepSpeed's stock layer (TopKGate + MOELayer), measured in
   alternating rounds in CPU time of the thread (other processes on a shared machine do not count);
   the ratio is the median over rounds of dense time / MoE time, with its quartiles.
2. ep_size 2 across two processes (gloo on 127.0.0.1, one thread each): the same ratio in wall
   time of the slower rank, every rank holding E/2 experts and its own tokens.
3. Dropped-token fraction on shapes-world batches: the quickstart model trained a few steps per
   routing, first and last steps; DeepSpeed's gate on the same router logits as the baseline.

    .venv/bin/python benchmarks/moe.py [--tokens 4096] [--hidden 256] [--ffn 1024] [--experts 8]
                                       [--rounds 15] [--skip-ep2] [--skip-shapes]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# `python benchmarks/moe.py` puts benchmarks/ first on sys.path, where benchmarks/models.py would
# shadow the `models` package (here and in the spawned ep_size-2 processes, which re-run this file).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from models.ffn import FeedForward  # noqa: E402
from models.moe import MoEFFN, collect_stats  # noqa: E402
from models.moe.config import MoEConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    name: str
    ours: dict[str, Any]  # MoEConfig overrides
    deepspeed: dict[str, Any] | None  # deepspeed.moe.layer.MoE kwargs; None: DeepSpeed has no such gate
    k: int = 1


ROWS = [
    Row("top-1 switch, cf 1.0", dict(gate="switch", capacity_factor=1.0), dict(k=1, capacity_factor=1.0)),
    Row("top-1 switch, cf 1.25", dict(gate="switch", capacity_factor=1.25), dict(k=1, capacity_factor=1.25)),
    Row("top-1 switch, cf 2.0", dict(gate="switch", capacity_factor=2.0), dict(k=1, capacity_factor=2.0)),
    Row("top-1 switch, dropless", dict(gate="switch", dropless=True), dict(k=1, drop_tokens=False)),
    Row("top-2 gshard (2nd always), cf 1.25", dict(gate="gshard", capacity_factor=1.25,
                                                  second_expert_policy="all"),
        dict(k=2, capacity_factor=1.25), k=2),
    Row("top-2 gshard (random 2nd), cf 1.25", dict(gate="gshard", capacity_factor=1.25),
        dict(k=2, capacity_factor=1.25), k=2),
    Row("noisy top-2, dropless", dict(gate="noisy_topk", top_k=2, dropless=True), None, k=2),
]


@dataclass
class Layers:
    dense: nn.Module
    ours: MoEFFN
    stock: nn.Module | None
    stock_routes: list[Tensor] = field(default_factory=list)


def build(row: Row, D: int, F: int, E: int, ep_size: int) -> Layers:
    from deepspeed.moe.layer import MoE

    torch.manual_seed(0)
    ours = MoEFFN(D, MoEConfig(num_experts=E, ep_size=ep_size, min_capacity=0, **row.ours), expert_hidden_size=F)
    stock = None
    if row.deepspeed is not None:
        stock = MoE(D, FeedForward(D, F), num_experts=E, ep_size=ep_size, min_capacity=0,
                    eval_capacity_factor=row.deepspeed.get("capacity_factor", 1.0), **row.deepspeed)
    layers = Layers(FeedForward(D, row.k * F), ours, stock)
    if stock is not None:
        # post-capacity routes (expert -1 = dropped) for the dropped-token fraction
        stock.deepspeed_moe.gate.register_forward_hook(lambda m, a, out: layers.stock_routes.append(out[3]))
    return layers


def step_fn(module: nn.Module, kind: str, x_BSD: Tensor, mask_BS: Tensor) -> Callable[[], None]:
    params = list(module.parameters())

    def step() -> None:
        for p in params:  # as optimizer.zero_grad(set_to_none=True) would
            p.grad = None
        if kind == "dense":
            loss = module(x_BSD).sum()
        elif kind == "ours":
            y, aux, _ = module(x_BSD, mask_BS)
            loss = y.sum() + aux
        else:
            y, aux, _ = module(x_BSD)
            loss = y.sum() + aux
        loss.backward()

    return step


def measure(steps: dict[str, Callable[[], None]], rounds: int, clock: Callable[[], float],
            sync: Callable[[float], float] = lambda t: t) -> dict[str, list[float]]:
    """Alternate the steps round by round (2 warm-up rounds dropped); seconds per step."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds + 2):
        for name, step in steps.items():
            t0 = clock()
            step()
            elapsed = sync(clock() - t0)
            if r >= 2:
                times[name].append(elapsed)
    return times


def ratios(times: dict[str, list[float]], name: str) -> tuple[float, float, float]:
    """Median and quartiles over rounds of (dense time / MoE time), each round's pair measured back to
    back: slow drifts of the machine's load cancel within a pair."""
    paired = sorted(d / m for d, m in zip(times["dense"], times[name], strict=True))
    q1, med, q3 = statistics.quantiles(paired, n=4)
    return med, q1, q3


def dropped_stock(routes: list[Tensor]) -> float:
    if not routes:
        return float("nan")
    r = routes[-1]
    return float((r < 0).float().mean())


def layer_figures(row: Row, layers: Layers, x: Tensor, mask: Tensor, rounds: int, clock: Callable[[], float],
                  sync: Callable[[float], float] = lambda t: t) -> dict[str, Any]:
    steps = {"dense": step_fn(layers.dense, "dense", x, mask), "ours": step_fn(layers.ours, "ours", x, mask)}
    if layers.stock is not None:
        steps["stock"] = step_fn(layers.stock, "stock", x, mask)
    times = measure(steps, rounds, clock, sync)
    N = x.shape[0] * x.shape[1]
    out: dict[str, Any] = {"dense_tps": N / statistics.median(times["dense"])}
    for name in steps:
        if name != "dense":
            out[f"{name}_tps"] = N / statistics.median(times[name])
            out[f"{name}_ratio"], out[f"{name}_q1"], out[f"{name}_q3"] = ratios(times, name)
    out["ours_dropped"] = float(layers.ours.last_stats.dropped)
    out["stock_dropped"] = dropped_stock(layers.stock_routes)
    return out


def print_layer_table(title: str, results: dict[str, dict[str, Any]]) -> None:
    print(title)
    print(f"  {'routing':36s} {'dense tok/s':>11s} | {'ours tok/s':>10s} {'ratio [quartiles]':>19s} {'dropped':>7s} | "
          f"{'DeepSpeed tok/s':>15s} {'ratio [quartiles]':>19s} {'dropped':>7s}")

    def ratio(r: dict[str, Any], who: str) -> str:
        return f"{r[who + '_ratio']:5.3f} [{r[who + '_q1']:.2f}-{r[who + '_q3']:.2f}]"

    for name, r in results.items():
        stock = (f"{r['stock_tps']:15.0f} {ratio(r, 'stock'):>19s} {100 * r['stock_dropped']:6.1f}%"
                 if "stock_tps" in r else f"{'(no such gate)':>15s} {'-':>19s} {'-':>7s}")
        print(f"  {name:36s} {r['dense_tps']:11.0f} | {r['ours_tps']:10.0f} {ratio(r, 'ours'):>19s} "
              f"{100 * r['ours_dropped']:6.1f}% | {stock}")
    print("  ratio = MoE tokens/s / tokens/s of a FLOP-matched dense FFN (top-2 rows: a dense FFN twice as "
          "wide), median over rounds of the per-round ratio [quartiles]; tok/s from median times")


def _inputs(args: argparse.Namespace, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, args.tokens, args.hidden, generator=g)
    return x, torch.ones(1, args.tokens, dtype=torch.long)


# -- 1. one process ----------------------------------------------------------------------------


def single_process(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    x, mask = _inputs(args, 0)
    results = {}
    for row in ROWS:
        layers = build(row, args.hidden, args.ffn, args.experts, ep_size=1)
        results[row.name] = layer_figures(row, layers, x, mask, args.rounds, time.thread_time)
    print_layer_table(
        f"\n[1] ep_size 1, one process, 1 thread: MoE layer fwd+bwd vs FLOP-matched dense FFN "
        f"(D={args.hidden}, F={args.ffn}, E={args.experts}, {args.tokens} tokens, random inputs; "
        f"CPU time of the thread, {args.rounds} alternating rounds)", results)


# -- 2. two processes --------------------------------------------------------------------------


def _ep_worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)

    def slowest(t: float) -> float:
        v = torch.tensor([t], dtype=torch.float64)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return float(v)

    try:
        x, mask = _inputs(args, rank)
        results = {}
        for row in ROWS:
            layers = build(row, args.hidden, args.ffn, args.experts, ep_size=2)
            layers.ours.moe.set_deepspeed_parallelism()
            if layers.stock is not None:
                layers.stock.set_deepspeed_parallelism()
            results[row.name] = layer_figures(row, layers, x, mask, args.rounds, time.perf_counter, slowest)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def two_processes(args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "ep2.json"))
        mp.spawn(_ep_worker, args=(port, args, out), nprocs=2, join=True)
        results = json.loads(Path(out).read_text())
    print_layer_table(
        f"\n[2] ep_size 2 across 2 processes (gloo, 1 thread each; {args.experts // 2} experts and "
        f"{args.tokens} tokens per rank): wall time of the slower rank, {args.rounds} alternating "
        "rounds", results)


# -- 3. shapes world ---------------------------------------------------------------------------


def shapes_batches(n: int, image_size: int, max_len: int, batch: int) -> tuple[list[dict[str, Tensor]], Any]:
    import random

    import numpy as np

    from jobs.data.batch import to_model_batch
    from jobs.data.synth import make_sample
    from jobs.data.tokenizer import encode, text_spec, train_tokenizer

    rng = random.Random(0)
    samples = [make_sample(rng, image_size) for _ in range(n)]
    captions = [c for _, c, _ in samples]
    tok = train_tokenizer(captions)
    ids, attn = encode(tok, captions, max_len)
    images = np.stack([np.asarray(img.convert("RGB")).transpose(2, 0, 1) for img, _, _ in samples])
    out = []
    for i in range(0, n - batch + 1, batch):
        raw = {"image": torch.from_numpy(images[i:i + batch]), "input_ids": torch.from_numpy(ids[i:i + batch]),
               "attention_mask": torch.from_numpy(attn[i:i + batch]),
               "obj_labels": torch.full((batch, 3), -1), "obj_boxes": torch.zeros(batch, 3, 4),
               "sample_id": torch.arange(i, i + batch)}
        out.append(to_model_batch(raw))
    return out, text_spec(tok, max_len)


def _deepspeed_dropped(model: nn.Module, row: Row, batch: dict[str, Tensor]) -> float:
    """DeepSpeed's gating function on our router's logits for the same hidden states (its capacity
    counts padding, and its top-2 routes padding too)."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating

    captured: list[tuple[Tensor, Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: captured.append((a[0].detach(), a[1])))
             for m in model.modules() if isinstance(m, MoEFFN)]
    model.eval()
    with torch.no_grad():
        model(batch)
    model.train()
    for h in hooks:
        h.remove()
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    drops, routes = 0, 0
    # each view of the batch (ITM negatives...) passes through every MoE layer in order
    for (x_BSD, mask_BS), layer in zip(captured, itertools.cycle(layers)):
        logits = torch.nn.functional.linear(x_BSD.reshape(-1, x_BSD.shape[-1]).float(), layer.gate.wg.weight.float())
        used = mask_BS.reshape(-1).long()
        cf = row.deepspeed.get("capacity_factor", 1.0)
        drop = row.deepspeed.get("drop_tokens", True)
        if row.k == 1:
            *_, idx, _, _, _ = top1gating(logits, cf, 0, used, drop_tokens=drop, sparse_routes=True)
        else:
            *_, idx, _, _, _ = top2gating(logits, cf, 0, drop_tokens=drop, sparse_routes=True)
        real = idx[:, used.bool()]  # count routes of real tokens only
        drops += int((real < 0).sum())
        routes += real.numel()
    return drops / max(routes, 1)


def shapes_world(args: argparse.Namespace) -> None:
    from models import build_pretrainer
    from models.config import ImageSpec
    from orchestrator.config import load_config

    torch.set_num_threads(1)
    base = load_config(ROOT / "jobs/configs/quickstart.yaml")
    batches, text = shapes_batches(args.shape_samples, base.data.image_size, base.data.max_text_len,
                                   base.train.batch_size)
    print(f"\n[3] dropped share of routes on shapes-world batches: quickstart model ({base.model.num_layers} "
          f"layers, D={base.model.hidden_size}, E={base.moe.num_experts}, MoE every other layer, batch "
          f"{base.train.batch_size}), {args.shape_steps} AdamW steps per routing, ep_size 1")
    print(f"  {'routing':36s} {'step 1':>8s} {f'last {args.shape_last}':>8s} | "
          f"{'DeepSpeed gate, same logits (step 1 / last)':>44s}")
    for row in ROWS:
        moe = base.moe.model_copy(update={"ep_size": 1, **row.ours})
        moe = MoEConfig.model_validate(moe.model_dump())
        torch.manual_seed(0)
        model = build_pretrainer(base.model, moe, base.active_objectives, text, ImageSpec(size=base.data.image_size))
        opt = torch.optim.AdamW(model.parameters(), lr=base.train.lr)
        history, ds_first, ds_last = [], float("nan"), float("nan")
        for step in range(args.shape_steps):
            batch = batches[step % len(batches)]
            if row.deepspeed is not None and step == 0:
                ds_first = _deepspeed_dropped(model, row, batch)
            out = model(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            history.append(collect_stats(model)["moe/dropped"])
        if row.deepspeed is not None:
            ds_last = _deepspeed_dropped(model, row, batches[0])
        last = statistics.mean(history[-args.shape_last:])
        ds = f"{100 * ds_first:5.1f}% / {100 * ds_last:5.1f}%" if row.deepspeed is not None else "-"
        print(f"  {row.name:36s} {100 * history[0]:7.1f}% {100 * last:7.1f}% | {ds:>44s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--shape-samples", type=int, default=256)
    ap.add_argument("--shape-steps", type=int, default=30)
    ap.add_argument("--shape-last", type=int, default=10)
    ap.add_argument("--skip-ep2", action="store_true")
    ap.add_argument("--skip-shapes", action="store_true")
    args = ap.parse_args()
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    single_process(args)
    if not args.skip_ep2:
        two_processes(args)
    if not args.skip_shapes:
        shapes_world(args)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
