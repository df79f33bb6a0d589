"""The job state machine: what a job's state becomes when the cluster reports something.

States and their meaning:
  PENDING    submitted; the cluster has not started its entrypoint yet
  RUNNING    the entrypoint runs
  SUCCEEDED  exited 0                                   (terminal)
  FAILED     exited non-zero, or the cluster failed it   (terminal)
  STOPPED    stopped on request (`mmpt jobs stop`)       (terminal)
  LOST       its driver is gone while we believed it PENDING or RUNNING: the cluster answers but no
             longer knows the job (head restarted, record deleted), reports it FAILED because its
             driver died (`Died`), or stayed unreachable past the controller's grace period. Not
             terminal: a head restored with GCS fault tolerance may report the job again, and then
             its reported state wins; or the controller resubmits the run (retry.py) and it is
             PENDING again, on a new Ray job.

Events are what a reconcile pass observes: `Observed(ray_status)` when the cluster lists the job,
`Vanished()` when the cluster answered and the job was not there, `Died(cause)` when the cluster
lists it FAILED for a reason the controller retries (retry.classify), `Unreachable(seconds)` when
its cluster has not answered for longer than the grace period. A cluster that does not answer for
less is no event at all (we know nothing new), so a network blip never marks jobs LOST.

`decide` is pure: it returns a `Transition` or None and never touches the registry or Ray, so the
whole policy is unit-tested without either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

JobState = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED", "LOST"]
STATES: tuple[JobState, ...] = get_args(JobState)
TERMINAL: frozenset[JobState] = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ACTIVE: frozenset[JobState] = frozenset({"PENDING", "RUNNING"})

# Every allowed edge. Terminal states have none: a finished job's record is final.
_EDGES: dict[JobState, frozenset[JobState]] = {
    "PENDING": frozenset({"RUNNING", "SUCCEEDED", "FAILED", "STOPPED", "LOST"}),
    "RUNNING": frozenset({"SUCCEEDED", "FAILED", "STOPPED", "LOST"}),
    "LOST": frozenset({"PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"}),
    "SUCCEEDED": frozenset(),
    "FAILED": frozenset(),
    "STOPPED": frozenset(),
}

# Ray Jobs API status (ray.job_submission.JobStatus values) -> our state.
_FROM_RAY: dict[str, JobState] = {
    "PENDING": "PENDING",
    "RUNNING": "RUNNING",
    "SUCCEEDED": "SUCCEEDED",
    "FAILED": "FAILED",
    "STOPPED": "STOPPED",
}


@dataclass(frozen=True)
class Observed:
    """The cluster lists the job with this Ray status (and Ray's message, if any)."""

    ray_status: str
    message: str = ""


@dataclass(frozen=True)
class Vanished:
    """The cluster answered, and the job is not among its jobs."""


@dataclass(frozen=True)
class Died:
    """The cluster lists the job FAILED because its driver died (`cause`: a retry.RetryReason)."""

    cause: str
    message: str = ""


@dataclass(frozen=True)
class Unreachable:
    """The job's cluster has not answered for `seconds`, longer than the grace period."""

    seconds: float


Event = Observed | Vanished | Died | Unreachable


@dataclass(frozen=True)
class Transition:
    job_id: str
    old: JobState
    new: JobState
    reason: str
    cause: str = ""  # for a move to LOST, why (a retry.RetryReason)


def from_ray(status: str) -> JobState:
    """Ray's status string -> our state; ValueError for a status this version does not know."""
    try:
        return _FROM_RAY[str(status).upper()]
    except KeyError:
        raise ValueError(f"unknown Ray job status {status!r}; known: {', '.join(_FROM_RAY)}") from None


def can_move(old: JobState, new: JobState) -> bool:
    return new in _EDGES[old]


def decide(job_id: str, current: JobState, event: Event) -> Transition | None:
    """The transition `event` causes from `current`, or None (no change, or not an allowed edge).

    A report that contradicts a final record (a SUCCEEDED job seen RUNNING) is ignored rather than
    applied: terminal states are absorbing.
    """
    if isinstance(event, Vanished):
        if current in ACTIVE:
            return Transition(job_id, current, "LOST", "the cluster no longer knows this job", "head_lost")
        return None
    if isinstance(event, Unreachable):
        if current in ACTIVE:
            return Transition(job_id, current, "LOST", f"the cluster has not answered for {event.seconds:.0f} s",
                              "cluster_unreachable")
        return None
    if isinstance(event, Died):
        if current in ACTIVE:
            return Transition(job_id, current, "LOST", f"the driver died: {event.message}".rstrip(": "), event.cause)
        return None
    new = from_ray(event.ray_status)
    if new == current or not can_move(current, new):
        return None
    reason = f"cluster reports {event.ray_status}" + (f": {event.message}" if event.message else "")
    return Transition(job_id, current, new, reason)
