"""The hang watchdog (jobs/watchdog.py): a wait past its limit fails the waiting thread with a line naming
the rank, the host and what it waited for; a thread blocked outside Python makes the process exit."""

from __future__ import annotations

import re
import threading
import time

import pytest

from jobs import watchdog
from jobs.data.steps import synchronized_steps
from jobs.data.stream import EmptyEpoch


def _run_in_thread(fn) -> dict:  # noqa: ANN001 - the body
    box: dict = {}

    def body() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            box["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(10)
    box["alive"] = thread.is_alive()
    return box


def test_a_stall_in_python_raises_hang_detected_naming_rank_host_and_what() -> None:
    told: list[str] = []
    exits: list[int] = []
    dog = watchdog.Watchdog(0.4, rank=3, host="node-a (10.0.0.7)", notify=told.append, hard_exit=exits.append)
    watchdog.install(dog)
    try:
        def stalled() -> None:
            with watchdog.waiting(lambda: "the data stream (epoch 0, shard s3://b/00003.tar, offset 17)"):
                while True:  # a stream that never yields, polling in Python
                    time.sleep(0.01)

        started = time.monotonic()
        box = _run_in_thread(stalled)
    finally:
        watchdog.install(None)
    assert not box["alive"] and isinstance(box["error"], watchdog.HangDetected)
    assert time.monotonic() - started < 3
    expected = (r"rank 3 on node-a \(10\.0\.0\.7\) made no progress for \d+ s \(train\.hang_timeout_s=0\.4\): "
                r"waiting for the data stream \(epoch 0, shard s3://b/00003\.tar, offset 17\)")
    assert len(told) == 1 and re.fullmatch(expected, told[0]) and str(box["error"]) == told[0] and exits == []


def test_a_thread_blocked_outside_python_makes_the_process_exit() -> None:
    exits: list[int] = []
    release = threading.Event()

    def hard_exit(code: int) -> None:
        exits.append(code)
        release.set()  # a real exit would end the blocked thread with the process

    dog = watchdog.Watchdog(0.3, rank=0, host="h", exit_grace_s=0.3, hard_exit=hard_exit)
    watchdog.install(dog)
    try:
        def blocked() -> None:
            with watchdog.waiting("the other ranks to agree on the next step (all-reduce)",
                                  watchdog.COLLECTIVE_ALLOWANCE):
                release.wait()  # a C-level lock wait: no bytecode runs, the async exception waits

        box = _run_in_thread(blocked)
    finally:
        watchdog.install(None)
    assert exits == [watchdog.HANG_EXIT_CODE]
    assert isinstance(box["error"], watchdog.HangDetected)  # and it lands once the C call returns
    assert dog.fired is not None and "waiting for the other ranks to agree" in dog.fired


def test_waits_within_the_limit_and_no_watchdog_cost_nothing() -> None:
    exits: list[int] = []
    dog = watchdog.Watchdog(0.5, rank=0, host="h", hard_exit=exits.append)
    watchdog.install(dog)
    try:
        for _ in range(5):
            with watchdog.waiting("a short wait"):
                time.sleep(0.2)  # each wait is under the limit, their sum is not
        time.sleep(0.6)  # and time outside any wait does not count
    finally:
        watchdog.install(None)
    assert dog.fired is None and exits == []
    with watchdog.waiting("anything"):  # uninstalled: a no-op context
        pass
    with pytest.raises(ValueError):
        watchdog.Watchdog(0, rank=0)


class _NoData:
    """A stream whose every epoch is empty (a rank's share smaller than one batch)."""

    epoch_number = 0

    def planned_batches(self) -> int:
        return 1  # by the indexes one batch, but a step needs 2

    def epoch(self):  # noqa: ANN201 - iterator
        return iter(())

    def next_epoch(self) -> None:
        self.epoch_number += 1

    def describe(self) -> str:
        return "nothing"


def test_an_epoch_without_a_step_raises_instead_of_looping() -> None:
    with pytest.raises(EmptyEpoch, match=r"epoch 0 gave the ranks no full step of 2 batch\(es\)"):
        next(synchronized_steps(_NoData(), 2, "cpu"))
