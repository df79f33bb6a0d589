"""What the user sees while a sweep runs: trials done / running / pending and the best so far.

`ProgressBoard` keeps each trial's status, step and latest metric value and renders them: a live
table on a terminal, elsewhere one plain line whenever a trial changes state or a new best appears.
Tune feeds it through `TuneEvents`, a callback that calls it after every step of Tune's control
loop with all trials (restored ones included, so a resumed sweep counts what was already done).

Why the callback holds no state and forwards to the module's active board: Tune pickles its
callbacks with the experiment and unpickles those on `Tuner.restore` (which takes no new
callbacks), so the instance alive in a resumed sweep is not the one this process made; whichever
instance runs, it reports to the board of the process that is driving the sweep now.
Imports Ray: import this module only where a sweep runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ray.tune import Callback
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from orchestrator.sweep.spec import SweepPlan

_STATUS = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "TERMINATED": "done", "ERROR": "failed"}


_board: ProgressBoard | None = None  # the board of the sweep this process is driving


class TuneEvents(Callback):
    """Forwards Tune's events to the active board (see the module docstring)."""

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        if _board is not None:
            _board.on_trial_result(trial, result)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if _board is not None:
            _board.on_trial_error(trial)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if _board is not None:
            _board.on_step_end(trials)


@contextmanager
def showing(board: ProgressBoard) -> Iterator[ProgressBoard]:
    """Make `board` the one Tune's events reach, rendering it while the block runs."""
    global _board
    _board = board
    try:
        with board:
            yield board
    finally:
        _board = None


class ProgressBoard:
    """Each trial's status, step and latest metric value, rendered."""

    def __init__(self, plan: SweepPlan, console: Console) -> None:
        self.plan = plan
        self.console = console
        self.status: dict[str, str] = {plan.trial_name(p, s): "pending" for p, s in plan.trials}
        self.step: dict[str, int] = {}
        self.value: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self._live: Live | None = None
        self._last_line = ""

    # -- Tune's events -------------------------------------------------------------------------
    def on_trial_result(self, trial: Any, result: dict[str, Any]) -> None:
        name = self._name(trial)
        if "step" in result:
            self.step[name] = int(result["step"])
        value = result.get(self.plan.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            self.value[name] = float(value)

    def on_trial_error(self, trial: Any) -> None:
        self.errors[self._name(trial)] = _last_error_line(trial)

    def on_step_end(self, trials: list[Any]) -> None:
        for trial in trials:
            name = self._name(trial)
            self.status[name] = _STATUS.get(trial.status, trial.status.lower())
            last = trial.last_result or {}
            if name not in self.step and "step" in last:  # restored trials: their saved last result
                self.step[name] = int(last["step"])
            if name not in self.value and isinstance(last.get(self.plan.metric), int | float):
                self.value[name] = float(last[self.plan.metric])
        self._render()

    # -- state -------------------------------------------------------------------------------
    def _name(self, trial: Any) -> str:
        return self.plan.trial_name(trial.config["point"], int(trial.config["seed"]))

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("done", "running", "pending", "failed")}
        for s in self.status.values():
            out[s if s in out else "pending"] += 1
        return out

    def best(self) -> tuple[str, float] | None:
        if not self.value:
            return None
        pick = max if self.plan.mode == "max" else min
        name = pick(self.value, key=lambda n: self.value[n])
        return name, self.value[name]

    def headline(self) -> str:
        c = self.counts()
        line = (f"{self.plan.name}: {c['done']}/{len(self.status)} done · {c['running']} running · "
                f"{c['pending']} pending" + (f" · {c['failed']} failed" if c["failed"] else ""))
        best = self.best()
        if best:
            name, value = best
            point = self.plan.point(name.rsplit("-s", 1)[0])
            line += f" · best {self.plan.metric} = {value:.4g} ({point.label}, {name})"
        return line

    # -- rendering ---------------------------------------------------------------------------
    def __enter__(self) -> ProgressBoard:
        if self.console.is_terminal:
            self._live = Live(self._table(), console=self.console, refresh_per_second=2)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.stop()

    def _table(self) -> Group:
        t = Table(title_justify="left")
        for col in ("trial", "config", "status", "step", self.plan.metric):
            t.add_column(col, justify="right" if col in ("step", self.plan.metric) else "left")
        for point_id, seed in self.plan.trials:
            name = self.plan.trial_name(point_id, seed)
            point = self.plan.point(point_id)
            value = self.value.get(name)
            t.add_row(name, point.label, self.status[name], f"{self.step.get(name, 0)}/{point.steps}",
                      "" if value is None else f"{value:.4g}")
        return Group(self.headline(), t)

    def _render(self) -> None:
        if self._live is not None:
            self._live.update(self._table())
            return
        line = self.headline()
        if line != self._last_line:
            self.console.print(line, highlight=False, soft_wrap=True)
            self._last_line = line


def _last_error_line(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    try:
        with open(path) as f:  # type: ignore[arg-type]
            lines = [ln.strip() for ln in f if ln.strip()]
    except (OSError, TypeError):
        return "failed (no error file)"
    return lines[-1] if lines else "failed"
