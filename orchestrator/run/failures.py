"""Why a run failed, in the line a user acts on; and the run's `events.jsonl` (hangs the ranks reported).

Ray's failure of a worker group names the mechanism (an actor died, a collective broke), not the
cause. Two causes are known better on the driver than in Ray's error:

- the data ran out because it is bad (every sample of a rank's share skipped): the train loop
  raises "no full step", the bad-sample ledger knows why, and its error-budget message is the line;
- a rank hung and the watchdog ended it (jobs/watchdog.py): its process exits, so Ray only says a
  worker died; the rank's own line, sent to the driver first, names what it waited for.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from jobs.config import RunConfig

if TYPE_CHECKING:
    from orchestrator.run.files import RunFiles

# A hang reported this recently before the failure is its cause (the restart after an earlier one
# may have failed for another reason).
_HANG_RECENT_S = 120.0


def failure_cause(cause: str, ledger: Any, cfg: RunConfig, events: list[dict[str, Any]]) -> str:
    """`cause` (the root line of Ray's error) replaced or prefixed by what the driver knows."""
    import ray

    from jobs.data.ledger import DataBudgetExceeded, check_budget

    if "no full step" in cause:
        try:
            check_budget(ray.get(ledger.totals.remote(), timeout=10), cfg.data.max_bad_fraction, min_samples=1)
        except DataBudgetExceeded as budget:
            return str(budget)
        except Exception:  # noqa: BLE001 - the ledger is a courtesy here; the error itself is the answer
            pass
    recent = [e for e in events if time.time() - e.get("time", 0.0) < _HANG_RECENT_S]
    if recent and "made no progress" not in cause:
        return f"{recent[-1]['message']} ({cause})"
    return cause


def append_event(files: RunFiles, record: dict[str, Any]) -> None:
    """One line of the run's `events.jsonl` (orchestrator/run/files.py)."""
    from orchestrator.run.files import EVENTS

    files.append_line(EVENTS, record)
