"""How long a short run takes end to end on one shared Ray, and how much of it is the Ray Train
controller's report polling: new code (scaling.report_poll_s unset: 0.1 s at 2 workers) against
the old behaviour (Ray's 2 s), alternated on the same Ray instance, same config, same data.

The run is the integration tests' tiny one (tests/integration/conftest.tiny: 2 workers, 2 layers,
hidden 32, 6 steps, a report every 2 steps, checkpoints at 3 and 6, evaluation at the end); its
length is what every Ray Train test of the suite pays, and a lab's run pays the same per report.
Per run: wall time of `orchestrator.run.runner.run` (planning, Ray Train start-up, training,
evaluation, summary), and the median gap between consecutive reports as the driver receives them
(a poll-bound run receives one per poll period, whatever its training speed). Also
`--set train.steps=N` etc. for longer runs (a report every log_every steps).

    .venv/bin/python -m benchmarks.run_latency [--pairs 4] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

OLD = ["scaling.report_poll_s=2"]  # Ray Train's default interval, what every run had before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    import ray
    from rich.console import Console

    from jobs.data.synth import write_synthetic
    from orchestrator.config import load_config
    from orchestrator.run.runner import run
    from orchestrator.run.scaling import report_poll_s
    from tests.integration.conftest import QUICKSTART, tiny

    with tempfile.TemporaryDirectory(prefix="mmpt-latency-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "shapes"
        write_synthetic(str(data), samples=256, shards=4, seed=1, image_size=32, eval_samples=64)
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        try:
            sides: dict[str, list[float]] = {"new": [], "old": []}
            gaps: dict[str, list[float]] = {"new": [], "old": []}
            cfgs = {side: load_config(QUICKSTART, tiny(data, tmp / side) + args.overrides + (OLD if side == "old" else []))
                    for side in sides}
            print(f"run_latency: {cfgs['new'].scaling.num_workers} workers, {cfgs['new'].train.steps} steps, a report "
                  f"every {cfgs['new'].train.log_every}; {args.pairs} pairs on one Ray, alternating (+1 warm-up run)",
                  flush=True)
            run(cfgs["new"].model_copy(update={"name": "warmup"}), console=Console(quiet=True), fresh=True)
            for pair in range(args.pairs):
                order = ["new", "old"] if pair % 2 == 0 else ["old", "new"]
                line = [f"pair {pair + 1}:"]
                for side in order:
                    t0 = time.perf_counter()
                    result = run(cfgs[side].model_copy(update={"name": f"{side}-{pair}"}), console=Console(quiet=True),
                                 fresh=True)
                    wall = time.perf_counter() - t0
                    assert result.summary["steps"] == cfgs[side].train.steps
                    sides[side].append(wall)
                    seen = [r["time"] for r in result.metrics]  # when the driver received each report
                    gaps[side].append(statistics.median(b - a for a, b in zip(seen, seen[1:], strict=False)))
                    line.append(f"{side} {wall:.1f} s (reports {gaps[side][-1]:.2f} s apart)")
                print(" ".join(line), flush=True)
        finally:
            ray.shutdown()
    new, old = statistics.median(sides["new"]), statistics.median(sides["old"])
    scaling = cfgs["new"].scaling
    print(f"median run wall time: new (report poll {report_poll_s(scaling, {}):g} s at {scaling.num_workers} workers) "
          f"{new:.1f} s, old (Ray's 2 s) {old:.1f} s; new/old {new / old:.2f}; median gap between reports received: "
          f"new {statistics.median(gaps['new']):.2f} s, old {statistics.median(gaps['old']):.2f} s")


if __name__ == "__main__":
    main()
