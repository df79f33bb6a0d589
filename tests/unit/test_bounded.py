"""jobs.bounded.call_within: a result, an exception, or TookTooLong after the budget."""

from __future__ import annotations

import threading
import time

import pytest

from jobs.bounded import TookTooLong, call_within


def test_returns_the_result_and_reraises_the_exception() -> None:
    assert call_within(lambda: 41 + 1, 5.0, "add") == 42
    with pytest.raises(KeyError, match="missing"):
        call_within(lambda: {}["missing"], 5.0, "lookup")


def test_gives_up_after_the_budget_and_leaves_a_daemon_thread() -> None:
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(TookTooLong, match=r"stuck-read: no answer within 0.2 s"):
        call_within(release.wait, 0.2, "stuck-read")
    assert 0.2 <= time.monotonic() - started < 2.0
    stuck = [t for t in threading.enumerate() if t.name == "stuck-read"]
    assert len(stuck) == 1 and stuck[0].daemon  # does not pin the process at exit
    release.set()
    stuck[0].join(2.0)
    assert not stuck[0].is_alive()
