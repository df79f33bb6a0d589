"""Expert-load reporting from a run's metrics records: a per-layer table and a load heatmap.

Input: the run's metrics records (dicts, one per report, as in metrics.jsonl) carrying the
`moe/layer{i}/...` keys that models.moe.collect_stats defines (load: list of E shares; dropped,
aux, z_loss, entropy: floats). Records without them (a dense run, an eval-only record) are skipped.

Shapes: L MoE layers, E experts, T reports that carry MoE stats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from models.metric_keys import moe_layer, moe_layer_key

Record = Mapping[str, Any]


def moe_layers(records: Sequence[Record]) -> list[int]:
    """MoE layer indices present in any record, ascending."""
    found = {layer[0] for r in records for k in r if (layer := moe_layer(k)) and layer[1] == "load"}
    return sorted(found)


def load_history(records: Sequence[Record]) -> tuple[list[int], np.ndarray]:
    """(steps [T], load_LET): each layer's expert shares at each report that has MoE stats; NaN
    where a layer is missing from a report."""
    layers = moe_layers(records)
    rows = [r for r in records if any(moe_layer_key(i, "load") in r for i in layers)]
    E = max((len(r[moe_layer_key(i, "load")]) for r in rows for i in layers if moe_layer_key(i, "load") in r), default=0)
    load_LET = np.full((len(layers), E, len(rows)), np.nan)
    for t, r in enumerate(rows):
        for li, i in enumerate(layers):
            load = r.get(moe_layer_key(i, "load"))
            if load is not None:
                load_LET[li, : len(load), t] = load
    steps = [int(r.get("step", t)) for t, r in enumerate(rows)]
    return steps, load_LET


def moe_summary(records: Sequence[Record]) -> dict[str, Any]:
    """JSON-ready per-layer figures: last report's load and losses, and the run's mean drop rate."""
    layers = moe_layers(records)
    out: list[dict[str, Any]] = []
    for i in layers:
        key = moe_layer_key(i, "")
        mine = [r for r in records if key + "load" in r]
        last = mine[-1]
        dropped = [float(r[key + "dropped"]) for r in mine if key + "dropped" in r]
        load = [float(v) for v in last[key + "load"]]
        out.append({
            "layer": i,
            "step": last.get("step"),
            "load": load,
            "imbalance": max(load) * len(load) if load else math.nan,  # max / mean share
            "dropped": float(last.get(key + "dropped", math.nan)),
            "dropped_mean": sum(dropped) / len(dropped) if dropped else math.nan,
            "aux": float(last.get(key + "aux", math.nan)),
            "z_loss": float(last.get(key + "z_loss", math.nan)),
            "entropy": float(last.get(key + "entropy", math.nan)),
            # share of the layer's real text / image tokens no expert processed (last report)
            "skipped_text": float(last.get(key + "skipped_text", math.nan)),
            "skipped_image": float(last.get(key + "skipped_image", math.nan)),
        })
    return {"layers": out}


def load_table(records: Sequence[Record]) -> Table | None:
    """A rich table, one row per MoE layer; None when no record carries MoE stats."""
    layers = moe_summary(records)["layers"]
    if not layers:
        return None
    E = len(layers[0]["load"])
    table = Table(title=f"Expert load per MoE layer (step {layers[0]['step']}; uniform = {100 / E:.1f}%)")
    table.add_column("MoE layer", justify="right")
    table.add_column("share of routes per expert")
    for name in ("max/mean", "dropped (last / run mean)", "skipped text / image", "balance loss", "z-loss",
                 "entropy / ln E"):
        table.add_column(name, justify="right")

    def pct(v: float) -> str:
        return "-" if math.isnan(v) else f"{100 * v:.1f}%"

    for row in layers:
        shares = " ".join(f"{100 * v:4.1f}%" for v in row["load"])
        norm = math.log(len(row["load"])) if len(row["load"]) > 1 else 1.0
        table.add_row(
            str(row["layer"]), shares, f"{row['imbalance']:.2f}",
            f"{100 * row['dropped']:.1f}% / {100 * row['dropped_mean']:.1f}%",
            f"{pct(row['skipped_text'])} / {pct(row['skipped_image'])}",
            f"{row['aux']:.4g}", f"{row['z_loss']:.4g}", f"{row['entropy'] / norm:.3f}",
        )
    return table


def save_heatmap(records: Sequence[Record], path: str | Path) -> Path | None:
    """PNG: one panel per MoE layer, experts x reports, colour = share of routes. None if no MoE stats."""
    steps, load_LET = load_history(records)
    if load_LET.size == 0:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in any process

    layers = moe_layers(records)
    L, E, T = load_LET.shape
    fig = Figure(figsize=(min(6 + 0.1 * T, 16), 0.6 + L * (0.35 * E + 0.6)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(L, 1, sharex=True, squeeze=False)[:, 0]
    vmax = float(np.nanmax(load_LET)) if np.isfinite(load_LET).any() else 1.0
    image = None
    for ax, i, load_ET in zip(axes, layers, load_LET, strict=True):
        image = ax.imshow(load_ET, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=vmax,
                          extent=(-0.5, T - 0.5, E - 0.5, -0.5))
        ax.set_ylabel(f"layer {i}\nexpert")
        ax.set_yticks(range(E))
    ticks = sorted({round(x) for x in np.linspace(0, T - 1, min(T, 8))})
    axes[-1].set_xticks(ticks, [str(steps[t]) for t in ticks])
    axes[-1].set_xlabel("step")
    fig.suptitle(f"Expert load per MoE layer over training (uniform = 1/{E})")
    fig.colorbar(image, ax=list(axes), label="share of routes")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
