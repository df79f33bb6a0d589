"""A training worker's malloc policy, side by side: scaling.host_memory `system` (glibc's defaults)
vs `retain` (jobs/worker_host.py), on the MoE layer and the FLOP-matched dense FFN of
benchmarks/moe.py (D 128, F 256, 2048 tokens, dropless top-1, fwd + bwd, one thread).

mallopt is process-wide, so each policy runs in its own child process; the children run in
alternating order, pair after pair. Printed per policy and E: CPU-seconds per step of the child's
thread (median over its steps and pairs) and the thread's page faults per step (median).

    .venv/bin/python -m benchmarks.host_memory [--experts 4 64 256] [--pairs 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, resource, sys, time
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import logging
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
from jobs.worker_host import setup_worker_host
setup_worker_host(1, sys.argv[1])
from benchmarks.moe import ROWS, _inputs, build, step_fn
E, steps = int(sys.argv[2]), int(sys.argv[3])
layers = build(ROWS[1], 128, 256, E, ep_size=1, with_old=False)
x, mask = _inputs(2048, 128, 0)
fns = {"moe": step_fn(layers["new"], "ours", x, mask), "dense": step_fn(layers["dense"], "dense", x, mask)}
out = {k: {"s": [], "faults": []} for k in fns}
for i in range(steps + 3):
    for k, f in fns.items():
        f0, t0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt, time.thread_time()
        f()
        if i >= 3:
            out[k]["s"].append(time.thread_time() - t0)
            out[k]["faults"].append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)
print(json.dumps(out))
"""


def _child(policy: str, E: int, steps: int) -> dict[str, dict[str, list[float]]]:
    res = subprocess.run([sys.executable, "-c", CHILD, policy, str(E), str(steps)], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 64, 256])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    policies = ("system", "retain")
    print("scaling.host_memory: system (glibc defaults, the old behaviour) vs retain; MoE layer and dense FFN "
          "fwd+bwd, D=128 F=256 2048 tokens, 1 thread; ms CPU per step and page faults per step (medians)")
    print(f"  {'E':>4s} {'policy':>7s} | {'MoE ms':>7s} {'faults':>7s} | {'dense ms':>8s} {'faults':>7s} | "
          f"{'MoE/dense':>9s}")
    for E in args.experts:
        got: dict[str, dict[str, dict[str, list[float]]]] = {p: {"moe": {"s": [], "faults": []},
                                                                 "dense": {"s": [], "faults": []}} for p in policies}
        for pair in range(args.pairs):
            for policy in policies if pair % 2 == 0 else policies[::-1]:
                run = _child(policy, E, args.steps)
                for k in run:
                    for m in run[k]:
                        got[policy][k][m] += run[k][m]
        ms = {p: {k: 1e3 * statistics.median(got[p][k]["s"]) for k in got[p]} for p in policies}
        for p in policies:
            f = {k: statistics.median(got[p][k]["faults"]) for k in got[p]}
            print(f"  {E:4d} {p:>7s} | {ms[p]['moe']:7.2f} {f['moe']:7.0f} | {ms[p]['dense']:8.2f} {f['dense']:7.0f} | "
                  f"{ms[p]['dense'] / ms[p]['moe']:9.3f}")
        print(f"       retain / system, MoE step time: {ms['retain']['moe'] / ms['system']['moe']:.3f}; dense: "
              f"{ms['retain']['dense'] / ms['system']['dense']:.3f}")
    print("  MoE/dense = the dense FFN's time over the MoE layer's (benchmarks/moe.py's ratio, in time)")


if __name__ == "__main__":
    main()
