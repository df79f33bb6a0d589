"""The one actor a run starts beside Ray Train's: the bad-sample ledger and the driver's report inbox.

Two small actors (a `ray.util.queue.Queue` for rank 0's reports and the ledger) cost two worker
processes to start, each importing Ray on a machine that is busy starting the training workers; one
actor that is both costs one. The ledger's interface (jobs.data.ledger.BadSampleLedger) is what
the Ray Data tasks and the workers call; `put` is called by the report forwarder in Ray Train's
controller and `drain` by the driver, which polls it.
"""

from __future__ import annotations

from typing import Any

from jobs.data.ledger import BadSampleLedger


class RunHub(BadSampleLedger):
    def __init__(self) -> None:
        super().__init__()
        self._inbox: list[dict[str, Any]] = []

    def put(self, record: dict[str, Any]) -> None:
        self._inbox.append(record)

    def drain(self) -> list[dict[str, Any]]:
        """Every record put since the last call, oldest first."""
        out, self._inbox = self._inbox, []
        return out
