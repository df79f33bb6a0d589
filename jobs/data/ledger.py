"""Bad-data accounting: every skipped sample counted once, by reason, with an error budget.

Read tasks run in many processes and may read a shard more than once (a new epoch, a retried
task, a resumed run), so the ledger keeps, per shard, the set of bad keys rather than a running
sum: the counts are of distinct samples. During a run one ledger lives in a Ray actor
(`ray.remote(BadSampleLedger)`); `mmpt data inspect` uses the class in-process.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from jobs.data.reader import REASONS, ShardReport


class DataBudgetExceeded(RuntimeError):
    """More bad samples than `data.max_bad_fraction` allows."""


class BadSampleLedger:
    def __init__(self) -> None:
        self._good: dict[str, int] = {}
        self._bad: dict[str, dict[str, str]] = {}
        self._detail: dict[str, str] = {}  # shard -> why it is unusable as a whole

    def add(self, report: ShardReport) -> None:
        self._good[report.shard] = report.good  # the latest pass knows about images that failed to decode
        self._bad.setdefault(report.shard, {}).update(report.bad)
        if report.detail:
            self._detail[report.shard] = report.detail

    def totals(self, worst: int = 5) -> dict[str, Any]:
        by_reason = Counter(r for keys in self._bad.values() for r in keys.values())
        bad = sum(by_reason.values())
        samples = sum(self._good.values()) + bad
        ranked = sorted(((len(keys), shard) for shard, keys in self._bad.items() if keys), reverse=True)
        return {
            "samples": samples,
            "bad": bad,
            "fraction": bad / samples if samples else 0.0,
            "by_reason": {r: by_reason[r] for r in REASONS if by_reason[r]},
            "worst_shards": [{"shard": s, "bad": n, "samples": n + self._good.get(s, 0)}
                             | ({"why": self._detail[s]} if s in self._detail else {}) for n, s in ranked[:worst]],
            "bad_keys": {s: dict(sorted(k.items())) for s, k in sorted(self._bad.items()) if k},
        }

    def state(self) -> dict[str, Any]:
        return {"good": dict(self._good), "bad": {s: dict(k) for s, k in self._bad.items()},
                "detail": dict(self._detail)}

    def load(self, state: dict[str, Any]) -> None:
        self._good = {s: int(n) for s, n in state.get("good", {}).items()}
        self._bad = {s: dict(k) for s, k in state.get("bad", {}).items()}
        self._detail = dict(state.get("detail", {}))


def check_budget(totals: dict[str, Any], max_fraction: float, min_samples: int = 64) -> None:
    """Raise DataBudgetExceeded naming the worst shards once the bad fraction passes the budget.

    The budget is judged after `min_samples` samples, so one bad sample among the first few does
    not end a run that is 99.9 % clean.
    """
    if totals["samples"] < min_samples or totals["fraction"] <= max_fraction:
        return
    worst = ", ".join(f"{w['shard']} ({w['bad']} of {w['samples']}{': ' + w['why'] if w.get('why') else ''})"
                      for w in totals["worst_shards"])
    reasons = ", ".join(f"{r}: {n}" for r, n in totals["by_reason"].items())
    raise DataBudgetExceeded(
        f"{totals['bad']} of {totals['samples']} samples are bad ({100 * totals['fraction']:.1f}% > "
        f"data.max_bad_fraction={max_fraction}); by reason: {reasons}; worst shards: {worst}"
    )
