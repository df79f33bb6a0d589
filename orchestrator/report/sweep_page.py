"""A sweep's report as one self-contained HTML file: the table, loss curves per trial, bar charts.

Plots are matplotlib PNGs (Agg, no display) embedded as base64 `data:` URIs; no script, font or
style sheet is fetched, so the file opens anywhere, offline. One image per loss term (a line per
trial: colour = configuration, line style = seed) and one per table metric other than the final
losses, which the curves show (a bar per configuration at the mean over seeds, the std as error
bar, each seed as a dot).
"""

from __future__ import annotations

import base64
import html
import io

from matplotlib.figure import Figure

from models import metric_keys as mk
from orchestrator.report.rows import Row, TrialResult, cell, title
from orchestrator.report.spread import all_marks
from orchestrator.sweep.spec import SweepPlan

_STYLES = ("-", "--", ":", "-.")
_CSS = ("body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}td:first-child,th:first-child"
        "{text-align:left}.plots img{max-width:32em;margin:.3em}")


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)  # fixed margins: a "tight" box renders every figure twice
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(plan: SweepPlan) -> dict[str, str]:
    return {p.id: f"C{i % 10}" for i, p in enumerate(plan.points)}


def loss_curves(plan: SweepPlan, trials: list[TrialResult]) -> dict[str, str]:
    """loss key -> base64 PNG with one line per trial."""
    colors = _colors(plan)
    found = {k for t in trials for k in t.curves}
    keys = [k for k in [mk.TOTAL_LOSS, *sorted(found - {mk.TOTAL_LOSS})] if k in found]
    out = {}
    for key in keys:
        fig = Figure(figsize=(6, 3.6))
        fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.14)
        ax = fig.add_subplot()
        for t in trials:
            pts = t.curves.get(key)
            if pts:
                ax.plot(*zip(*pts, strict=True), color=colors[t.point], linestyle=_STYLES[plan.seeds.index(t.seed) % 4],
                        label=f"{plan.point(t.point).label} · seed {t.seed}")
        ax.set(xlabel="step", ylabel=key, title=f"{title(key)} per trial")
        ax.legend(fontsize=6)
        out[key] = _png(fig)
    return out


def bar_charts(plan: SweepPlan, trials: list[TrialResult], rows: list[Row], cols: list[str]) -> dict[str, str]:
    """metric key -> base64 PNG: mean bar, std error bar and seed dots per configuration."""
    colors = _colors(plan)
    out = {}
    for key in (k for k in cols if not k.startswith(mk.LOSS)):
        scored = [r for r in rows if key in r.stats]
        if not scored:
            continue
        fig = Figure(figsize=(max(4.0, 1.1 * len(scored) + 1.5), 3.6))
        fig.subplots_adjust(left=0.16, right=0.97, top=0.9, bottom=0.3)
        ax = fig.add_subplot()
        xs = range(len(scored))
        ax.bar(xs, [r.stats[key].mean for r in scored], yerr=[r.stats[key].std for r in scored], capsize=4,
               color=[colors[r.point] for r in scored], alpha=0.75)
        for x, r in zip(xs, scored, strict=True):
            seeds = [t.values[key] for t in trials if t.point == r.point and key in t.values]
            ax.scatter([x] * len(seeds), seeds, color="black", s=10, zorder=3)
        chance = [r.stats[mk.CHANCE_R1].mean for r in scored if mk.CHANCE_R1 in r.stats]
        if key in mk.RETRIEVAL_R1 and chance:
            ax.axhline(sum(chance) / len(chance), color="gray", linestyle="--", label="chance")
            ax.legend(fontsize=7)
        ax.set_xticks(list(xs), [r.label for r in scored], rotation=20, ha="right", fontsize=7)
        ax.set(ylabel=key, title=title(key))
        out[key] = _png(fig)
    return out


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def render_html(plan: SweepPlan, trials: list[TrialResult], rows: list[Row], cols: list[str], notes: list[str]) -> str:
    esc = html.escape
    heads = "".join(f"<th>{esc(h)}</th>" for h in ("config", "seeds", "steps", *map(title, cols)))
    mark = all_marks(rows, cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in (r.label, f"{r.finished}/{r.seeds}", f"{r.steps:.0f}",
                                                         *(cell(r.stats.get(k), k, mark[k].get(r.point, ""))
                                                           for k in cols))) + "</tr>"
        for r in rows)
    curves = "".join(_img(b, f"{k} per trial") for k, b in loss_curves(plan, trials).items())
    bars = "".join(_img(b, f"{k} per configuration") for k, b in bar_charts(plan, trials, rows, cols).items())
    points = "".join(f"<li><code>{esc(p.id)}</code> {esc(p.label)}: <code>{esc(str(p.overrides))}</code>, "
                     f"{p.steps} steps</li>" for p in plan.points)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {esc(plan.name)}</title>"
            f"<style>{_CSS}</style></head><body><h1>Sweep {esc(plan.name)}</h1>"
            f"<p>metric <code>{esc(plan.metric)}</code> ({esc(plan.mode)}) · seeds {esc(str(plan.seeds))}</p>"
            f"<table><tr>{heads}</tr>{body}</table><ul>{''.join(f'<li>{esc(n)}</li>' for n in notes)}</ul>"
            f"<h2>Loss curves</h2><div class='plots'>{curves}</div>"
            f"<h2>Metrics</h2><div class='plots'>{bars}</div>"
            f"<h2>Configurations</h2><ul>{points}</ul></body></html>\n")
