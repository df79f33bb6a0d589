"""Resubmitting a run whose Ray job was lost: which losses are retried, when, and when to give up.

The registry, not the Ray head, is the source of truth. A run whose driver died (the job FAILED
because its supervisor died or its entrypoint was killed by a signal), whose cluster forgot it (a
head restarted without GCS fault tolerance) or whose cluster stayed unreachable past a grace period
is LOST; the controller then sends the same entrypoint, runtime env and run directory again as a
new Ray job (`<id>-a<N>`), and the run resumes from its last committed checkpoint at its exact data
position (jobs/checkpoint.py). What the run itself decided is final: a config error (exit 2), a
run that failed after its own in-cluster retries (exit 1, `train.max_failures`), an interrupt
(exit 130), a runtime env the cluster could not set up, a driver it could not schedule.

Bounded: at most `max_attempts` Ray jobs per run (the first submission included), attempt N+1 sent
`min(backoff_cap_s, backoff_s * backoff_factor**(N-1))` seconds after attempt N was found lost,
and a run LOST for longer than `give_up_after_s` (its cluster never came back) is FAILED.

Everything here is pure: `classify` and `decide` look at a record and the clock and return a
decision; the controller (reconcile.py) applies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from orchestrator.controller.registry import JobRecord
from orchestrator.jobsapi.cluster import ClusterJob

RetryReason = Literal["driver_killed", "driver_died", "head_lost", "cluster_unreachable"]
REASONS: tuple[RetryReason, ...] = get_args(RetryReason)

# Ray's JobErrorType values (ray.dashboard.modules.job.common) for a driver that died under the
# job's feet; every other error type is the job's own (runtime env, scheduling, entrypoint start).
_DRIVER_DIED = frozenset({"JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE"})
_EXIT_CODE = re.compile(r"failed with exit code (-?\d+)")
_SUPERVISOR_DIED = ("Job supervisor actor died", "Unexpected error occurred")
_SIGINT_EXIT = 130  # `mmpt run` interrupted: a person stopped it


class RetryConfigError(ValueError):
    """A retry setting out of range (one line)."""


@dataclass(frozen=True)
class RetryPolicy:
    """The controller's resubmission settings (`mmpt controller --max-attempts ...`)."""

    max_attempts: int = 3
    backoff_s: float = 30.0
    backoff_factor: float = 2.0
    backoff_cap_s: float = 600.0
    unreachable_grace_s: float = 120.0
    give_up_after_s: float = 3600.0

    def __post_init__(self) -> None:
        # named by the `mmpt controller` flags that set them
        problems = [f"{flag} {value:g}: {rule}" for flag, value, ok, rule in (
            ("--max-attempts", self.max_attempts, self.max_attempts >= 1, "at least 1 (1: never resubmit)"),
            ("--backoff", self.backoff_s, self.backoff_s >= 0, "seconds, >= 0"),
            ("--backoff-factor", self.backoff_factor, self.backoff_factor >= 1, ">= 1"),
            ("--backoff-cap", self.backoff_cap_s, self.backoff_cap_s >= self.backoff_s, f"at least --backoff ({self.backoff_s:g})"),
            ("--unreachable-grace", self.unreachable_grace_s, self.unreachable_grace_s >= 0, "seconds, >= 0"),
            ("--give-up-after", self.give_up_after_s, self.give_up_after_s > 0, "seconds, > 0"),
        ) if not ok]
        if problems:
            raise RetryConfigError("; ".join(problems))

    def delay(self, attempt: int) -> float:
        """Seconds between finding attempt `attempt` (1-based) lost and sending attempt + 1."""
        return min(self.backoff_cap_s, self.backoff_s * self.backoff_factor ** max(0, attempt - 1))


def exit_code(cj: ClusterJob) -> int | None:
    """The driver's exit code, from Ray's field or its message (older Ray versions)."""
    if cj.driver_exit_code is not None:
        return cj.driver_exit_code
    found = _EXIT_CODE.search(cj.message)
    return int(found.group(1)) if found else None


def classify(cj: ClusterJob) -> RetryReason | None:
    """Why a FAILED job's driver is gone, if that is a loss the controller retries; else None."""
    if str(cj.status).upper() != "FAILED":
        return None
    if cj.error_type in _DRIVER_DIED or (not cj.error_type and cj.message.startswith(_SUPERVISOR_DIED)):
        return "driver_died"
    code = exit_code(cj)
    # A signal: Ray reports -N for a child killed by signal N, a shell reports 128 + N.
    if code is not None and (code < 0 or (code > 128 and code != _SIGINT_EXIT)):
        return "driver_killed"
    return None


@dataclass(frozen=True)
class Wait:
    """Not yet: the backoff runs until `until`."""

    until: float


@dataclass(frozen=True)
class Resubmit:
    attempt: int  # the attempt this submission is (2 for the first resubmission)
    ray_job_id: str
    reason: RetryReason


@dataclass(frozen=True)
class GiveUp:
    message: str  # one line, the job's final message


Decision = Wait | Resubmit | GiveUp | None


def attempt_id(job_id: str, attempt: int) -> str:
    """The Ray submission id of attempt `attempt`: deterministic, so two controllers racing to
    resubmit the same run send the same id and the cluster refuses the second."""
    return job_id if attempt <= 1 else f"{job_id[:120]}-a{attempt}"


def _reason(rec: JobRecord) -> RetryReason:
    return rec.lost_reason if rec.lost_reason in REASONS else "head_lost"  # type: ignore[return-value]


def decide(rec: JobRecord, policy: RetryPolicy, now: float) -> Decision:
    """What to do about a LOST run now; None for a record this policy does not touch."""
    if rec.state != "LOST" or rec.kind != "run" or not rec.runtime_env or not rec.entrypoint:
        return None
    reason = _reason(rec)
    lost_at = rec.ended_at or rec.updated_at
    what = f"{reason.replace('_', ' ')}: {(rec.message or '').splitlines()[0] if rec.message else 'no message'}"
    if rec.attempt >= policy.max_attempts:
        return GiveUp(f"gave up after {rec.attempt} attempt{'s' * (rec.attempt > 1)} "
                      f"(--max-attempts {policy.max_attempts}); last: {what}")
    if now - lost_at >= policy.give_up_after_s:
        return GiveUp(f"gave up: lost for {now - lost_at:.0f} s (--give-up-after {policy.give_up_after_s:g}); last: {what}")
    until = lost_at + policy.delay(rec.attempt)
    if now < until:
        return Wait(until)
    return Resubmit(rec.attempt + 1, attempt_id(rec.id, rec.attempt + 1), reason)
