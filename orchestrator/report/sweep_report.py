"""`mmpt report SWEEP_DIR`: one row per configuration of a sweep, mean and spread over its seeds
(`mmpt report RUN_DIR`: one run's report, orchestrator/report/run_page.py).

Built from files alone: the sweep's `sweep.yaml` (points, seeds) and each trial's run directory
(`summary.json` when the run finished; otherwise the last lines of `metrics.jsonl`, e.g. a trial
ASHA stopped early). Columns come from the metric names the runs reported, not from a list of
objectives: every `loss/<term>` of the last report, the retrieval R@1 (eval/i2t_r1, eval/t2i_r1),
every held-out accuracy and gain (`eval/*_acc`, `eval/*_gain`: ITM, MLM, grounded-word MLM, ... as
reported), the model-state memory when measured, wall time and throughput. The terminal shows
them as three tables (losses, held-out evaluation, cost); the files hold one table. Spread is the sample standard
deviation over seeds (ddof 1), printed as mean ± std.

Writes `report.md` (the table), `report.csv` (all metrics: mean, std, n per configuration),
`trials.csv` (one row per trial) and `report.html` (self-contained, plots embedded).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from models import metric_keys as mk
from orchestrator.config import ConfigError
from orchestrator.report.rows import (
    MEMORY,
    SPEED,
    Row,
    Stat,
    TrialResult,
    cell,
    downstream,
    is_downstream,
    title,
)
from orchestrator.report.spread import all_marks
from orchestrator.report.spread import note as spread_note
from orchestrator.run.files import REPORT, read_metrics, read_summary, run_uri
from orchestrator.sweep.spec import SweepPlan, load_plan

_R1 = mk.RETRIEVAL_R1


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def load_trial(plan: SweepPlan, point_id: str, seed: int) -> TrialResult:
    name = plan.trial_name(point_id, seed)
    run_dir = run_uri(plan.sweep_dir, name)
    records = read_metrics(run_dir)
    summary = read_summary(run_dir)
    t = TrialResult(name=name, point=point_id, seed=seed, status="not run", steps=0)
    if not records and summary is None:
        return t
    last = records[-1] if records else {}
    t.steps = int((summary or {}).get("steps") or last.get("step", 0))
    t.status = "finished" if summary and t.steps >= plan.point(point_id).steps else "partial"
    values = {k: v for k, v in last.items() if k.startswith((mk.LOSS, mk.MEMORY)) or k in SPEED}
    values |= mk.keyed(mk.EVAL, mk.last_of(mk.EVAL, records))
    if summary:
        values |= mk.keyed(mk.LOSS, summary.get("final_losses", {}))
        values |= mk.keyed(mk.EVAL, summary.get("eval") or {})
        values |= {k: v for k, v in (summary.get("throughput") or {}).items() if k in SPEED}
        values["wall_time_s"] = summary.get("wall_time_s")
    elif len(records) > 1 and "time" in last:
        values["wall_time_s"] = last["time"] - records[0]["time"]
    t.values = {k: float(v) for k, v in values.items() if _finite(v)}
    for rec in records:
        for k, v in rec.items():
            if k.startswith(mk.LOSS) and _finite(v):
                t.curves.setdefault(k, []).append((int(rec["step"]), float(v)))
    return t


def load_trials(plan: SweepPlan) -> list[TrialResult]:
    return [load_trial(plan, p, s) for p, s in plan.trials]


def summarize(plan: SweepPlan, trials: list[TrialResult]) -> list[Row]:
    rows = []
    for p in plan.points:
        mine = [t for t in trials if t.point == p.id]
        keys = list(dict.fromkeys(k for t in mine for k in t.values))
        stats = {}
        for k in keys:
            vals = [t.values[k] for t in mine if k in t.values]
            stats[k] = Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))
        ran = [t for t in mine if t.status != "not run"]
        rows.append(Row(point=p.id, label=p.label, seeds=len(mine), finished=sum(t.status == "finished" for t in mine),
                        steps=statistics.fmean([t.steps for t in ran]) if ran else 0.0, stats=stats))
    return rows


def columns(rows: list[Row], metric: str | None = None) -> list[str]:
    """The table's metric columns, from what the runs reported (see the module docstring)."""
    keys = {k for r in rows for k in r.stats}
    losses = [k for k in [mk.TOTAL_LOSS, *sorted(keys - {mk.TOTAL_LOSS})] if k.startswith(mk.LOSS) and k in keys]
    accs = sorted(k for k in keys if k.startswith(mk.EVAL) and k.endswith(("_acc", "_gain")) and not is_downstream(k))
    cols = losses + [k for k in _R1 if k in keys] + accs + downstream(keys)
    cols += [MEMORY] if MEMORY in keys else []
    cols += [k for k in SPEED if k in keys]
    if metric and metric in keys and metric not in cols:
        cols.insert(len(losses), metric)
    return cols


def best_row(rows: list[Row], metric: str, mode: str) -> Row | None:
    scored = [r for r in rows if metric in r.stats]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r.stats[metric].mean)


def _notes(plan: SweepPlan, rows: list[Row], trials: list[TrialResult]) -> list[str]:
    notes = [f"{plan.name}: {len(plan.points)} configurations x {len(plan.seeds)} seeds; cells are mean ± std "
             f"over the seeds that reported the metric; — = not reported by that configuration."]
    chance = [r.stats[mk.CHANCE_R1].mean for r in rows if mk.CHANCE_R1 in r.stats]
    if chance:
        notes.append(f"chance R@1 (a random ranking of the candidate set): {statistics.fmean(chance):.3f}")
    best = best_row(rows, plan.metric, plan.mode)
    if best:
        notes.append(f"best by {plan.metric} ({plan.mode}): {best.label} = {cell(best.stats[plan.metric])}")
    notes += spread_note(rows, plan.metric)
    partial = [f"{t.name} ({t.status}, step {t.steps})" for t in trials if t.status != "finished"]
    if partial:
        notes.append(f"not finished: {', '.join(partial)}")
    return notes


