"""What the user sees while a run trains: a progress line per report, and the final tables.

Ray's and DeepSpeed's own output goes to the run's log file (`capture_output`); the console only
gets this module's lines. On a terminal the progress is a live bar with an ETA; elsewhere (CI, a
pipe) one plain line per report, so logs stay readable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from models import metric_keys as mk


@contextmanager
def capture_output(log_file: Path) -> Iterator[TextIO]:
    """Send everything written to fd 1/2 (Ray, DeepSpeed, worker logs) to `log_file`.

    Yields a stream to the original stdout for the user-facing console. Works at the file-
    descriptor level because Ray's log monitor and C++ components bypass `sys.stdout`.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console_stream = os.fdopen(os.dup(saved_out), "w", buffering=1)
    saved_sys = sys.stdout, sys.stderr
    with open(log_file, "a", buffering=1) as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        # Python-level writers too: under a test runner sys.stdout need not be fd 1.
        sys.stdout = sys.stderr = sink
        try:
            yield console_stream
        finally:
            sink.flush()
            sys.stdout, sys.stderr = saved_sys
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            console_stream.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressView:
    """Renders training reports: live bar on a terminal, plain lines otherwise."""

    def __init__(self, console: Console, total_steps: int, title: str) -> None:
        self.console = console
        self.total = total_steps
        self.title = title
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> ProgressView:
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.total, stats="starting Ray workers…")
        else:
            self.console.print(f"{self.title}: {self.total} steps")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def status(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, stats=text)
        else:
            self.console.print(text)

    def update(self, m: Mapping[str, Any], eta_s: float | None) -> None:
        step = int(m.get("step", 0))
        stats = (f"loss {m.get(mk.TOTAL_LOSS, float('nan')):.3f} · {m.get('samples_per_s', 0):.0f} samples/s"
                 f" · data wait {100 * m.get('data_wait_share', 0):.0f}%")
        if mk.RETRIEVAL_R1[0] in m:
            stats += f" · eval R@1 {m['eval/i2t_r1']:.2f}"
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        else:
            eta = f" · ETA {eta_s:.0f}s" if eta_s is not None else ""
            self.console.print(f"step {step}/{self.total} · {stats}{eta}", highlight=False, soft_wrap=True)


# DALL-E and dVAE runs (jobs/generative/probe.py): generated images judged against their captions,
# then the judge's references (the dVAE's reconstructions: the ceiling; the real images; real images
# of other captions), and the dVAE's reconstruction error
GENERATION_ROWS = ("gen_match_rate", "gen_color_match_rate", "gen_shape_match_rate", "recon_match_rate",
                   "recon_color_match_rate", "real_match_rate", "shuffled_match_rate", "dvae_recon_mse")


def summary_tables(summary: Mapping[str, Any]) -> list[Table]:
    """The final losses and the held-out evaluation, as rich tables."""
    losses = Table(title="final training losses", title_justify="left", min_width=48)
    losses.add_column("term")
    losses.add_column("value", justify="right")
    for name, value in summary.get("final_losses", {}).items():
        losses.add_row(name, _fmt(value))
    tables = [losses]
    ev = summary.get("eval") or {}
    if ev:
        t = Table(title=f"held-out evaluation ({int(ev.get('samples', 0))} samples)", title_justify="left", min_width=48)
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_column("chance", justify="right")
        chance = {"itm_acc": 0.5, "i2t_r1": ev.get("chance_r1"), "t2i_r1": ev.get("chance_r1"),
                  "itc_i2t_r1": ev.get("itc_chance_r1"), "itc_t2i_r1": ev.get("itc_chance_r1"),
                  # DALL-E: images of uniformly random dVAE tokens, judged against the same captions
                  **{f"gen_{w}_rate": ev.get(f"random_{w}_rate") for w in ("match", "color_match", "shape_match")}}
        for name in ("itm_acc", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                     "itc_i2t_r1", "itc_i2t_r5", "itc_i2t_r10", "itc_t2i_r1", "itc_t2i_r5", "itc_t2i_r10",
                     "mlm_acc", "mlm_token_acc", "mlm_grounded_acc", "mlm_blind_acc", "mlm_blind_grounded_acc",
                     "mlm_grounding_gain", *GENERATION_ROWS, "loss"):
            if name in ev:
                c = chance.get(name)
                t.add_row(name, _fmt(ev[name]), "" if c is None else _fmt(c))
        tables.append(t)
    if mem := summary.get("memory"):
        tables.append(memory_table(mem))
    return tables


def memory_table(mem: Mapping[str, float]) -> Table:
    """Model states one rank holds (measured) next to the ZeRO paper's figure for this stage."""
    mib = 2.0**20
    t = Table(title=f"model states per rank (ZeRO-{int(mem['zero_stage'])}, {int(mem['dp'])} data-parallel ranks, "
                    f"ep {int(mem['ep'])})", title_justify="left", min_width=48)
    for col in ("", "measured MiB", "ZeRO paper MiB"):
        t.add_column(col, justify="right" if col else "left")
    for part in ("params", "grads", "optim"):
        t.add_row(part, f"{mem[f'{part}_bytes'] / mib:.2f}", f"{mem[f'expected_{part}_bytes'] / mib:.2f}")
    t.add_row("total", f"{mem['total_bytes'] / mib:.2f}", f"{mem['expected_bytes'] / mib:.2f}")
    return t
