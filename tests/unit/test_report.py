"""`mmpt report`: the comparison rebuilt from a sweep directory's files, on hand-made run files."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import statistics
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.report.sweep_report import columns, load_trials, summarize
from orchestrator.sweep.spec import Point, SweepPlan

# (point, seed) -> final eval figures; the MLM-only point has no retrieval scorer, so no R@1
EVAL = {("p00", 0): {"mlm_acc": 0.30, "samples": 32},
        ("p00", 1): {"mlm_acc": 0.40, "samples": 32},
        ("p01", 0): {"mlm_acc": 0.35, "itm_acc": 0.70, "i2t_r1": 0.25, "t2i_r1": 0.20, "chance_r1": 0.125,
                     "grounded_mlm_acc": 0.5},
        ("p01", 1): {"mlm_acc": 0.45, "itm_acc": 0.80, "i2t_r1": 0.50, "t2i_r1": 0.30, "chance_r1": 0.125,
                     "grounded_mlm_acc": 0.6}}


def _plan(tmp_path: Path) -> SweepPlan:
    return SweepPlan(name="abl", sweep_dir=str(tmp_path), metric="eval/i2t_r1", mode="max", seeds=[0, 1], base={},
                     points=[Point("p00", "objectives=mlm", {"objectives": {"mlm": 1.0}}, steps=4),
                             Point("p01", "objectives=mlm+itm", {"objectives": {"mlm": 1.0, "itm": 1.0}}, steps=4)],
                     spec={})


def _write_run(plan: SweepPlan, point: str, seed: int, *, finished: bool = True) -> None:
    run = Path(plan.sweep_dir, "runs", plan.trial_name(point, seed))
    run.mkdir(parents=True)
    terms = ["mlm"] if point == "p00" else ["mlm", "itm"]
    steps = [2, 4] if finished else [2]
    lines = []
    for i, step in enumerate(steps):
        rec = {"step": step, "time": 100.0 + 10 * i, "samples_per_s": 50.0 + seed, "tokens_per_s": 2000.0,
               "loss/total": 5.0 - step / 2 - seed, **{f"loss/{t}": 4.0 - step / 4 for t in terms},
               "moe/layer1/load": [0.5, 0.5]}
        if step == 4:
            rec |= {f"eval/{k}": v for k, v in EVAL[(point, seed)].items()}
        lines.append(json.dumps(rec))
    if finished and seed == 1:  # a resumed run that logged step 2 twice: the later line wins
        lines.insert(1, json.dumps({"step": 2, "time": 99.0, "loss/total": 99.0}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        last = json.loads(lines[-1])
        (run / "summary.json").write_text(json.dumps({
            "steps": 4, "wall_time_s": 30.0 + seed, "eval": EVAL[(point, seed)],
            "final_losses": {k[5:]: v for k, v in last.items() if k.startswith("loss/")},
            "throughput": {"samples_per_s": last["samples_per_s"], "tokens_per_s": 2000.0}}))


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    plan = _plan(tmp_path)
    (tmp_path / "sweep.yaml").write_text(plan.to_yaml())
    for point, seed in plan.trials:
        _write_run(plan, point, seed)
    return tmp_path


def test_rows_are_mean_and_spread_over_seeds(sweep_dir: Path) -> None:
    plan = _plan(sweep_dir)
    rows = summarize(plan, load_trials(plan))
    assert [r.label for r in rows] == ["objectives=mlm", "objectives=mlm+itm"]
    mlm, both = rows
    assert (mlm.finished, mlm.seeds, mlm.steps) == (2, 2, 4.0)
    assert mlm.stats["eval/mlm_acc"].mean == pytest.approx(0.35)
    assert mlm.stats["eval/mlm_acc"].std == pytest.approx(statistics.stdev([0.30, 0.40]))
    assert "eval/i2t_r1" not in mlm.stats  # MLM alone ranks nothing
    assert both.stats["eval/i2t_r1"].mean == pytest.approx(0.375) and both.stats["eval/i2t_r1"].n == 2
    assert both.stats["loss/total"].mean == pytest.approx(2.5)  # 3.0 and 2.0: the duplicate step 2 is ignored
    assert both.stats["wall_time_s"].mean == pytest.approx(30.5)
    assert columns(rows, plan.metric) == ["loss/total", "loss/itm", "loss/mlm", "eval/i2t_r1", "eval/t2i_r1",
                                          "eval/grounded_mlm_acc", "eval/itm_acc", "eval/mlm_acc",
                                          "wall_time_s", "samples_per_s", "tokens_per_s"]


def test_a_trial_without_a_summary_counts_from_its_metrics(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    (tmp_path / "sweep.yaml").write_text(plan.to_yaml())
    _write_run(plan, "p00", 0)
    _write_run(plan, "p00", 1, finished=False)  # e.g. stopped early by ASHA at step 2
    trials = load_trials(plan)
    assert [(t.name, t.status, t.steps) for t in trials] == [
        ("p00-s0", "finished", 4), ("p00-s1", "partial", 2), ("p01-s0", "not run", 0), ("p01-s1", "not run", 0)]
    assert trials[1].values["loss/mlm"] == pytest.approx(3.5) and "eval/mlm_acc" not in trials[1].values
    rows = summarize(plan, trials)
    assert rows[0].stats["loss/mlm"].n == 2 and rows[0].stats["eval/mlm_acc"].n == 1 and rows[1].stats == {}


def test_report_cli_writes_table_csv_and_self_contained_html(sweep_dir: Path, tmp_path_factory) -> None:  # noqa: ANN001
    result = CliRunner().invoke(app, ["report", str(sweep_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "objectives=mlm+itm" in result.output and "i2t R@1" in result.output
    md = (sweep_dir / "report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| objectives=")]
    assert len(table) == 2
    assert "| objectives=mlm | 2/2 | 4 |" in table[0] and "| — |" in table[0]  # no R@1 for MLM alone
    assert "0.375 ± 0.177" in table[1]  # i2t R@1: mean ± std of 0.25 and 0.50
    assert "chance R@1 (a random ranking of the candidate set): 0.125" in md
    assert "best by eval/i2t_r1 (max): objectives=mlm+itm = 0.375 ± 0.177" in md

    rows = list(csv.DictReader(io.StringIO((sweep_dir / "report.csv").read_text())))
    assert [r["config"] for r in rows] == ["objectives=mlm", "objectives=mlm+itm"]
    assert float(rows[1]["eval/itm_acc_mean"]) == pytest.approx(0.75) and rows[1]["eval/itm_acc_n"] == "2"
    assert rows[0]["eval/i2t_r1_mean"] == "" and rows[0]["eval/i2t_r1_n"] == "0"
    assert len(list(csv.DictReader(io.StringIO((sweep_dir / "trials.csv").read_text())))) == 4

    page = (sweep_dir / "report.html").read_text()
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # a curve plot per loss term (total, itm, mlm) + a bar chart per other column (5 eval, 3 speed)
    assert [alt for alt, _ in images] == [f"loss/{t} per trial" for t in ("total", "itm", "mlm")] + [
        f"{k} per configuration" for k in ("eval/i2t_r1", "eval/t2i_r1", "eval/grounded_mlm_acc", "eval/itm_acc",
                                           "eval/mlm_acc", "wall_time_s", "samples_per_s", "tokens_per_s")]
    assert page.count("<img") == 11
    png = Image.open(io.BytesIO(base64.b64decode(images[0][1])))
    assert png.format == "PNG" and png.size[0] > 200 and png.size[1] > 100
    assert "http://" not in page and "https://" not in page  # nothing fetched to view it

    empty = tmp_path_factory.mktemp("empty")
    result = CliRunner().invoke(app, ["report", str(empty)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {empty}: not a sweep directory (no sweep.yaml; make one with: mmpt sweep SWEEP.yaml)"


def _summary_run(plan: SweepPlan, point: str, seed: int, ev: dict[str, float], loss: float) -> None:
    run = Path(plan.sweep_dir, "runs", plan.trial_name(point, seed))
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "time": 1.0, "loss/total": loss}) + "\n")
    (run / "summary.json").write_text(json.dumps({"steps": 4, "wall_time_s": 10.0, "eval": ev,
                                                  "final_losses": {"total": loss}}))


def test_downstream_columns_and_spread_marks(tmp_path: Path) -> None:
    from orchestrator.report.spread import marks
    from orchestrator.report.sweep_report import write_report

    plan = SweepPlan(name="abl", sweep_dir=str(tmp_path), metric="eval/probe_shape_acc", mode="max", seeds=[0, 1, 2],
                     base={}, spec={}, points=[Point(f"p0{i}", f"cfg{i}", {}, steps=4) for i in range(3)])
    (tmp_path / "sweep.yaml").write_text(plan.to_yaml())
    # probe_shape_acc per point: p00 0.80 ± 0.10 (best), p01 0.70 ± 0.05 (|Δ| 0.10 <= 0.15: within),
    # p02 0.40 ± 0.01 (|Δ| 0.40 > 0.11: exceeds). loss/total: p02 lowest (best) and alone within nothing.
    probe = {"p00": [0.7, 0.8, 0.9], "p01": [0.65, 0.7, 0.75], "p02": [0.39, 0.4, 0.41]}
    for point, values in probe.items():
        for seed, v in enumerate(values):
            ev = {"probe_shape_acc": v, "zs_shape_top1_acc": 0.5, "zs_color_top1_acc": 0.3, "zs_color_top5_acc": 0.9,
                  "probe_color_acc": 0.6, "mlm_acc": 0.2}
            _summary_run(plan, point, seed, ev, loss={"p00": 3.0, "p01": 2.0, "p02": 1.0}[point] + seed * 0.01)
    report = write_report(tmp_path)
    # the downstream figures the pretraining runs' summaries carry, after the other held-out columns, by task
    assert [c for c in report.columns if c.startswith("eval/")] == [
        "eval/mlm_acc", "eval/zs_color_top1_acc", "eval/zs_color_top5_acc", "eval/probe_color_acc",
        "eval/zs_shape_top1_acc", "eval/probe_shape_acc"]
    md = report.files["markdown"].read_text()
    head = next(ln for ln in md.splitlines() if ln.startswith("| config"))
    assert "| zero-shot color | zero-shot color top-5 | probe color | zero-shot shape | probe shape |" in head
    assert marks(report.rows, "eval/probe_shape_acc") == {"p00": "*", "p01": "≈", "p02": ""}
    assert marks(report.rows, "loss/total") == {"p00": "", "p01": "", "p02": "*"}  # lower is better
    # equal values in every row: all within the spread of the best (a zero-spread tie)
    assert marks(report.rows, "eval/zs_shape_top1_acc") == {"p00": "*", "p01": "≈", "p02": "≈"}
    rows = {ln.split(" | ")[0][2:]: ln for ln in md.splitlines() if ln.startswith("| cfg")}
    assert "0.800 ± 0.100 *" in rows["cfg0"] and "0.700 ± 0.050 ≈" in rows["cfg1"]
    assert "0.400 ± 0.010 |" in rows["cfg2"]
    assert "eval/probe_shape_acc: within the spread of the best (cfg0): cfg1" in md
    assert "0.800 ± 0.100 *" in report.files["html"].read_text()
    one = SweepPlan(name="one", sweep_dir=str(tmp_path / "one"), metric="eval/mlm_acc", mode="max", seeds=[0],
                    base={}, spec={}, points=[Point("p00", "a", {}, steps=4), Point("p01", "b", {}, steps=4)])
    Path(one.sweep_dir).mkdir()
    Path(one.sweep_dir, "sweep.yaml").write_text(one.to_yaml())
    for point in ("p00", "p01"):
        _summary_run(one, point, 0, {"mlm_acc": 0.5}, 1.0)
    single = write_report(one.sweep_dir)
    assert marks(single.rows, "eval/mlm_acc") == {}
    assert any(n.startswith("one seed per configuration: no spread") for n in single.notes)
