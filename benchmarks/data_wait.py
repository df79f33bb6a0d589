"""How much of a training step waits for data, for the quickstart config: at epoch boundaries and
elsewhere, with the next epoch's pipeline built ahead (now) and after the current one ends (old,
`data.next_epoch_ahead=false`), side by side in one run.

Runs `jobs/configs/quickstart.yaml` (shortened with --steps) on a local Ray and reads the per-report
timings the workers measure: the time each rank blocks in `next(batches)` (data wait, max over
ranks) against the whole step. A report window holds an epoch boundary when its `epoch` differs
from the previous report's; the first report (the pipeline's start) is left out. The sides run in
turn, the one that goes first alternating over --pairs.

    flock /tmp/mmpt_heavy.lock .venv/bin/python -m benchmarks.data_wait [--steps 200] [--pairs 1] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator.config import load_config
from orchestrator.run.runner import run

ROOT = Path(__file__).resolve().parents[1]


def _side(config: str, steps: int, overrides: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    with tempfile.TemporaryDirectory(prefix="mmpt-bench-") as tmp:
        cfg = load_config(config, [f"train.steps={steps}", "train.log_every=10", "train.checkpoint_every=0",
                                   f"storage.path={tmp}", "name=bench-data-wait", *overrides])
        result = run(cfg, console=Console(quiet=True))
    return cfg, [r for r in result.metrics if "data_wait_share" in r]


def _split(reports: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(steady, boundary) windows after the first report."""
    steady, boundary = [], []
    for prev, r in zip(reports, reports[1:], strict=False):
        (boundary if r["epoch"] != prev["epoch"] else steady).append(r)
    return steady, boundary


def _pct(rs: list[dict[str, Any]], key: str = "data_wait_share") -> str:
    return f"{100 * statistics.mean(r[key] for r in rs):.1f}%" if rs else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "jobs/configs/quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--old-set", dest="old_set", action="append", default=["data.next_epoch_ahead=false"])
    args = ap.parse_args()
    sides = {"new": args.overrides, "old": args.overrides + args.old_set}
    got: dict[str, list[list[dict[str, Any]]]] = {"new": [], "old": []}
    for pair in range(args.pairs):
        for who in (["new", "old"] if pair % 2 == 0 else ["old", "new"]):
            cfg, reports = _side(args.config, args.steps, sides[who])
            if len(reports) < 2:
                raise SystemExit("need at least 2 reports: raise --steps")
            got[who].append(reports)
            steady, boundary = _split(reports)
            step = statistics.mean(r["step_time_s"] for r in steady)
            print(f"pair {pair + 1}, {who}: {cfg.scaling.num_workers} workers, batch {cfg.train.batch_size}/worker, "
                  f"{args.steps} steps, epochs up to {reports[-1]['epoch']}: data wait in steady windows "
                  f"{_pct(steady)} of step time ({len(steady)} windows), in epoch-boundary windows {_pct(boundary)} "
                  f"({len(boundary)}: steps {[r['step'] for r in boundary]}); steady step {1000 * step:.0f} ms, "
                  f"boundary window step {1000 * statistics.mean(r['step_time_s'] for r in boundary or steady):.0f} ms",
                  flush=True)
    for who in ("new", "old"):
        steady = [r for reports in got[who] for r in _split(reports)[0]]
        boundary = [r for reports in got[who] for r in _split(reports)[1]]
        print(f"{who} ({'next epoch built ahead' if who == 'new' else ' '.join(args.old_set)}): data wait "
              f"steady {_pct(steady)}, epoch boundary {_pct(boundary)} (max {100 * max((r['data_wait_share'] for r in boundary), default=0):.1f}%) "
              f"over {len(got[who])} run(s)")


if __name__ == "__main__":
    main()
