"""MoE cost as the number of experts grows, old dispatch vs new, and routing on shapes-world images.

Side by side in one run:

1. ep_size 1, one process, one thread, at the model's shapes (quickstart: D 128, F 256, a micro-batch
   of ~2k tokens) for E in {4, 16, 64, 256}: tokens/s of the MoE layer (forward + backward) over
   tokens/s of a dense FFN with the same FLOPs per token (top-2: a dense FFN twice as wide), for
   - old: the previous indexed dispatch (a Python loop over DeepSpeed's per-expert modules, two
     sorts per layer, an fp32 combine buffer, a host sync; benchmarks/moe_old.py) on the router
     composed of torch ops under autograd;
   - grouped, masked: stacked expert weights, autograd over one grouped GEMM per projection on all
     rows, masked (f7e9d96; now the GPU path), the dispatch buffer filled from the gate's slots,
     the composed router;
   - new: the same layer with the CPU path: only the kept rows, one hand-written autograd function,
     weight gradients into reused buffers (models/moe/host_experts.GradBuffers), and a Switch
     router in one autograd function (models/moe/routing._Top1Router);
   - DeepSpeed's stock layer (TopKGate + MOELayer, capacity-padded buffers).
   Only computed tokens count: a dropped route is not throughput, so a capacity row's ratio is
   (kept routes / k) / time against the dense FFN's tokens / time, and its `dropped` column says how
   many routes were dropped. CPU time of the thread, rounds alternated, median of per-round ratios.
2. ep_size 2 across two processes (gloo on 127.0.0.1, one thread each): the same ratio (new layer) in
   wall time of the slower rank.
3. Routing on shapes-world batches (quickstart model, same batches, same seed and steps for every
   routing): share of real text and image tokens that no expert processed (step 1 and the last
   steps), and the loss; for Switch top-1 at capacity factor 1.25, expert choice (capacity factor
   1.0: the same expert compute as top-1), auxiliary-loss-free bias balancing (top-1, cf 1.25) and
   dropless top-1.

    .venv/bin/python -m benchmarks.moe [--tokens 2048] [--experts 4 16 64 256] [--rounds 12]
                                       [--skip-ep2] [--skip-shapes]   (the parts: benchmarks/moe_cost.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import socket
import statistics
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.moe_old import OldIndexedLayer  # noqa: E402
from jobs.worker_host import setup_worker_host  # noqa: E402
from models.ffn import FeedForward  # noqa: E402
from models.moe import MoEFFN, collect_stats  # noqa: E402
from models.moe.config import MoEConfig  # noqa: E402
from models.moe.gates import Gate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


@dataclass(frozen=True)
class Row:
    name: str
    ours: dict[str, Any]  # MoEConfig overrides
    deepspeed: dict[str, Any] | None  # deepspeed.moe.layer.MoE kwargs; None: DeepSpeed has no such gate
    k: int = 1


ROWS = [
    Row("top-1 switch, cf 1.25", dict(gate="switch", capacity_factor=1.25), dict(k=1, capacity_factor=1.25)),
    Row("top-1 switch, dropless", dict(gate="switch", dropless=True), dict(k=1, drop_tokens=False)),
    Row("top-2 gshard (2nd always), cf 1.25", dict(gate="gshard", capacity_factor=1.25, second_expert_policy="all"),
        dict(k=2, capacity_factor=1.25), k=2),
]

# -- measuring -----------------------------------------------------------------------------------


def step_fn(module: nn.Module, kind: str, x_BSD: Tensor, mask_BS: Tensor) -> Callable[[], None]:
    params = list(module.parameters())

    def step() -> None:
        for p in params:  # as optimizer.zero_grad(set_to_none=True) would
            p.grad = None
        if kind == "dense":
            loss = module(x_BSD).sum()
        elif kind == "stock":
            y, aux, _ = module(x_BSD)
            loss = y.sum() + aux
        else:
            y, aux, _ = module(x_BSD, mask_BS)
            loss = y.sum() + aux
        loss.backward()

    return step


def measure(steps: dict[str, Callable[[], None]], rounds: int, clock: Callable[[], float],
            sync: Callable[[float], float] = lambda t: t, faults: dict[str, list[int]] | None = None
            ) -> dict[str, list[float]]:
    """Alternate the steps round by round (2 warm-up rounds dropped); seconds per step (and, into
    `faults`, the page faults of this thread per step)."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds + 2):
        for name, step in steps.items():
            f0 = resource.getrusage(RUSAGE_THREAD).ru_minflt
            t0 = clock()
            step()
            elapsed = sync(clock() - t0)
            if r >= 2:
                times[name].append(elapsed)
                if faults is not None:
                    faults.setdefault(name, []).append(resource.getrusage(RUSAGE_THREAD).ru_minflt - f0)
    return times


