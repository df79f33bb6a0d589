"""The rows of a sweep report and how their cells print: shared by the tables (sweep_report.py) and the
HTML page (orchestrator/report/sweep_page.py), so both read one definition and neither imports the other's module."""

from __future__ import annotations

from dataclasses import dataclass, field

from models import metric_keys as mk

SPEED = ("wall_time_s", "samples_per_s", "tokens_per_s")
MEMORY = mk.MEMORY_TOTAL
DOWNSTREAM = mk.DOWNSTREAM


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


def is_downstream(key: str) -> bool:
    """Zero-shot classification and linear-probe figures (jobs/transfer/zero_shot.py)."""
    return key.startswith(DOWNSTREAM)


def downstream(keys: set[str]) -> list[str]:
    """eval/zs_<task>_top1_acc (then top-5) and eval/probe_<task>_acc, task by task."""
    def order(key: str) -> tuple[str, int]:
        zs, probe = DOWNSTREAM
        if key.startswith(zs):  # zs_<task>_top<k>_acc
            task, top = key.removeprefix(zs).removesuffix("_acc").rsplit("_", 1)
            return task, 0 if top == "top1" else 1
        return key.removeprefix(probe).removesuffix("_acc"), 2

    return sorted((k for k in keys if is_downstream(k) and k.endswith("_acc")), key=order)


def title(key: str) -> str:
    named = {mk.TOTAL_LOSS: "loss", mk.RETRIEVAL_R1[0]: "i2t R@1", mk.RETRIEVAL_R1[1]: "t2i R@1", MEMORY: "model states MB",
             "wall_time_s": "wall s", "samples_per_s": "samples/s", "tokens_per_s": "tokens/s"}
    if key in named:
        return named[key]
    if key.startswith(mk.LOSS):
        return f"{key[5:]} loss"
    if key.startswith(DOWNSTREAM[0]):  # eval/zs_shape_top1_acc -> zero-shot shape
        task, top = key.removeprefix(DOWNSTREAM[0]).removesuffix("_acc").rsplit("_", 1)
        return f"zero-shot {task}" + ("" if top == "top1" else f" {top[:3]}-{top[3:]}")
    if key.startswith(DOWNSTREAM[1]):
        return f"probe {key.removeprefix(DOWNSTREAM[1]).removesuffix('_acc')}"
    return key.removeprefix(mk.EVAL).replace("_", " ")


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"


def cell(stat: Stat | None, key: str = "", mark: str = "") -> str:
    """mean ± std (mean alone for one seed), then the spread mark (orchestrator/report/spread.py)."""
    if stat is None:
        return "—"
    scale = 1e-6 if key == MEMORY else 1.0
    mean = _num(stat.mean * scale)
    text = f"{mean} ± {_num(stat.std * scale)}" if stat.n > 1 else mean
    return f"{text} {mark}" if mark else text
