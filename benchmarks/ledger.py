"""The bad-data ledger at a report: what rank 0 waits for, old vs new, at several shard counts.

Old (d011efc): every report called `totals()`, which sorted all shards by their bad count and
shipped every bad key to rank 0. New: `counts()`, running totals kept by `add`. Both sides run
on the same ledger (1 % of 1000 samples per shard bad), and the figure includes pickling the
answer, as Ray does to ship it; the two sides are alternated.

    .venv/bin/python -m benchmarks.ledger [--shards 10 1000 10000]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
from collections import Counter
from typing import Any

from jobs.data.ledger import BadSampleLedger
from jobs.data.reader import REASONS, ShardReport


def old_totals(ledger: BadSampleLedger, worst: int = 5) -> dict[str, Any]:
    """The report-time call as it was (jobs/data/ledger.py at d011efc)."""
    bad_map, good = ledger._bad, ledger._good  # noqa: SLF001 - the old code read these same fields
    by_reason = Counter(r for keys in bad_map.values() for r in keys.values())
    bad = sum(by_reason.values())
    samples = sum(good.values()) + bad
    ranked = sorted(((len(keys), shard) for shard, keys in bad_map.items() if keys), reverse=True)
    return {"samples": samples, "bad": bad, "fraction": bad / samples if samples else 0.0,
            "by_reason": {r: by_reason[r] for r in REASONS if by_reason[r]},
            "worst_shards": [{"shard": s, "bad": n, "samples": n + good.get(s, 0)} for n, s in ranked[:worst]],
            "bad_keys": {s: dict(sorted(k.items())) for s, k in sorted(bad_map.items()) if k}}


def filled(shards: int, per_shard: int = 1000, bad_every: int = 100) -> BadSampleLedger:
    ledger = BadSampleLedger()
    for s in range(shards):
        uri = f"s3://bucket/train/{s:06d}.tar"
        report = ShardReport(uri, good=per_shard - per_shard // bad_every)
        report.bad = {f"{s:06d}{k:05d}": REASONS[k % 3] for k in range(0, per_shard, bad_every)}
        ledger.add(report)
    return ledger


def report_ms(fn, reps: int) -> tuple[float, int]:  # noqa: ANN001
    t0 = time.perf_counter()
    for _ in range(reps):
        payload = pickle.dumps(fn())
    return 1000 * (time.perf_counter() - t0) / reps, len(payload)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, nargs="+", default=[10, 1000, 10000])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print("bad-data ledger, one report (call + pickle of the answer), 1000 samples/shard, 1 % bad; "
          "median of alternated rounds")
    for n in args.shards:
        ledger = filled(n)
        assert {k: v for k, v in old_totals(ledger).items() if k in ledger.counts()} == ledger.counts()
        reps = max(1, 2000 // n)
        sides = {"old": lambda led=ledger: old_totals(led), "new": ledger.counts}
        ms: dict[str, list[float]] = {k: [] for k in sides}
        size: dict[str, int] = {}
        for r in range(args.rounds):
            for name in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
                t, size[name] = report_ms(sides[name], reps)
                ms[name].append(t)
        old, new = statistics.median(ms["old"]), statistics.median(ms["new"])
        print(f"{n:>6} shards: old {old:9.3f} ms, {size['old'] / 1024:9.1f} KiB shipped | new {new:7.4f} ms, "
              f"{size['new']} B shipped | old/new {old / new:8.0f}x")


if __name__ == "__main__":
    main()
