"""Calls that must not wait forever on storage: a read accepted and never answered blocks in C, past
any Python timeout, for the S3 client's attempts × request timeout (minutes)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class TookTooLong(TimeoutError):
    """The call did not return within its budget; it goes on in a daemon thread, unwaited for."""


def call_within(fn: Callable[[], T], budget_s: float, name: str) -> T:
    """`fn()`'s result (or its exception) if it ends within `budget_s`, else TookTooLong.

    The call runs in a daemon thread so that a stuck read does not pin the process at exit.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    thread.join(budget_s)
    if thread.is_alive():
        raise TookTooLong(f"{name}: no answer within {budget_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["result"]
