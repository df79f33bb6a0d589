"""Bad-data accounting: every skipped sample counted once, by reason, with an error budget.

Read tasks run in many processes and may read a shard more than once (a new epoch, a retried
task, a resumed run), so the ledger keeps, per shard, the set of bad keys rather than a running
sum: the counts are of distinct samples. The totals the train loop asks for at every report are
kept as running counts, updated in `add` (O(new keys)), so a report costs O(reasons) whatever
the number of shards and ships a few numbers, not every bad key; the full list (worst shards,
every key) is built only where it is read: past the budget, at the end of a run and by
`mmpt data inspect`. During a run one ledger lives in a Ray actor (`ray.remote(BadSampleLedger)`);
`mmpt data inspect` uses the class in-process.
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any

from jobs.data.reader import REASONS, ShardReport


class DataBudgetExceeded(RuntimeError):
    """More bad samples than `data.max_bad_fraction` allows."""


class BadSampleLedger:
    def __init__(self) -> None:
        self._good: dict[str, dict[str, int]] = {}  # shard -> unit ("start:stop", "" = whole) -> good
        self._bad: dict[str, dict[str, str]] = {}
        self._detail: dict[str, str] = {}  # shard -> why it is unusable as a whole
        self._good_total = 0
        self._by_reason: Counter[str] = Counter()

    def add(self, report: ShardReport) -> None:
        # the latest pass knows about images that failed to decode; a shard read in units
        # (jobs.data.units) reports per unit
        units = self._good.setdefault(report.shard, {})
        self._good_total += report.good - units.get(report.unit, 0)
        units[report.unit] = report.good
        keys = self._bad.setdefault(report.shard, {})
        for key, reason in report.bad.items():
            old = keys.get(key)
            if old != reason:
                if old is not None:
                    self._by_reason[old] -= 1
                self._by_reason[reason] += 1
                keys[key] = reason
        if report.detail:
            self._detail[report.shard] = report.detail

    def counts(self) -> dict[str, Any]:
        """What every report needs: samples, bad, fraction and by_reason; O(reasons), no key lists."""
        bad = sum(self._by_reason.values())
        samples = self._good_total + bad
        return {"samples": samples, "bad": bad, "fraction": bad / samples if samples else 0.0,
                "by_reason": {r: self._by_reason[r] for r in REASONS if self._by_reason[r]}}

    def totals(self, worst: int = 5) -> dict[str, Any]:
        """`counts()` plus the worst shards and every bad key (the end of a run, past the budget)."""
        ranked = heapq.nlargest(worst, ((len(keys), shard) for shard, keys in self._bad.items() if keys))
        return self.counts() | {
            "worst_shards": [{"shard": s, "bad": n, "samples": n + sum(self._good.get(s, {}).values())}
                             | ({"why": self._detail[s]} if s in self._detail else {}) for n, s in ranked],
            "bad_keys": {s: dict(sorted(k.items())) for s, k in sorted(self._bad.items()) if k},
        }

    def state(self) -> dict[str, Any]:
        return {"good": {s: dict(u) for s, u in self._good.items()}, "bad": {s: dict(k) for s, k in self._bad.items()},
                "detail": dict(self._detail)}

    def load(self, state: dict[str, Any]) -> None:
        # an older state holds one count per shard
        self._good = {s: {k: int(v) for k, v in n.items()} if isinstance(n, dict) else {"": int(n)}
                      for s, n in state.get("good", {}).items()}
        self._bad = {s: dict(k) for s, k in state.get("bad", {}).items()}
        self._detail = dict(state.get("detail", {}))
        self._good_total = sum(sum(u.values()) for u in self._good.values())
        self._by_reason = Counter(r for keys in self._bad.values() for r in keys.values())


def over_budget(counts: dict[str, Any], max_fraction: float, min_samples: int = 64) -> bool:
    """Past the budget? Judged after `min_samples` samples, so one bad sample among the first few
    does not end a run that is 99.9 % clean."""
    return counts["samples"] >= min_samples and counts["fraction"] > max_fraction


def check_budget(totals: dict[str, Any], max_fraction: float, min_samples: int = 64) -> None:
    """Raise DataBudgetExceeded naming the worst shards (`totals()`) once past the budget."""
    if not over_budget(totals, max_fraction, min_samples):
        return
    worst = ", ".join(f"{w['shard']} ({w['bad']} of {w['samples']}{': ' + w['why'] if w.get('why') else ''})"
                      for w in totals["worst_shards"])
    reasons = ", ".join(f"{r}: {n}" for r, n in totals["by_reason"].items())
    raise DataBudgetExceeded(
        f"{totals['bad']} of {totals['samples']} samples are bad ({100 * totals['fraction']:.1f}% > "
        f"data.max_bad_fraction={max_fraction}); by reason: {reasons}; worst shards: {worst}"
    )
