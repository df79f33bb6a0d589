"""Which differences in a sweep's table exceed the spread over seeds, per column.

A sweep's cell is mean ± std over seeds (orchestrator/report/sweep_report.py). Two configurations differ by more
than noise only when their ±1 std bands do not overlap: |mean_a − mean_b| > std_a + std_b, the rule
the transfer table uses too (orchestrator/report/transfer.py). Per column, the best mean is marked
`*` and every other row whose band overlaps the best's is marked `≈` (within the spread of the best:
not a difference to read); an unmarked row is worse than the best by more than the spread. A column
is only marked where the best and the row both have >= 2 seeds (one seed has no spread).

"Best" is the highest mean, except for costs and losses (`loss/*`, wall time, model-state memory,
step and data-wait time), where it is the lowest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models import metric_keys as mk

if TYPE_CHECKING:
    from orchestrator.report.rows import Row

BEST, WITHIN = "*", "≈"
_LOWER_IS_BETTER = ("wall_time_s", mk.MEMORY_TOTAL, "step_time_s", "data_wait_share", mk.EVAL_LOSS)


def lower_is_better(key: str) -> bool:
    return key.startswith(mk.LOSS) or key in _LOWER_IS_BETTER


def marks(rows: list[Row], key: str) -> dict[str, str]:
    """point -> BEST, WITHIN or "" for column `key` ({} when fewer than two rows have a spread)."""
    spread = [r for r in rows if key in r.stats and r.stats[key].n > 1]
    if len(spread) < 2:
        return {}
    pick = min if lower_is_better(key) else max
    best = pick(spread, key=lambda r: r.stats[key].mean).stats[key]
    out = {}
    for r in spread:
        s = r.stats[key]
        if s is best:
            out[r.point] = BEST
        else:
            out[r.point] = WITHIN if abs(s.mean - best.mean) <= s.std + best.std else ""
    return out


def all_marks(rows: list[Row], cols: list[str]) -> dict[str, dict[str, str]]:
    return {k: marks(rows, k) for k in cols}


def note(rows: list[Row], metric: str) -> list[str]:
    """The rule, and for the sweep's metric which configurations are within the spread of the best."""
    if not any(r.stats.get(metric) and r.stats[metric].n > 1 for r in rows):
        return ["one seed per configuration: no spread, so no difference can be told from noise (set seeds: 3)"]
    out = [f"per column, {BEST} = the best mean (lowest for losses and costs); {WITHIN} = within the spread of "
           f"the best (|Δ mean| ≤ std + std of the best: the ±1 std bands overlap), not a difference to read; "
           "unmarked = worse than the best by more than the spread"]
    m = marks(rows, metric)
    best = [r.label for r in rows if m.get(r.point) == BEST]
    within = [r.label for r in rows if m.get(r.point) == WITHIN]
    if best:
        out.append(f"{metric}: within the spread of the best ({best[0]}): {', '.join(within) or 'none'}")
    return out