def rich_tables(plan: SweepPlan, rows: list[Row], cols: list[str]) -> list[Table]:
    """The columns in three tables (a sweep's table is too wide for one terminal line)."""
    groups = [("final training losses", [k for k in cols if k.startswith(mk.LOSS)]),
              ("held-out evaluation", [k for k in cols if k.startswith(mk.EVAL) and not is_downstream(k)]),
              ("downstream: zero-shot and linear probe", [k for k in cols if is_downstream(k)]),
              ("cost", [k for k in cols if not k.startswith((mk.LOSS, mk.EVAL))])]
    tables = []
    mark = all_marks(rows, cols)
    for name, keys in groups:
        if not keys:
            continue
        t = Table(title=f"sweep {plan.name} · {name}", title_justify="left")
        for head in ("config", "seeds", "steps", *map(title, keys)):
            t.add_column(head, justify="left" if head == "config" else "right")
        for r in rows:
            t.add_row(r.label, f"{r.finished}/{r.seeds}", f"{r.steps:.0f}",
                      *(cell(r.stats.get(k), k, mark[k].get(r.point, "")) for k in keys))
        tables.append(t)
    return tables


def markdown(plan: SweepPlan, rows: list[Row], cols: list[str], notes: list[str]) -> str:
    heads = ["config", "seeds", "steps", *map(title, cols)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|"]
    mark = all_marks(rows, cols)
    for r in rows:
        cells = [r.label, f"{r.finished}/{r.seeds}", f"{r.steps:.0f}",
                 *(cell(r.stats.get(k), k, mark[k].get(r.point, "")) for k in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return f"# Sweep {plan.name}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def rows_csv(rows: list[Row], cols: list[str]) -> str:
    keys = cols + sorted({k for r in rows for k in r.stats} - set(cols))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["point", "config", "seeds", "finished", "steps",
                *[f"{k}_{s}" for k in keys for s in ("mean", "std", "n")]])
    for r in rows:
        stats = [r.stats.get(k) for k in keys]
        w.writerow([r.point, r.label, r.seeds, r.finished, r.steps,
                    *[x for s in stats for x in ((s.mean, s.std, s.n) if s else ("", "", 0))]])
    return buf.getvalue()


def trials_csv(trials: list[TrialResult]) -> str:
    keys = sorted({k for t in trials for k in t.values})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "point", "seed", "status", "steps", *keys])
    for t in trials:
        w.writerow([t.name, t.point, t.seed, t.status, t.steps, *(t.values.get(k, "") for k in keys)])
    return buf.getvalue()


@dataclass
class Report:
    plan: SweepPlan
    trials: list[TrialResult]
    rows: list[Row]
    columns: list[str]
    notes: list[str]
    files: dict[str, Path]


def write_report(sweep_dir: str | Path) -> Report:
    """Rebuild the comparison from the sweep directory's files and write the report files there."""
    from orchestrator.report.sweep_page import render_html  # matplotlib: only when a report is written

    plan = load_plan(sweep_dir)
    trials = load_trials(plan)
    rows = summarize(plan, trials)
    cols = columns(rows, plan.metric)
    notes = _notes(plan, rows, trials)
    out = Path(sweep_dir)
    files = {"markdown": out / "report.md", "csv": out / "report.csv", "trials": out / "trials.csv",
             "html": out / REPORT}
    files["markdown"].write_text(markdown(plan, rows, cols, notes))
    files["csv"].write_text(rows_csv(rows, cols))
    files["trials"].write_text(trials_csv(trials))
    files["html"].write_text(render_html(plan, trials, rows, cols, notes))
    from orchestrator.report.transfer import write_transfer

    files |= write_transfer(plan, trials)  # fine-tuning sweeps: task x labels x {pretrained, scratch}
    return Report(plan, trials, rows, cols, notes, files)


def show_report(sweep_dir: str | Path, console: Console) -> Report:
    report = write_report(sweep_dir)
    for table in rich_tables(report.plan, report.rows, report.columns):
        console.print(table)
    for note in report.notes:
        console.print(note, highlight=False, soft_wrap=True)
    if "transfer_markdown" in report.files:
        console.print(report.files["transfer_markdown"].read_text(), highlight=False, soft_wrap=True, markup=False)
    console.print("report: " + ", ".join(str(p) for p in report.files.values()), highlight=False, soft_wrap=True)
    return report


def report_cmd(path: Annotated[Path, typer.Argument(help="a sweep directory (sweeps/<name>) or a run directory "
                                                   "(runs/<name>)")]) -> None:
    """A sweep's comparison table (terminal, Markdown, CSV) and HTML report, or one run's HTML report."""
    from orchestrator.cli.console import console, fail
    from orchestrator.report.run_page import is_run_dir, write_run_report
    from orchestrator.sweep.spec import PLAN_FILE

    try:
        if not (path / PLAN_FILE).is_file() and is_run_dir(path):
            console.print(f"report: {write_run_report(path)}", highlight=False, soft_wrap=True)
            return
        show_report(path, console)
    except ConfigError as exc:
        fail(exc.problems)
