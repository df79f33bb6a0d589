"""The transfer table of a sweep whose trials fine-tune (`finetune:`): task x label budget x
{pretrained, scratch}, mean ± spread over seeds, and whether each difference exceeds the spread.

Built from the sweep's files (orchestrator/report/sweep_report.py loads the trials). Each trial's task, label
budget and init are read from its resolved config, so any sweep over `finetune.*` keys gets the
table; the figure is `eval/test_score` (accuracy for classification and VQA, mean i2t/t2i R@1 for
retrieval; jobs/transfer/finetune_loop.py). Spread = the sample std over seeds (ddof 1).

A difference (pretrained - scratch, paired by seed: both see the same label subset and data order)
is marked as exceeding the spread when |mean difference| > std(pretrained) + std(scratch), i.e. when
the two ±1 std bands do not overlap; otherwise it is marked "within spread" (≈) and should not be
read as a difference. The paired difference's own std is shown beside it.

Zero-shot rows (label budget 0) come from the pretraining run's summary (`zs_<task>_top1_acc`; one
pretraining run, so no spread); its scratch counterpart is chance, 1 / classes.

Writes `transfer.md` and `transfer.html` (table + plot: score against label budget per task, one
line per init with ±std error bars, each seed a dot) into the sweep directory.
"""

from __future__ import annotations

import html
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from models import metric_keys as mk
from orchestrator.report.rows import TrialResult
from orchestrator.run.files import read_summary, run_uri
from orchestrator.sweep.spec import PRETRAIN_RUN, SweepPlan

SCORE = mk.key(mk.EVAL, "test_score")
INITS = ("pretrained", "scratch")


@dataclass
class Cell:
    values: list[float]  # one per seed, seed order

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def text(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}" if len(self.values) > 1 else f"{self.mean:.3f}"


@dataclass
class TransferRow:
    task: str
    labels: int | None  # None = all; 0 = zero-shot
    cells: dict[str, Cell]
    diff: Cell | None  # paired pretrained - scratch
    train_examples: float | None

    @property
    def budget(self) -> str:
        return "0 (zero-shot)" if self.labels == 0 else "all" if self.labels is None else str(self.labels)

    @property
    def verdict(self) -> str:
        p, s = self.cells.get("pretrained"), self.cells.get("scratch")
        if p is None or s is None:
            return ""
        spread = p.std + s.std
        if len(p.values) < 2 or len(s.values) < 2:
            return "no spread (1 run)"
        return "exceeds spread" if abs(p.mean - s.mean) > spread else "≈ within spread"


def _key(plan: SweepPlan, point: str) -> tuple[str, int | None, str] | None:
    cfg = plan.trial_config(point, plan.seeds[0])
    ft = cfg.finetune
    return None if ft is None else (ft.task, ft.labels, ft.init)


def is_transfer(plan: SweepPlan) -> bool:
    return "finetune" in plan.base or any(k.startswith("finetune.") for p in plan.points for k in p.overrides)


def _zero_shot_rows(plan: SweepPlan, tasks: list[str]) -> list[TransferRow]:
    from jobs.transfer.tasks import SHAPES_TASKS

    summary = read_summary(run_uri(plan.sweep_dir, PRETRAIN_RUN))
    if plan.pretrain is None or summary is None:
        return []
    ev = summary.get("eval") or {}
    rows = []
    for task in tasks:
        if f"zs_{task}_top1_acc" in ev and task in SHAPES_TASKS:
            rows.append(TransferRow(task, 0, {"pretrained": Cell([ev[f"zs_{task}_top1_acc"]]),
                                              "scratch": Cell([1.0 / len(SHAPES_TASKS[task].classes)])}, None, 0.0))
    return rows


def transfer_rows(plan: SweepPlan, trials: list[TrialResult]) -> list[TransferRow]:
    by: dict[tuple[str, int | None], dict[str, dict[int, TrialResult]]] = {}
    for point in plan.points:
        key = _key(plan, point.id)
        if key is None:
            continue
        task, labels, init = key
        mine = {t.seed: t for t in trials if t.point == point.id and SCORE in t.values}
        by.setdefault((task, labels), {})[init] = mine
    tasks = list(dict.fromkeys(task for task, _ in by))
    rows = _zero_shot_rows(plan, tasks)
    order = {None: float("inf")}
    for (task, labels), inits in sorted(by.items(), key=lambda kv: (tasks.index(kv[0][0]), order.get(kv[0][1], kv[0][1]))):
        cells = {i: Cell([t.values[SCORE] for _, t in sorted(inits[i].items())]) for i in INITS if inits.get(i)}
        paired = sorted(set(inits.get("pretrained", {})) & set(inits.get("scratch", {})))
        diff = Cell([inits["pretrained"][s].values[SCORE] - inits["scratch"][s].values[SCORE] for s in paired]) if paired else None
        examples = [t.values.get(mk.key(mk.EVAL, "train_examples")) for i in inits.values() for t in i.values()]
        rows.append(TransferRow(task, labels, cells, diff, next((e for e in examples if e is not None), None)))
    return sorted(rows, key=lambda r: (tasks.index(r.task), order.get(r.labels, r.labels)))  # type: ignore[arg-type]


