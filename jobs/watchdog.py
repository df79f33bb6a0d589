"""Hang detection: a rank that makes no progress for `train.hang_timeout_s` fails, naming what it waited for.

A synchronous step hangs silently when one rank stops: a data stream whose shard read never
returns (a stalled S3 GET, a dead NFS mount), or a collective whose peer is gone or wedged. Every
other rank then waits in its next collective, and the default process-group timeout (30 min) is
the only thing that ends it, with a message about a socket. Here the train loop marks what it is
waiting for (`waiting("the data stream ...")`), and a thread per rank checks the mark:

- a wait past its limit fails the rank with `HangDetected` ("rank 1 on host-a (10.0.0.3) made no
  progress for 60 s: waiting for the data stream (epoch 0, shard .../00003.tar)"), first as an
  exception raised in the training thread (CPython's PyThreadState_SetAsyncExc, delivered at the
  next bytecode); a thread blocked inside C (a lock, a socket, a collective) never runs one, so
  after `_EXIT_GRACE_S` the process exits, and Ray Train restarts the group from its latest
  checkpoint like after any worker failure (`train.max_failures`);
- the line is sent to the driver first (`notify`), which shows it, keeps it in `events.jsonl` and
  names it as the cause if the run ends there;
- a rank that waits in a collective waits on the others, so its limit is 25 % longer: the rank
  that is itself stuck is named first. Start-up waits (the first batch of an epoch: Ray Data
  schedules its read tasks) get three times the limit.

Legend: none (no tensors here).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

log = logging.getLogger(__name__)

COLLECTIVE_ALLOWANCE = 1.25
STARTUP_ALLOWANCE = 3.0
_EXIT_GRACE_S = 5.0
HANG_EXIT_CODE = 75  # EX_TEMPFAIL: the worker died on purpose, a restart may succeed


class HangDetected(RuntimeError):
    """A rank made no progress for longer than train.hang_timeout_s."""


def host_label() -> str:
    """`hostname (ip)`: what a user needs to find the machine."""
    name = socket.gethostname()
    try:
        import ray.util

        return f"{name} ({ray.util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001 - outside Ray (unit tests): the name alone
        return name


class Watchdog:
    """Watches one rank's training thread; `waiting(what)` marks what it blocks on."""

    def __init__(self, timeout_s: float, rank: int, *, host: str | None = None,
                 notify: Callable[[str], None] | None = None, exit_grace_s: float = _EXIT_GRACE_S,
                 hard_exit: Callable[[int], None] = os._exit) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.timeout_s, self.rank, self.host = timeout_s, rank, host or host_label()
        self.notify, self.exit_grace_s, self.hard_exit = notify, exit_grace_s, hard_exit
        self._mark: tuple[str | Callable[[], str], float, float, int] | None = None  # what, since, limit, thread
        self._seq = 0  # bumped by every mark: a fire is for the mark it saw
        self._stop = threading.Event()
        self.fired: str | None = None
        self._thread = threading.Thread(target=self._watch, name=f"mmpt-watchdog-rank{rank}", daemon=True)
        self._thread.start()

    @contextmanager
    def waiting(self, what: str | Callable[[], str], allowance: float = 1.0) -> Iterator[None]:
        self._seq += 1
        self._mark = (what, time.monotonic(), self.timeout_s * allowance, threading.get_ident())
        try:
            yield
        finally:
            self._mark = None

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(period):
            mark, seq = self._mark, self._seq
            if mark is None or self.fired is not None:
                continue
            what, since, limit, thread_id = mark
            waited = time.monotonic() - since
            if waited > limit:
                self._fire(what() if callable(what) else what, waited, seq, thread_id)

    def _fire(self, what: str, waited: float, seq: int, thread_id: int) -> None:
        message = (f"rank {self.rank} on {self.host} made no progress for {waited:.0f} s "
                   f"(train.hang_timeout_s={self.timeout_s:g}): waiting for {what}")
        self.fired = message
        log.error("%s", message)
        print(f"mmpt: {message}", file=sys.stderr, flush=True)
        if self.notify is not None:
            try:
                self.notify(message)
            except Exception as exc:  # noqa: BLE001 - the failure must happen even if the driver is gone
                log.warning("could not tell the driver about the hang: %s", exc)
        # Raised in the training thread at its next bytecode; a thread blocked in C never gets there.
        # CPython raises an async exception by its class with no arguments: the message rides on a subclass.
        named = type("HangDetected", (HangDetected,), {"__init__": lambda exc, *_: HangDetected.__init__(exc, message),
                                                        "__module__": __name__})
        if self._seq == seq and self._mark is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(named))
        deadline = time.monotonic() + self.exit_grace_s
        while time.monotonic() < deadline:
            if self._seq != seq or self._mark is None:
                return  # the exception landed: the thread left its wait and unwinds
            time.sleep(0.05)
        log.error("rank %d is blocked outside Python; exiting so the worker group restarts", self.rank)
        self.hard_exit(HANG_EXIT_CODE)


_current: Watchdog | None = None


def install(dog: Watchdog | None) -> None:
    """The rank's watchdog (None: none, every `waiting` is free)."""
    global _current
    if _current is not None:
        _current.close()
    _current = dog


def waiting(what: str | Callable[[], str], allowance: float = 1.0) -> AbstractContextManager[None]:
    """Mark what the training thread is about to block on (a no-op without a watchdog)."""
    return nullcontext() if _current is None else _current.waiting(what, allowance)
