"""The HTML reports as a person sees them: rendered by headless Chromium (tests/browser.py), with a
screenshot taken, no console error, every plot decoded. Built from run and sweep directories
written here the way runs write them (metrics.jsonl, summary.json, config.yaml, sweep.yaml)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.report.expert_load import moe_summary
from tests.browser import render

pytestmark = pytest.mark.slow  # a browser start per page (~2 s)
ROOT = Path(__file__).resolve().parents[2]


def _records(steps: int = 10, offset: float = 0.0) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss/total": 6 - 0.3 * s + offset, "loss/mlm": 4 - 0.2 * s, "loss/itm": 0.7 - 0.01 * s,
               "lr": 1e-3 * min(1, s / 3), "samples_per_s": 40 + s, "data_wait_share": 0.05, "time": 100.0 + s,
               "moe/layer1/load": [0.4, 0.3, 0.2, 0.1], "moe/layer1/dropped": 0.02, "moe/layer1/aux": 0.01,
               "moe/layer1/entropy": 1.2, "moe/dropped": 0.02}
        if s in (5, 10):
            rec |= {"eval/itm_acc": 0.5 + 0.02 * s, "eval/i2t_r1": 0.1 * s / 5, "eval/chance_r1": 0.0625,
                    "eval/mlm_acc": 0.2 + 0.01 * s}
        out.append(rec)
    out[0] |= {"memory/total_bytes": 3e6}
    return out


def _run_dir(root: Path, name: str, records: list[dict], steps: int) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    last = records[-1]
    summary = {"name": name, "config_hash": "abc123def456", "steps": steps, "wall_time_s": 12.5,
               "final_losses": {k[5:]: v for k, v in last.items() if k.startswith("loss/")},
               "eval": {k[5:]: v for k, v in last.items() if k.startswith("eval/")},
               "throughput": {"samples_per_s": last["samples_per_s"], "tokens_per_s": 900.0, "step_time_s": 0.2,
                              "data_wait_share": 0.05},
               "memory": {"zero_stage": 2, "params_bytes": 1e6, "grads_bytes": 5e5, "optim_bytes": 1.5e6,
                          "total_bytes": 3e6, "expected_params_bytes": 1e6, "expected_grads_bytes": 5e5,
                          "expected_optim_bytes": 1.5e6},
               "moe": moe_summary(records)}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "model": {"preset": "vilt"}}))
    return run


def _check(page: Path, screenshot: Path) -> tuple[int, str]:
    shown = render(page)
    screenshot.write_bytes(shown.screenshot)
    assert shown.errors == []
    assert shown.images and all(i["decoded"] and i["width"] >= 300 and i["height"] >= 150 for i in shown.images), shown.images
    with Image.open(io.BytesIO(shown.screenshot)) as shot:
        assert shot.format == "PNG" and 1200 <= shot.width <= 1280 and shot.height > 1000  # the whole page, not the window
    return len(shown.images), shown.title + "\n" + shown.text


def test_the_run_report_renders_with_every_plot_decoded(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "runs", "demo", _records(), steps=10)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0 and result.output.strip() == f"report: {run / 'report.html'}", result.output
    images, text = _check(run / "report.html", tmp_path / "run.png")
    # 3 loss terms, lr, throughput, data wait, held-out evaluation (2 evaluations), MoE heatmap
    assert images == 8
    for words in ("run demo", "Final losses", "Held-out evaluation", "i2t_r1", "Model-state memory per rank (ZeRO-2)",
                  "MoE expert load", "router entropy", "preset"):
        assert words in text, words


def test_the_sweep_report_renders_with_every_plot_decoded(tmp_path: Path) -> None:
    from orchestrator.report.sweep_report import write_report
    from orchestrator.sweep.spec import PLAN_FILE, SweepSpec, plan_sweep

    tiny = {"data.image_size": 32, "data.max_text_len": 24, "model.hidden_size": 32, "model.num_layers": 2,
            "model.num_heads": 2, "train.batch_size": 8, "scaling.num_workers": 1, "moe.ep_size": 1}
    spec = SweepSpec.model_validate({"name": "look", "base": str(ROOT / "jobs" / "configs" / "quickstart.yaml"),
                                     "overrides": tiny, "space": {"train.lr": [1e-3, 3e-3]}, "seeds": 2,
                                     "metric": "eval/i2t_r1", "mode": "max", "budget": {"steps": 10}})
    plan = plan_sweep(spec, ROOT, tmp_path / "sweeps")
    Path(plan.sweep_dir).mkdir(parents=True)
    (Path(plan.sweep_dir) / PLAN_FILE).write_text(plan.to_yaml())
    for i, (point, seed) in enumerate(plan.trials):
        _run_dir(Path(plan.sweep_dir, "runs"), plan.trial_name(point, seed), _records(offset=0.1 * i), steps=10)
    report = write_report(plan.sweep_dir)
    images, text = _check(report.files["html"], tmp_path / "sweep.png")
    curves = {k for t in report.trials for k in t.curves}
    assert images == len(curves) + len([c for c in report.columns if not c.startswith("loss/")])
    assert "Sweep look" in text and all(p.label in text for p in plan.points)
    assert not any(math.isnan(r.stats["loss/total"].mean) for r in report.rows)


def test_a_broken_page_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><title>x</title><img alt=bad src='data:image/png;base64,iVBORw0KGgo='>"
                    "<script>console.error('boom'); undefinedFunction()</script>")
    shown = render(page)
    assert [i["decoded"] for i in shown.images] == [False]
    assert shown.errors[0] == "console: boom" and any(e.startswith("exception: ") for e in shown.errors)