def _ratio(times: dict[str, list[float]], name: str, kept_share: float) -> tuple[float, float, float]:
    """Median and quartiles over rounds of (dense time / MoE time) x kept share of the routes."""
    paired = sorted(kept_share * d / m for d, m in zip(times["dense"], times[name], strict=True))
    q1, med, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
    return med, q1, q3


def _kept_share(counts: Tensor, real_tokens: int, k: int) -> float:
    return float(counts.sum()) / (k * real_tokens)


def build(row: Row, D: int, F: int, E: int, ep_size: int, with_old: bool = True) -> dict[str, nn.Module]:
    from deepspeed.moe.layer import MoE

    torch.manual_seed(0)
    new = MoEFFN(D, MoEConfig(num_experts=E, ep_size=ep_size, min_capacity=0, **row.ours), expert_hidden_size=F)
    layers: dict[str, nn.Module] = {"dense": FeedForward(D, row.k * F), "new": new}
    if with_old:
        layers["old"] = OldIndexedLayer(new)
        # f7e9d96's experts: autograd over grouped_mm on all rows, masked (now the GPU path only)
        masked = copy.deepcopy(new)
        ex = masked.moe.deepspeed_moe.experts
        ex.grouped = ex._masked
        gate = masked.moe.deepspeed_moe.gate
        gate.route = types.MethodType(Gate.route, gate)  # and its composed router (no _Top1Router)
        layers["masked"] = masked
    if row.deepspeed is not None:
        layers["stock"] = MoE(D, FeedForward(D, F), num_experts=E, ep_size=ep_size, min_capacity=0,
                              eval_capacity_factor=row.deepspeed.get("capacity_factor", 1.0), **row.deepspeed)
    return layers


def layer_figures(row: Row, layers: dict[str, nn.Module], x: Tensor, mask: Tensor, rounds: int,
                  clock: Callable[[], float], sync: Callable[[float], float] = lambda t: t) -> dict[str, Any]:
    stock_routes: list[Tensor] = []
    if "stock" in layers:  # post-capacity routes (expert -1 = dropped)
        layers["stock"].deepspeed_moe.gate.register_forward_hook(lambda m, a, out: stock_routes.append(out[3]))
    steps = {name: step_fn(module, name if name in ("dense", "stock") else "ours", x, mask)
             for name, module in layers.items()}
    faults: dict[str, list[int]] = {}
    times = measure(steps, rounds, clock, sync, faults)
    N = int(mask.sum())
    new_counts = layers["new"].last_stats
    kept_new = 1.0 - float(new_counts.dropped)
    out: dict[str, Any] = {"dense_tps": N / statistics.median(times["dense"]), "new_dropped": 1 - kept_new,
                           "faults": {k: statistics.median(v) for k, v in faults.items()}}
    for name in layers:
        if name == "dense":
            continue
        if name == "stock":
            kept = 1.0 - float((stock_routes[-1] < 0).float().mean()) if stock_routes else float("nan")
            out["stock_dropped"] = 1 - kept
        else:
            kept = kept_new  # old, masked and new: the same gate, the same routes
        out[f"{name}_ratio"], out[f"{name}_q1"], out[f"{name}_q3"] = _ratio(times, name, kept)
    return out


