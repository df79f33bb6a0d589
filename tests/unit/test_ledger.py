"""jobs.data.ledger: running counts at every report, the full list only on demand (issue 14.4)."""

from __future__ import annotations

import pickle

from jobs.data.ledger import BadSampleLedger, over_budget
from jobs.data.reader import ShardReport


def _report(shard: str, good: int, bad: dict[str, str]) -> ShardReport:
    r = ShardReport(shard, good=good)
    r.bad = dict(bad)
    return r


def _filled(shards: int) -> BadSampleLedger:
    ledger = BadSampleLedger()
    for s in range(shards):
        ledger.add(_report(f"{s:05d}.tar", 9, {f"{s}a": "corrupt_image"}))
    return ledger


def test_running_counts_match_a_full_recount_through_rereads_and_resume() -> None:
    ledger = BadSampleLedger()
    ledger.add(_report("a.tar", 10, {"k1": "missing_caption"}))
    ledger.add(_report("b.tar", 5, {"k2": "corrupt_image", "k3": "empty_caption"}))
    ledger.add(_report("a.tar", 9, {"k1": "missing_caption", "k4": "corrupt_image"}))  # a second pass
    ledger.add(_report("b.tar", 5, {"k2": "corrupt_image"}))  # a partial re-read: nothing new
    counts = ledger.counts()
    assert counts == {"samples": 9 + 5 + 4, "bad": 4, "fraction": 4 / 18,
                      "by_reason": {"corrupt_image": 2, "missing_caption": 1, "empty_caption": 1}}
    full = ledger.totals()
    assert {k: full[k] for k in counts} == counts
    assert full["worst_shards"][0] == {"shard": "b.tar", "bad": 2, "samples": 7}
    assert full["bad_keys"]["a.tar"] == {"k1": "missing_caption", "k4": "corrupt_image"}
    restored = BadSampleLedger()
    restored.load(ledger.state())
    assert restored.counts() == counts
    restored.add(_report("c.tar", 1, {"k5": "missing_image"}))
    assert restored.counts()["bad"] == 5 and restored.counts()["samples"] == 20


def test_a_report_ships_the_same_few_bytes_at_10_and_10000_shards() -> None:
    small, large = _filled(10), _filled(10000)
    assert large.counts()["bad"] == 10000 and large.counts()["samples"] == 100000
    assert len(pickle.dumps(large.counts())) <= len(pickle.dumps(small.counts())) + 8  # no key lists
    assert len(large.totals()["bad_keys"]) == 10000  # the full list, where it is asked for


def test_over_budget_waits_for_enough_samples() -> None:
    assert not over_budget({"samples": 10, "fraction": 0.5}, 0.1)
    assert over_budget({"samples": 64, "fraction": 0.11}, 0.1)
    assert not over_budget({"samples": 1000, "fraction": 0.1}, 0.1)
