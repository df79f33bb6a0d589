"""Calls run beside the thread that watches them (`in_thread`), and calls that must not wait forever on
storage: a read accepted and never answered blocks in C, past any Python timeout, for the S3 client's
attempts × request timeout (minutes)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class TookTooLong(TimeoutError):
    """The call did not return within its budget; it goes on in a daemon thread, unwaited for."""


def in_thread(fn: Callable[[], Any], name: str) -> tuple[threading.Thread, dict[str, Any]]:
    """`fn()` started on a daemon thread; its box gets "result" or "error" (any exception, Ctrl-C's
    too) for the caller's thread to re-raise: the one way mmpt runs a call beside the thread that
    watches it (a storage read with a budget, `trainer.fit()` while the driver shows reports, a
    sweep trial while it forwards metrics). Daemon: a stuck call does not pin the process at exit."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    return thread, box


def call_within(fn: Callable[[], T], budget_s: float, name: str) -> T:
    """`fn()`'s result (or its exception) if it ends within `budget_s`, else TookTooLong."""
    thread, box = in_thread(fn, name)
    thread.join(budget_s)
    if thread.is_alive():
        raise TookTooLong(f"{name}: no answer within {budget_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["result"]
