"""How much of a training step waits for data, for the quickstart config.

Runs `jobs/configs/quickstart.yaml` (shortened with --steps) on a local Ray and reads the per-report
timings the workers measure: the time each rank blocks in `next(batches)` (data wait, max over
ranks) against the whole step. Prints the warm figure (first report excluded: it holds the
pipeline's start) and the cold one, side by side with the compute share.

    .venv/bin/python -m benchmarks.data_wait [--steps 120] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from rich.console import Console

from orchestrator.config import load_config
from orchestrator.runner import run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "jobs/configs/quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mmpt-bench-") as tmp:
        cfg = load_config(args.config, [f"train.steps={args.steps}", "train.log_every=10",
                                        "train.checkpoint_every=0", f"storage.path={tmp}",
                                        "name=bench-data-wait", *args.overrides])
        result = run(cfg, console=Console(quiet=True))
    reports = [r for r in result.metrics if "data_wait_share" in r]
    if len(reports) < 2:
        raise SystemExit("need at least 2 reports: raise --steps")
    cold, warm = reports[0], reports[1:]
    wait = statistics.mean(r["data_wait_s"] for r in warm)
    step = statistics.mean(r["step_time_s"] for r in warm)
    shares = [r["data_wait_share"] for r in warm]
    print(f"quickstart, {cfg.scaling.num_workers} workers, batch {cfg.train.batch_size}/worker, "
          f"{args.steps} steps, {len(warm)} warm reports of {cfg.train.log_every} steps")
    print(f"cold (first {cfg.train.log_every} steps): data wait {100 * cold['data_wait_share']:.1f}% of step time")
    print(f"warm: data wait {100 * statistics.mean(shares):.1f}% of step time "
          f"(median {100 * statistics.median(shares):.1f}%, max {100 * max(shares):.1f}%), "
          f"compute {100 * (1 - statistics.mean(shares)):.1f}%")
    print(f"warm: step {1000 * step:.0f} ms = data wait {1000 * wait:.0f} ms (mean over ranks) + "
          f"compute/communication {1000 * (step - wait):.0f} ms; {statistics.mean(r['samples_per_s'] for r in warm):.0f} samples/s")


if __name__ == "__main__":
    main()
