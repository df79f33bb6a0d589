"""Where the MoE layer's time goes as the experts grow, and the floors no dispatch can remove.

For E in {4, 16, 64, 256} at the model's shapes (D 128, F 256, 2048 tokens), dropless top-1, one
thread, CPU time of the thread, rounds alternated, medians (fwd + bwd each):

    dense     the FLOP-matched dense FFN (what benchmarks/moe.py divides by)
    layer     the whole MoE layer (models/moe: gate, dispatch, experts, combine, stats)
    router    the gate alone: router GEMM, softmax, choice, losses, stats
    experts   the experts' FFN alone on rows already sorted by expert (the layer's own counts)
    rest      layer - router - experts: dispatch plan, gathers, combine

and the two floors:

    router FLOPs   the router is a [N, D] x [D, E] GEMM, forward and two backward GEMMs, against the
                   experts' 2 x [N, D] x [D, F] per token: a dense/MoE bound of 1 / (1 + E / (2 F))
                   before any other cost (top-1; E = 256, F = 256: 0.67)
    weight bytes   every step reads the experts' weights in the forward and again in the backward
                   and writes their gradients: 3 x E x 2 x D x F x 4 bytes (E = 256: 201 MB) against
                   the dense FFN's 3 x 2 x D x F x 4 (0.8 MB); at the copy bandwidth measured here
                   (into reused memory, and into fresh memory, as a gradient set to None each step
                   is) that is a time floor, shown as the ratio it allows.
    GEMM shape     with N/E rows per expert the weight-gradient GEMMs ([F, N/E] x [N/E, D]) get thin:
                   their speed relative to the dense FFN's one [F, N] x [N, D] at the same FLOPs.

and two old-vs-new micro figures: the router's softmax (torch.softmax vs written out) and one
projection's weight gradient (grouped_mm into fresh memory vs per-expert GEMMs into a reused buffer).

    .venv/bin/python -m benchmarks.moe_cost [--experts 4 16 64 256] [--rounds 10]
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from benchmarks.moe import ROWS, _inputs, build, measure, shape_args, step_fn  # noqa: E402
from jobs.worker_host import setup_worker_host  # noqa: E402


def _copy_ms(numel: int, fresh: bool, rounds: int = 5) -> float:
    """Milliseconds to copy `numel` fp32 (one read, one write), one thread; `fresh`: into newly
    allocated memory (page faults included), as a gradient set to None each step is written."""
    src = torch.randn(numel)
    dst = torch.empty(numel)
    times = []
    for _ in range(rounds):
        t0 = time.thread_time()
        out = torch.empty(numel) if fresh else dst
        out.copy_(src)
        times.append(time.thread_time() - t0)
        del out
    return 1e3 * statistics.median(times)


def _gemm_efficiency(E: int, D: int, F: int, N: int, rounds: int = 5) -> float:
    """Time of the dense FFN's weight-gradient GEMM [F, N] x [N, D] over the time of E experts' ones
    [F, N/E] x [N/E, D] (the same FLOPs): below 1 when per-expert GEMMs get too thin to run at speed."""
    n = max(1, N // E)
    g_FN, x_ND = torch.randn(F, N), torch.randn(N, D)
    g_EFn, x_EnD = torch.randn(E, F, n), torch.randn(E, n, D)
    out, outs = torch.empty(F, D), torch.empty(E, F, D)

    def one() -> float:
        t0 = time.thread_time()
        torch.mm(g_FN, x_ND, out=out)
        return time.thread_time() - t0

    def many() -> float:
        t0 = time.thread_time()
        for e in range(E):
            torch.mm(g_EFn[e], x_EnD[e], out=outs[e])
        return time.thread_time() - t0

    return statistics.median(one() for _ in range(rounds)) / statistics.median(many() for _ in range(rounds))


def _best_us(fn: Callable[[], object], rounds: int = 50) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return 1e6 * min(times)


def _softmax_us(E: int, N: int) -> tuple[float, float]:
    """Microseconds of torch.softmax over [N, E] and of the written-out one routing.softmax_and_lse
    uses below SMALL_SOFTMAX experts (exp / sum / divide), min of rounds, run alternately."""
    logits = torch.randn(N, E)

    def written() -> object:
        exp = (logits - logits.amax(-1, keepdim=True)).exp()
        return exp / exp.sum(-1, keepdim=True)

    return _best_us(lambda: torch.softmax(logits, -1)), _best_us(written)


def _wgrad_ms(E: int, D: int, F: int, N: int) -> tuple[float, float]:
    """Milliseconds of one projection's weight gradient over N rows split evenly across E experts:
    grouped_mm (which allocates its [E, F, D] output each call, as the host path did before
    GradBuffers) and one GEMM per expert into a reused buffer (the host path now)."""
    import torch.nn.functional as Fn

    g, x = torch.randn(N, F), torch.randn(N, D)
    ends = [(e + 1) * N // E for e in range(E)]
    offs, starts = torch.tensor(ends, dtype=torch.int32), [0, *ends[:-1]]
    buf, g_t = torch.empty(E, F, D), g.t()

    def loop() -> None:
        for e, (a, b) in enumerate(zip(starts, ends, strict=True)):
            torch.mm(g_t[:, a:b], x[a:b], out=buf[e])

    return (_best_us(lambda: Fn.grouped_mm(g_t, x, offs=offs), 10) / 1e3, _best_us(loop, 10) / 1e3)


def _parts(E: int, D: int, F: int, tokens: int) -> dict[str, Callable[[], None]]:
    layers = build(ROWS[1], D, F, E, ep_size=1, with_old=False)  # dropless top-1
    layer = layers["new"]
    x, mask = _inputs(tokens, D, 0)
    x_ND = x.reshape(-1, D)  # no input gradient, as in the layer and dense steps (benchmarks.moe)
    used_N = mask.reshape(-1).bool()
    moe = layer.moe.deepspeed_moe
    _, _, counts_E = layer(x, mask)
    offsets_E = torch.cumsum(counts_E, 0)
    row_expert = torch.repeat_interleave(torch.arange(E), counts_E)
    x_sorted = torch.randn(tokens, D)

    def router() -> None:
        moe.gate.zero_grad(set_to_none=True)
        r = moe.gate.route(x_ND, used_N)
        (r.gate_KN.sum() + r.aux).backward()

    def experts() -> None:
        moe.experts.zero_grad(set_to_none=True)
        moe.experts.grouped(x_sorted, offsets_E, row_expert).sum().backward()

    return {"dense": step_fn(layers["dense"], "dense", x, mask), "layer": step_fn(layer, "ours", x, mask),
            "router": router, "experts": experts}


def main() -> None:
    args = shape_args(__doc__, rounds=10).parse_args()
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    setup_worker_host(1, args.host_memory)
    D, F, N = args.hidden, args.ffn, args.tokens
    print(f"MoE layer cost by part, dropless top-1, D={D} F={F} {N} tokens, 1 thread, CPU time (ms, median), "
          f"host_memory: {args.host_memory}")
    print(f"  {'E':>4s} {'dense':>7s} {'layer':>7s} {'router':>7s} {'experts':>8s} {'rest':>6s} | {'ratio':>5s}"
          f" {'router floor':>12s} | {'weight MB':>9s} {'floor reused':>12s} {'floor fresh':>11s} {'wgrad GEMM':>10s}"
          f" | {'softmax us torch/written':>24s} | {'wgrad ms fresh/reused':>21s}")
    for E in args.experts:
        times = measure(_parts(E, D, F, N), args.rounds, time.thread_time)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rest = ms["layer"] - ms["router"] - ms["experts"]
        weight_numel = E * 2 * D * F
        traffic = 3 * 4 * weight_numel
        # weights read twice + gradients written once = 1.5 copies; gradients into fresh memory:
        # reads (one copy's worth) + the fresh copy less its read half
        copy, fresh = _copy_ms(weight_numel, False), _copy_ms(weight_numel, True)
        floor_reused, floor_fresh = 1.5 * copy, fresh + 0.5 * copy
        (sm_torch, sm_written), (wg_fresh, wg_reused) = _softmax_us(E, N), _wgrad_ms(E, D, F, N)
        print(f"  {E:4d} {ms['dense']:7.2f} {ms['layer']:7.2f} {ms['router']:7.2f} {ms['experts']:8.2f} {rest:6.2f} |"
              f" {ms['dense'] / ms['layer']:5.2f} {1 / (1 + E / (2 * F)):12.2f} | {traffic / 2**20:9.1f}"
              f" {min(1.0, ms['dense'] / floor_reused):12.2f} {min(1.0, ms['dense'] / floor_fresh):11.2f}"
              f" {_gemm_efficiency(E, D, F, N):10.2f} | {sm_torch:14.0f} / {sm_written:7.0f} |"
              f" {wg_fresh:11.2f} / {wg_reused:6.2f}")
    print("  ratio = dense / layer (time); router floor = 1 / (1 + E / 2F); floor reused / fresh = dense time / "
          "the time to move the experts' weights 3x, timed as copies (gradients into reused / fresh memory); "
          "wgrad GEMM = speed of E weight-gradient GEMMs of N/E rows each relative to one of N rows (same FLOPs); "
          "softmax = torch.softmax over [N, E] vs written out (used below routing.SMALL_SOFTMAX experts), min us; "
          "wgrad fresh/reused = one projection's weight gradient by grouped_mm into a new output vs one GEMM per "
          "expert into a reused buffer (host_experts.GradBuffers), min ms")


if __name__ == "__main__":
    main()