_HEADS = ("task", "labels", "examples", "pretrained", "scratch", "pretrained − scratch", "")


def _cells(r: TransferRow) -> list[str]:
    return [r.task, r.budget, "" if r.train_examples is None else f"{r.train_examples:.0f}",
            *(r.cells[i].text() if i in r.cells else "—" for i in INITS),
            "" if r.diff is None else f"{r.diff.mean:+.3f} ± {r.diff.std:.3f}", r.verdict]


def markdown(plan: SweepPlan, rows: list[TransferRow]) -> str:
    lines = ["| " + " | ".join(_HEADS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 4 + ["---"]) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return (f"# Transfer: {plan.name}\n\n{SCORE} on the test split (accuracy; retrieval: mean of i2t/t2i R@1), "
            f"mean ± std over seeds {plan.seeds}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes(rows)) + "\n")


def notes(rows: list[TransferRow]) -> list[str]:
    out = ["a difference exceeds the spread when |pretrained − scratch| > std(pretrained) + std(scratch) "
           "(the ±1 std bands do not overlap); ≈ marks one within it"]
    over = [f"{r.task}@{r.budget}" for r in rows if r.verdict == "exceeds spread"]
    within = [f"{r.task}@{r.budget}" for r in rows if r.verdict.startswith("≈")]
    out.append(f"exceed the spread: {', '.join(over) or 'none'}; within it: {', '.join(within) or 'none'}")
    out.append("a seed draws the label subset, the data order and the head's (a scratch encoder's) init; every "
               "pretrained trial starts from the one pretraining run, so the spread leaves out pretraining's own")
    return out


def plot(plan: SweepPlan, rows: list[TransferRow]) -> str:
    from orchestrator.report.sweep_page import _png

    tasks = list(dict.fromkeys(r.task for r in rows))
    fig = Figure(figsize=(4.2 * max(1, len(tasks)), 3.6))
    fig.subplots_adjust(left=0.08, right=0.98, top=0.86, bottom=0.18, wspace=0.3)
    for n, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), n + 1)
        mine = [r for r in rows if r.task == task and r.labels != 0]
        xs = list(range(len(mine)))
        for i, (init, color) in enumerate(zip(INITS, ("C0", "C1"), strict=True)):
            pts = [(x, r.cells[init]) for x, r in zip(xs, mine, strict=True) if init in r.cells]
            if not pts:
                continue
            ax.errorbar([x + 0.06 * (i - 0.5) for x, _ in pts], [c.mean for _, c in pts], yerr=[c.std for _, c in pts],
                        color=color, marker="o", capsize=4, label=init)
            for x, c in pts:
                ax.scatter([x + 0.06 * (i - 0.5)] * len(c.values), c.values, color=color, s=8, alpha=0.5)
        zs = next((r for r in rows if r.task == task and r.labels == 0), None)
        if zs is not None:
            ax.axhline(zs.cells["pretrained"].mean, color="C0", linestyle=":", label="zero-shot")
            ax.axhline(zs.cells["scratch"].mean, color="gray", linestyle="--", label="chance")
        ax.set_xticks(xs, [r.budget for r in mine])
        ax.set(xlabel="labelled examples", ylabel="test score", title=task)
        if ax.get_legend_handles_labels()[0]:  # nothing to label when no trial reported
            ax.legend(fontsize=7)
    fig.suptitle(f"{plan.name}: pretrained vs scratch (mean ± std over {len(plan.seeds)} seeds)", fontsize=9)
    return _png(fig)


def render_html(plan: SweepPlan, rows: list[TransferRow]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in _HEADS)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows)
    img = f'<img alt="test score against label budget" src="data:image/png;base64,{plot(plan, rows)}">' if rows else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>transfer {esc(plan.name)}</title></head><body>"
            f"<h1>Transfer: {esc(plan.name)}</h1><p><code>{SCORE}</code>, mean ± std over seeds {esc(str(plan.seeds))}</p>"
            f"<table border=1 cellpadding=4><tr>{head}</tr>{body}</table>"
            f"<ul>{''.join(f'<li>{esc(n)}</li>' for n in notes(rows))}</ul><div>{img}</div></body></html>\n")


def write_transfer(plan: SweepPlan, trials: list[TrialResult]) -> dict[str, Any]:
    """transfer.md and transfer.html in the sweep directory; {} when the sweep fine-tunes nothing."""
    if not is_transfer(plan):
        return {}
    rows = transfer_rows(plan, trials)
    out = Path(plan.sweep_dir)
    files = {"transfer_markdown": out / "transfer.md", "transfer_html": out / "transfer.html"}
    files["transfer_markdown"].write_text(markdown(plan, rows))
    files["transfer_html"].write_text(render_html(plan, rows))
    return files
