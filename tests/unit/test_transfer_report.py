"""The transfer table (orchestrator/report/transfer.py) on hand-made run files: cells, the paired
difference, the spread verdict, the zero-shot row and the plot."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from orchestrator.report.sweep_report import write_report
from orchestrator.report.transfer import transfer_rows
from orchestrator.sweep.spec import PRETRAIN_RUN, Point, SweepPlan

# (labels, init) -> test score per seed 0, 1, 2
SCORES = {(100, "pretrained"): [0.80, 0.85, 0.90], (100, "scratch"): [0.50, 0.55, 0.60],  # 0.30 apart: exceeds
          (None, "pretrained"): [0.90, 0.92, 0.94], (None, "scratch"): [0.88, 0.90, 0.95]}  # 0.01 apart: within


def _write(run: Path, summary: dict) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "time": 1.0, "loss/total": 1.0}) + "\n")
    (run / "summary.json").write_text(json.dumps({"steps": 10, "wall_time_s": 5.0, **summary}))


@pytest.fixture
def sweep(tmp_path: Path) -> SweepPlan:
    points = [Point(f"p{i:02d}", f"labels={labels} init={init}",
                    {"finetune.labels": labels, "finetune.init": init}, steps=10)
              for i, (labels, init) in enumerate(SCORES)]
    plan = SweepPlan(name="tr", sweep_dir=str(tmp_path), metric="eval/test_score", mode="max", seeds=[0, 1, 2],
                     base={"finetune": {"task": "shape", "from_run": str(tmp_path / "runs" / PRETRAIN_RUN)}},
                     points=points, spec={}, pretrain={"name": PRETRAIN_RUN})
    (tmp_path / "sweep.yaml").write_text(plan.to_yaml())
    for p, key in zip(points, SCORES, strict=True):
        for seed, score in enumerate(SCORES[key]):
            examples = 100 if key[0] == 100 else 2872
            _write(tmp_path / "runs" / plan.trial_name(p.id, seed),
                   {"eval": {"test_score": score, "test_acc": score, "train_examples": examples}})
    _write(tmp_path / "runs" / PRETRAIN_RUN, {"eval": {"zs_shape_top1_acc": 0.40, "probe_shape_acc": 0.7}})
    return plan


def test_rows_pair_seeds_and_judge_the_spread(sweep: SweepPlan) -> None:
    from orchestrator.report.sweep_report import load_trials

    zs, few, every = transfer_rows(sweep, load_trials(sweep))
    assert (zs.task, zs.budget, zs.cells["pretrained"].mean) == ("shape", "0 (zero-shot)", 0.40)
    assert zs.cells["scratch"].mean == pytest.approx(0.25)  # chance: 4 shapes
    assert zs.verdict == "no spread (1 run)"
    assert (few.budget, few.train_examples) == ("100", 100)
    assert few.cells["pretrained"].mean == pytest.approx(0.85)
    assert few.cells["scratch"].std == pytest.approx(statistics.stdev([0.50, 0.55, 0.60]))
    assert few.diff is not None and few.diff.values == pytest.approx([0.30, 0.30, 0.30])
    assert few.verdict == "exceeds spread"
    assert every.budget == "all" and every.diff is not None
    assert every.diff.values == pytest.approx([0.02, 0.02, -0.01])
    assert every.verdict == "≈ within spread"  # |0.01| <= 0.02 + 0.036


def test_files_hold_the_table_notes_and_plot(sweep: SweepPlan) -> None:
    report = write_report(sweep.sweep_dir)
    md = report.files["transfer_markdown"].read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| shape |")]
    assert lines == [
        "| shape | 0 (zero-shot) | 0 | 0.400 | 0.250 |  | no spread (1 run) |",
        "| shape | 100 | 100 | 0.850 ± 0.050 | 0.550 ± 0.050 | +0.300 ± 0.000 | exceeds spread |",
        "| shape | all | 2872 | 0.920 ± 0.020 | 0.910 ± 0.036 | +0.010 ± 0.017 | ≈ within spread |"]
    assert "- exceed the spread: shape@100; within it: shape@all" in md
    page = report.files["transfer_html"].read_text()
    assert page.count("<tr>") == 4 and "≈ within spread" in page
    assert re.search(r'<img alt="test score against label budget" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)


def test_the_transfer_sweep_file_plans_task_x_budget_x_init_over_three_seeds(tmp_path: Path) -> None:
    from orchestrator.sweep.spec import load_spec, plan_sweep

    root = Path(__file__).resolve().parents[2]
    spec, spec_dir = load_spec(root / "jobs/configs/sweeps/transfer.yaml")
    plan = plan_sweep(spec, spec_dir, tmp_path / "sw")
    keys = [(c.finetune.task, c.finetune.labels, c.finetune.init)  # type: ignore[union-attr]
            for c in (plan.trial_config(p.id, 0) for p in plan.points)]
    assert keys == [(t, n, i) for t in ("shape", "vqa") for n in (100, 1000, None) for i in ("pretrained", "scratch")]
    assert plan.seeds == [0, 1, 2] and len(plan.trials) == 36 and {p.steps for p in plan.points} == {120}
    a, b = plan.trial_config("p00", 0), plan.trial_config("p00", 1)
    assert (a.train.seed, b.train.seed) == (0, 1) and a.finetune.from_run == str(tmp_path / "sw/runs/pretrain")  # type: ignore[union-attr]
    pre = plan.pretrain_config()
    assert pre is not None and pre.name == PRETRAIN_RUN and pre.moe.num_experts == 0 and "itc" in pre.active_objectives