def print_layer_table(title: str, results: dict[str, dict[str, Any]], columns: tuple[str, ...]) -> None:
    print(title)
    head = "  " + f"{'experts, routing':44s} {'dense tok/s':>11s}"
    labels = {"old": "old (loop)", "masked": "grouped, masked", "new": "new (host fn)", "stock": "DeepSpeed MOELayer"}
    for c in columns:
        head += f" | {labels[c]:>20s}"
    print(head + f" | {'dropped':>7s} {'DS dropped':>10s} | {'faults new/dense':>16s}")
    for name, r in results.items():
        line = f"  {name:44s} {r['dense_tps']:11.0f}"
        for c in columns:
            line += (f" | {r[c + '_ratio']:5.3f} [{r[c + '_q1']:.2f}-{r[c + '_q3']:.2f}]" if c + "_ratio" in r
                     else f" | {'-':>20s}")
        stock = f"{100 * r['stock_dropped']:9.1f}%" if "stock_dropped" in r else f"{'-':>10s}"
        f = r["faults"]
        print(line + f" | {100 * r['new_dropped']:6.1f}% {stock} | {f['new']:7.0f} / {f['dense']:6.0f}")
    print("  ratio = computed tokens/s of the MoE layer / tokens/s of the FLOP-matched dense FFN, median of the "
          "per-round ratios [quartiles]; `dropped` = share of routes over capacity (not computed, not counted); "
          "faults = the thread's page faults per step, median (jobs/worker_host.py)")


def _inputs(tokens: int, hidden: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, hidden, generator=g), torch.ones(1, tokens, dtype=torch.long)


# -- 1. one process, E sweep ---------------------------------------------------------------------


def single_process(args: argparse.Namespace) -> None:
    setup_worker_host(1, args.host_memory)
    x, mask = _inputs(args.tokens, args.hidden, 0)
    results = {}
    for E in args.experts:
        # the old loop costs ~E small kernels per pass: fewer rounds where it is slowest
        rounds = max(4, args.rounds * 16 // max(E, 16))
        for row in ROWS:
            layers = build(row, args.hidden, args.ffn, E, ep_size=1)
            results[f"E={E:<3d} {row.name}"] = layer_figures(row, layers, x, mask, rounds, time.thread_time)
    print_layer_table(
        f"\n[1] ep_size 1, one process, 1 thread: MoE layer fwd+bwd vs FLOP-matched dense FFN (D={args.hidden}, "
        f"F={args.ffn}, {args.tokens} tokens, random inputs; CPU time of the thread, alternating rounds; "
        f"host_memory: {args.host_memory})",
        results, ("old", "masked", "new", "stock"))


# -- 2. two processes ----------------------------------------------------------------------------


def _ep_worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    setup_worker_host(1, args.host_memory)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)

    def slowest(t: float) -> float:
        v = torch.tensor([t], dtype=torch.float64)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return float(v)

    try:
        x, mask = _inputs(args.tokens, args.hidden, rank)
        results = {}
        for E in (e for e in args.experts if e >= 2):
            for row in ROWS:
                layers = build(row, args.hidden, args.ffn, E, ep_size=2, with_old=False)
                layers["new"].moe.set_deepspeed_parallelism()
                if "stock" in layers:
                    layers["stock"].set_deepspeed_parallelism()
                results[f"E={E:<3d} {row.name}"] = layer_figures(row, layers, x, mask, max(4, args.rounds // 2),
                                                                 time.perf_counter, slowest)
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
        f"\n[2] ep_size 2 across 2 processes (gloo, 1 thread each; E/2 experts and {args.tokens} tokens per rank): "
        "wall time of the slower rank", results, ("new", "stock"))


