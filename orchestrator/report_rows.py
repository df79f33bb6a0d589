"""The rows of a sweep report and how their cells print: shared by the tables (report.py) and the
HTML page (report_html.py), so both read one definition and neither imports the other's module."""

from __future__ import annotations

from dataclasses import dataclass, field

SPEED = ("wall_time_s", "samples_per_s", "tokens_per_s")
MEMORY = "memory/total_bytes"


@dataclass
class TrialResult:
    name: str
    point: str
    seed: int
    status: str  # finished | partial (stopped or interrupted) | not run
    steps: int
    values: dict[str, float] = field(default_factory=dict)  # final figures, keyed like metrics.jsonl
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # loss/<term> -> (step, value)


@dataclass
class Stat:
    mean: float
    std: float
    n: int


@dataclass
class Row:
    point: str
    label: str
    seeds: int  # planned
    finished: int
    steps: float
    stats: dict[str, Stat]


def title(key: str) -> str:
    named = {"loss/total": "loss", "eval/i2t_r1": "i2t R@1", "eval/t2i_r1": "t2i R@1", MEMORY: "model states MB",
             "wall_time_s": "wall s", "samples_per_s": "samples/s", "tokens_per_s": "tokens/s"}
    if key in named:
        return named[key]
    if key.startswith("loss/"):
        return f"{key[5:]} loss"
    return key.removeprefix("eval/").replace("_", " ")


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"


def cell(stat: Stat | None, key: str = "") -> str:
    if stat is None:
        return "—"
    scale = 1e-6 if key == MEMORY else 1.0
    mean = _num(stat.mean * scale)
    return f"{mean} ± {_num(stat.std * scale)}" if stat.n > 1 else mean
