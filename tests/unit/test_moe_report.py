"""Expert-load table and heatmap built from metrics records (the names models.moe.collect_stats emits)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from orchestrator.report.expert_load import load_history, load_table, moe_layers, moe_summary, save_heatmap


def record(step: int, loads: dict[int, list[float]], dropped: float = 0.1) -> dict[str, object]:
    out: dict[str, object] = {"step": step, "loss/mlm": 2.0}
    for i, load in loads.items():
        out |= {f"moe/layer{i}/load": load, f"moe/layer{i}/dropped": dropped, f"moe/layer{i}/aux": 1.25,
                f"moe/layer{i}/z_loss": 3.5, f"moe/layer{i}/entropy": math.log(len(load)) / 2}
    out["moe/dropped"] = dropped
    return out


RECORDS = [
    record(10, {0: [0.7, 0.1, 0.1, 0.1], 1: [0.25] * 4}, dropped=0.3),
    {"step": 15, "eval/itm_acc": 0.5},  # a record without MoE stats
    record(20, {0: [0.4, 0.2, 0.2, 0.2], 1: [0.25] * 4}, dropped=0.1),
    record(30, {0: [0.5, 0.3, 0.1, 0.1], 1: [0.1, 0.2, 0.3, 0.4]}, dropped=0.05),
]


def test_layers_and_history() -> None:
    assert moe_layers(RECORDS) == [0, 1]
    steps, load = load_history(RECORDS)
    assert steps == [10, 20, 30]
    assert load.shape == (2, 4, 3)
    assert load[0, :, 0].tolist() == [0.7, 0.1, 0.1, 0.1]
    assert load[1, :, 2].tolist() == [0.1, 0.2, 0.3, 0.4]


def test_summary_uses_last_report_and_run_mean() -> None:
    layers = moe_summary(RECORDS)["layers"]
    assert [row["layer"] for row in layers] == [0, 1]
    first = layers[0]
    assert first["step"] == 30 and first["load"] == [0.5, 0.3, 0.1, 0.1]
    assert first["imbalance"] == pytest.approx(2.0)  # max share 0.5 vs mean 0.25
    assert first["dropped"] == 0.05 and first["dropped_mean"] == pytest.approx(0.15)
    assert (first["aux"], first["z_loss"]) == (1.25, 3.5)


def test_table_rows() -> None:
    table = load_table(RECORDS)
    assert table is not None and table.row_count == 2
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "uniform = 25.0%" in text and "step 30" in text
    assert "50.0% 30.0% 10.0% 10.0%" in text
    assert "5.0% / 15.0%" in text and "0.500" in text  # entropy / ln E


def test_nothing_for_a_dense_run(tmp_path: Path) -> None:
    dense = [{"step": 1, "loss/mlm": 1.0}]
    assert moe_layers(dense) == [] and load_table(dense) is None and moe_summary(dense) == {"layers": []}
    assert save_heatmap(dense, tmp_path / "moe_load.png") is None
    assert not (tmp_path / "moe_load.png").exists()


def test_heatmap_png(tmp_path: Path) -> None:
    path = save_heatmap(RECORDS, tmp_path / "plots" / "moe_load.png")
    assert path == tmp_path / "plots" / "moe_load.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width >= 300 and height >= 200
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank


def test_skipped_tokens_per_modality_reach_the_summary_and_the_table() -> None:
    records = [record(10, {0: [0.25] * 4}) | {"moe/layer0/skipped_text": 0.125, "moe/layer0/skipped_image": 0.5}]
    (row,) = moe_summary(records)["layers"]
    assert (row["skipped_text"], row["skipped_image"]) == (0.125, 0.5)
    console = Console(width=200, record=True)
    console.print(load_table(records))
    assert "12.5% / 50.0%" in console.export_text()
    (dense_row,) = moe_summary(RECORDS[:1])["layers"][:1]
    assert math.isnan(dense_row["skipped_text"])  # a run whose encoder gave no modality
