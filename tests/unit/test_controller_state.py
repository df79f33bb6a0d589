"""The job state machine, every (state, event) pair, without Ray."""

from __future__ import annotations

import pytest

from orchestrator.controller.state import (
    STATES,
    TERMINAL,
    Died,
    Observed,
    Unreachable,
    Vanished,
    can_move,
    decide,
    from_ray,
)

RAY_STATUSES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")

# (current state, event) -> new state; every pair not listed is "no change".
EXPECTED = {
    ("PENDING", "RUNNING"): "RUNNING",
    ("PENDING", "SUCCEEDED"): "SUCCEEDED",
    ("PENDING", "FAILED"): "FAILED",
    ("PENDING", "STOPPED"): "STOPPED",
    ("PENDING", "vanished"): "LOST",
    ("PENDING", "died"): "LOST",
    ("PENDING", "unreachable"): "LOST",
    ("RUNNING", "SUCCEEDED"): "SUCCEEDED",
    ("RUNNING", "FAILED"): "FAILED",
    ("RUNNING", "STOPPED"): "STOPPED",
    ("RUNNING", "vanished"): "LOST",
    ("RUNNING", "died"): "LOST",
    ("RUNNING", "unreachable"): "LOST",
    ("LOST", "PENDING"): "PENDING",  # a head restored with GCS fault tolerance lists the old job again
    ("LOST", "RUNNING"): "RUNNING",
    ("LOST", "SUCCEEDED"): "SUCCEEDED",
    ("LOST", "FAILED"): "FAILED",
    ("LOST", "STOPPED"): "STOPPED",
}


@pytest.mark.parametrize("current", STATES)
@pytest.mark.parametrize("event", [*RAY_STATUSES, "vanished", "died", "unreachable"])
def test_every_state_event_pair(current: str, event: str) -> None:
    ev = {"vanished": Vanished(), "died": Died("driver_killed", "why"), "unreachable": Unreachable(130.0)}.get(
        event, Observed(event, "why"))
    t = decide("job-1", current, ev)  # type: ignore[arg-type]
    want = EXPECTED.get((current, event))
    if want is None:
        assert t is None
    else:
        assert t is not None and (t.job_id, t.old, t.new) == ("job-1", current, want)
        assert can_move(current, want)  # type: ignore[arg-type]


def test_the_table_has_fourteen_edges_and_terminal_states_are_absorbing() -> None:
    edges = [(a, b) for a in STATES for b in STATES if can_move(a, b)]
    assert len(edges) == 14
    assert TERMINAL == {"SUCCEEDED", "FAILED", "STOPPED"}
    for state in TERMINAL:
        assert not any(can_move(state, b) for b in STATES)
    assert not can_move("RUNNING", "PENDING")  # Ray jobs never go back


def test_transition_reasons_name_the_cluster_report_and_the_loss() -> None:
    t = decide("j", "RUNNING", Observed("FAILED", "exit code 1"))
    assert t is not None and t.reason == "cluster reports FAILED: exit code 1"
    lost = decide("j", "PENDING", Vanished())
    assert lost is not None and (lost.reason, lost.cause) == ("the cluster no longer knows this job", "head_lost")
    died = decide("j", "RUNNING", Died("driver_killed", "Job entrypoint command failed with exit code -9"))
    assert died is not None and (died.reason, died.cause) == (
        "the driver died: Job entrypoint command failed with exit code -9", "driver_killed")
    silent = decide("j", "RUNNING", Unreachable(121.4))
    assert silent is not None and (silent.reason, silent.cause) == ("the cluster has not answered for 121 s",
                                                                    "cluster_unreachable")


def test_unknown_ray_status_is_an_error_naming_the_known_ones() -> None:
    assert from_ray("succeeded") == "SUCCEEDED"
    with pytest.raises(ValueError, match=r"unknown Ray job status 'EXPLODED'; known: PENDING, RUNNING"):
        decide("j", "RUNNING", Observed("EXPLODED"))
