"""`mmpt report RUN_DIR`: one run's report as a self-contained HTML file a person reads.

From the run directory's files alone (metrics.jsonl, summary.json, config.yaml): the loss curves
(every `loss/<term>`, one plot each beside the total), the learning rate, throughput and the
data-wait share over steps, the held-out evaluation (final figures, and curves when the run
evaluated more than once), the model-state memory next to the ZeRO paper's figure for its stage,
and for a MoE run the layer x expert load heatmap with its per-layer table. The run's driver writes
it as `report.html` when the run ends; the command rebuilds it. Plots are matplotlib PNGs embedded
as `data:` URIs (orchestrator/report/sweep_page.py's convention): nothing is fetched when it is opened.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from models import metric_keys as mk
from orchestrator.report.rows import title
from orchestrator.report.sweep_page import _CSS, _img, _png
from orchestrator.run.files import CONFIG, METRICS, MOE_HEATMAP, REPORT, SUMMARY, read_metrics, read_summary

REPORT_FILE = REPORT
_MEMORY_ROWS = ("params", "grads", "optim")


@dataclass
class RunData:
    name: str
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: dict[str, Any] = field(default_factory=dict)


def is_run_dir(path: Path) -> bool:
    return (path / METRICS).is_file() or (path / SUMMARY).is_file()


def load_run(run_dir: Path) -> RunData:
    summary = read_summary(run_dir)
    config = yaml.safe_load((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).is_file() else {}
    return RunData(name=(summary or {}).get("name") or (config or {}).get("name") or run_dir.name,
                   records=read_metrics(run_dir), summary=summary, config=config or {})


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in records if _finite(r.get(key))]


def _line_plot(records: list[dict[str, Any]], keys: list[str], ylabel: str, heading: str) -> str | None:
    curves = {k: pts for k in keys if (pts := _series(records, k))}
    if not curves:
        return None
    fig = Figure(figsize=(6, 3.6))
    fig.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=0.14)
    ax = fig.add_subplot()
    for key, pts in curves.items():
        ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 30 else None, label=title(key))
    ax.set(xlabel="step", ylabel=ylabel, title=heading)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    return _png(fig)


def plots(run: RunData) -> dict[str, str]:
    """caption -> base64 PNG, in reading order."""
    keys = sorted({k for r in run.records for k in r})
    losses = [k for k in [mk.TOTAL_LOSS, *keys] if k.startswith(mk.LOSS) and k in keys]
    evals = [k for k in keys if k.startswith(mk.EVAL) and not k.startswith(mk.EVAL + "chance")]
    out: dict[str, str] = {}
    for key in losses:
        if (png := _line_plot(run.records, [key], key, f"{title(key)} over training")) is not None:
            out[f"{key} per step"] = png
    for caption, ks, ylabel in (("learning rate", ["lr"], "lr"),
                                ("throughput", ["samples_per_s"], "samples/s"),
                                ("data-wait share", ["data_wait_share"], "share of step time"),
                                ("held-out evaluation", evals, "value")):
        if caption == "held-out evaluation" and sum(1 for r in run.records if any(k in r for k in evals)) < 2:
            continue  # one evaluation: the table says it all
        if (png := _line_plot(run.records, ks, ylabel, caption)) is not None:
            out[caption] = png
    return out


def _moe_heatmap(run: RunData) -> str | None:
    """The layer x expert load heatmap (orchestrator/report/expert_load.py draws it, as during the run)."""
    import base64
    import tempfile

    from orchestrator.report.expert_load import save_heatmap

    with tempfile.TemporaryDirectory() as tmp:
        path = save_heatmap(run.records, Path(tmp) / MOE_HEATMAP)
        return None if path is None else base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _moe_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(str(layer.get("layer")), " ".join(f"{x:.2f}" for x in layer.get("load", [])),
             _fmt(layer.get("imbalance")), _fmt(layer.get("dropped_mean")), _fmt(layer.get("aux")),
             _fmt(layer.get("entropy"))) for layer in (summary.get("moe") or {}).get("layers") or []]


def _table(rows: list[tuple[str, ...]], heads: tuple[str, ...] = ()) -> str:
    esc = html.escape
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in heads) + "</tr>" if heads else ""
    return "<table>" + head + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                                      for row in rows) + "</table>"


def _fmt(v: Any) -> str:
    if not _finite(v):
        return "—" if v is None else str(v)
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _mb(v: Any) -> str:
    return f"{v / 2**20:,.2f} MiB" if _finite(v) else "—"


def render(run: RunData) -> str:
    esc = html.escape
    s = run.summary or {}
    last = run.records[-1] if run.records else {}
    model = run.config.get("model") or {}
    overview = [("steps", _fmt(s.get("steps", last.get("step")))), ("wall time", f"{_fmt(s.get('wall_time_s'))} s"),
                ("preset", str(model.get("preset", "—"))), ("config hash", str(s.get("config_hash", "—"))),
                ("samples seen", _fmt(s.get("samples_seen", last.get("samples_seen")))),
                *((title(k), _fmt(v)) for k, v in (s.get("throughput") or {}).items())]
    losses = s.get("final_losses") or mk.strip(mk.LOSS, last)
    evals = s.get("eval") or mk.last_of(mk.EVAL, run.records)
    memory = s.get("memory") or {}
    parts = [f"<h1>Run {esc(run.name)}</h1>",
             "" if s else "<p><b>not finished</b>: built from the metrics reported so far</p>",
             "<h2>Overview</h2>", _table(overview),
             "<h2>Final losses</h2>", _table([(k, _fmt(v)) for k, v in sorted(losses.items())], ("term", "value"))]
    if evals:
        parts += ["<h2>Held-out evaluation</h2>", _table([(k, _fmt(v)) for k, v in sorted(evals.items())],
                                                          ("metric", "value"))]
    if memory:
        rows = [(k, f"{_mb(memory.get(f'{k}_bytes'))} (ZeRO paper: {_mb(memory.get(f'expected_{k}_bytes'))})")
                for k in _MEMORY_ROWS]
        rows.append(("total", _mb(memory.get("total_bytes"))))
        stage = memory.get("zero_stage")
        parts += [f"<h2>Model-state memory per rank (ZeRO-{_fmt(stage)})</h2>", _table(rows, ("state", "bytes"))]
    figures = plots(run)
    parts += ["<h2>Curves</h2><div class='plots'>",
              *(_img(png, caption) for caption, png in figures.items()), "</div>"]
    heat = _moe_heatmap(run)
    if heat is not None:
        parts += ["<h2>MoE expert load</h2><div class='plots'>", _img(heat, "MoE expert load heatmap"), "</div>"]
        if rows := _moe_rows(s):
            parts.append(_table(rows, ("layer", "load per expert", "max/mean", "dropped (mean)", "aux loss",
                                       "router entropy")))
    parts += ["<h2>Configuration</h2>",
              f"<pre>{esc(yaml.safe_dump(run.config, sort_keys=False)) if run.config else '—'}</pre>"]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>run {esc(run.name)}</title>"
            f"<style>{_CSS}pre{{background:#f6f6f6;padding:.5em}}</style></head><body>{''.join(parts)}</body></html>\n")


def write_for_run(run_uri: str, opts: Any, local_dir: Path) -> Path:
    """A finished run's report.html in its run directory (an s3:// one: rendered from local copies of
    the few files it reads, then uploaded); returns the local file."""
    import logging

    try:
        return _write_for_run(run_uri, opts, local_dir)
    except Exception as exc:  # noqa: BLE001 - a report that cannot be drawn never fails a finished run
        logging.getLogger(__name__).warning("run report not written (%s: %s); mmpt report %s retries",
                                            type(exc).__name__, exc, run_uri)
        return local_dir / REPORT_FILE


def _write_for_run(run_uri: str, opts: Any, local_dir: Path) -> Path:
    from jobs import storage

    if not storage.is_remote(run_uri):
        return write_run_report(run_uri)
    copies = local_dir / "files"
    for name in (METRICS, SUMMARY, CONFIG):
        uri = storage.join(run_uri, name)
        if storage.exists(uri, opts):
            (copies / name).parent.mkdir(parents=True, exist_ok=True)
            (copies / name).write_text(storage.read_text(uri, opts))
    report = write_run_report(copies, local_dir / REPORT_FILE)
    storage.write_text(storage.join(run_uri, REPORT_FILE), report.read_text(), opts)
    return report


def write_run_report(run_dir: str | Path, out: Path | None = None) -> Path:
    """Render the run directory's report to `out` (default: RUN_DIR/report.html)."""
    run_dir = Path(run_dir)
    target = out or run_dir / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(load_run(run_dir)))
    return target