# -- 3. shapes world -----------------------------------------------------------------------------

BALANCE_ROWS = [
    ("switch top-1, cf 1.25", dict(gate="switch", capacity_factor=1.25)),
    ("expert choice, cf 1.0", dict(gate="expert_choice", capacity_factor=1.0)),
    ("aux-free bias, top-1, cf 1.25", dict(gate="aux_free", capacity_factor=1.25, aux_loss_weight=0.0)),
    ("switch top-1, dropless", dict(gate="switch", dropless=True)),
]


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


def shapes_world(args: argparse.Namespace) -> None:
    from models import build_pretrainer
    from models.config import ImageSpec
    from orchestrator.config import load_config

    setup_worker_host(1, args.host_memory)
    base = load_config(ROOT / "jobs/configs/quickstart.yaml")
    batches, text = shapes_batches(args.shape_samples, base.data.image_size, base.data.max_text_len,
                                   base.train.batch_size)
    last = args.shape_last
    print(f"\n[3] routing on shapes-world batches: quickstart model ({base.model.num_layers} layers, "
          f"D={base.model.hidden_size}, E={base.moe.num_experts}, MoE every other layer, batch {base.train.batch_size}),"
          f" {args.shape_steps} AdamW steps per routing, same batches and seed, ep_size 1")
    print(f"  {'routing':32s} {'skipped text / image, step 1':>30s} {f'last {last} steps':>18s} "
          f"{f'loss (last {last})':>15s} {'MLM / ITM':>15s}")
    for name, overrides in BALANCE_ROWS:
        moe = MoEConfig.model_validate(base.moe.model_copy(update={"ep_size": 1, **overrides}).model_dump())
        torch.manual_seed(0)
        model = build_pretrainer(base.model, moe, base.active_objectives, text, ImageSpec(size=base.data.image_size))
        opt = torch.optim.AdamW(model.parameters(), lr=base.train.lr)
        history: list[dict[str, float]] = []
        for step in range(args.shape_steps):
            out = model(batches[step % len(batches)])
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            stats = collect_stats(model)
            history.append({"text": stats.get("moe/skipped_text", float("nan")),
                            "image": stats.get("moe/skipped_image", float("nan")),
                            "loss": float(out["loss"].detach()), "mlm": float(out["losses"]["mlm"]),
                            "itm": float(out["losses"]["itm"])})
        tail = {k: statistics.mean(h[k] for h in history[-last:]) for k in history[0]}
        first = history[0]
        print(f"  {name:32s} {100 * first['text']:13.1f}% / {100 * first['image']:5.1f}%      "
              f"{100 * tail['text']:5.1f}% / {100 * tail['image']:5.1f}% {tail['loss']:15.3f} "
              f"{tail['mlm']:7.3f} / {tail['itm']:.3f}")
    print("  skipped = share of real tokens of that modality that no expert processed (they pass on the "
          "residual); loss = total training loss incl. the router's aux terms")


def shape_args(doc: str | None, rounds: int) -> argparse.ArgumentParser:
    """The layer-shape options of the MoE benchmarks (this one and benchmarks/moe_cost.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--host-memory", choices=["retain", "system"], default="retain",
                    help="malloc policy of the process, as a training worker's scaling.host_memory")
    return ap


def main() -> None:
    ap = shape_args(__doc__, rounds=12)
    ap.add_argument("--shape-samples", type=int, default=512)
    ap.add_argument("--shape-steps", type=int, default=60)
    ap.add_argument("--shape-last", type=int, default=10)
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--skip-ep2", action="store_true")
    ap.add_argument("--skip-shapes", action="store_true")
    args = ap.parse_args()
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    if not args.skip_single:
        single_process(args)
    if not args.skip_ep2:
        two_processes(args)
    if not args.skip_shapes:
        shapes_world(args)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
