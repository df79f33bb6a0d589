"""`mmpt finetune` end to end, and the transfer sweep's table, on one tiny pretraining run.

The module's pretraining run (1 worker, dense, MLM + ITM + ITC so that zero-shot applies) is shared:
fine-tuned from (VQA, --labels), resumed, trained from scratch with its architecture (--scratch), and
copied in as a transfer sweep's pretraining run (the sweep finds it finished and does not rerun it).
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from jobs.checkpoint import ds_files
from orchestrator.cli.main import app
from orchestrator.config import load_config
from orchestrator.run.runner import run
from tests.integration.conftest import QUICKSTART, ROOT, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VQA = ROOT / "jobs" / "configs" / "finetune" / "vqa.yaml"
PROBE = ROOT / "jobs" / "configs" / "finetune" / "probe.yaml"


@pytest.fixture(scope="module")
def pretrained(ray_session, shapes_data, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    root = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(QUICKSTART, tiny(shapes_data, root, **{
        "name": "pre", "moe.num_experts": 0, "scaling.num_workers": 1, "objectives.itc": 1.0,
        "train.steps": 4, "train.checkpoint_every": 4, "eval.max_samples": 32}))
    run(cfg)
    return root / "runs" / "pre"


def _ft_args(shapes_data: Path, storage: Path, name: str, steps: int, workers: int = 1) -> list[str]:
    sets = {"name": name, "scaling.num_workers": workers, "data.train": f"{shapes_data}/train", "data.eval": f"{shapes_data}/eval",
            "storage.path": str(storage), "train.steps": steps, "train.batch_size": 8, "train.log_every": 2,
            "train.checkpoint_every": 2, "train.warmup_steps": 1, "eval.max_samples": 16, "eval.batch_size": 8,
            "finetune.val_samples": 16}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_summary_carries_zero_shot_and_probe(pretrained: Path) -> None:
    ev = json.loads((pretrained / "summary.json").read_text())["eval"]
    for task in ("shape", "color", "count"):  # the objectives sweep's downstream columns come from these
        assert 0.0 <= ev[f"zs_{task}_top1_acc"] <= 1.0, task
        assert 0.0 <= ev[f"probe_{task}_acc"] <= 1.0, task


def test_finetune_from_a_run_with_labels_resumes_and_scratch_baseline(pretrained: Path, shapes_data: Path,
                                                                     tmp_path: Path) -> None:
    cli = CliRunner()
    args = ["finetune", str(VQA), "--from", str(pretrained), "--labels", "40"]
    result = cli.invoke(app, [*args, *_ft_args(shapes_data, tmp_path, "ft", steps=4, workers=2)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "ft"
    cfg = load_config(run_dir / "config.yaml")
    pre = load_config(pretrained / "config.yaml")
    assert cfg.finetune is not None and cfg.finetune.init == "pretrained" and cfg.finetune.labels == 40
    assert cfg.model == pre.model and cfg.objectives == pre.objectives  # the pretrained run's architecture
    assert cfg.finetune.checkpoint == str(pretrained / "checkpoint_0000004")

    # the pretrained encoder's weights, consolidated once into the run directory for the workers
    encoder = torch.load(run_dir / "pretrained_encoder.pt", weights_only=True)
    main = next(p for p in ds_files(pretrained / "checkpoint_0000004") if p.name == "mp_rank_00_model_states.pt")
    pre_state = torch.load(main, weights_only=False, map_location="cpu")["module"]
    assert encoder and all(torch.equal(v, pre_state[f"encoder.{k}"]) for k, v in encoder.items())

    records = _records(run_dir)
    assert [r["step"] for r in records] == [2, 4]
    assert all(math.isfinite(r["loss/total"]) and math.isfinite(r["loss/vqa"]) for r in records)
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = summary["eval"]
    assert summary["steps"] == 4 and ev["train_examples"] == 40
    for key in ("test_acc", "test_score", "val_acc", "test_acc_count", "test_acc_yesno"):
        assert 0.0 <= ev[key] <= 1.0, key
    assert ev["test_score"] == ev["test_acc"]
    assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_0000002", "checkpoint_0000004"]
    state = json.loads((run_dir / "checkpoint_0000004" / "trainer_state.json").read_text())
    assert state["step"] == 4

    # raising train.steps continues from the step-4 checkpoint (model, optimizer, data position)
    result = cli.invoke(app, [*args, *_ft_args(shapes_data, tmp_path, "ft", steps=6, workers=2)])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in _records(run_dir)] == [2, 4, 6]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6

    # --scratch: the same architecture from a fresh init; a frozen probe on its random features
    scratch = ["finetune", str(PROBE), "--from", str(pretrained), "--scratch", "--task", "color", "--labels", "24"]
    result = cli.invoke(app, [*scratch, *_ft_args(shapes_data, tmp_path, "ft-scratch", steps=2)])
    assert result.exit_code == 0, result.output
    s_dir = tmp_path / "runs" / "ft-scratch"
    s_cfg = load_config(s_dir / "config.yaml")
    assert s_cfg.finetune is not None and s_cfg.finetune.init == "scratch" and s_cfg.finetune.checkpoint is None
    assert s_cfg.model == pre.model and not (s_dir / "pretrained_encoder.pt").exists()
    s_ev = json.loads((s_dir / "summary.json").read_text())["eval"]
    assert s_ev["train_examples"] == 24 and 0.0 <= s_ev["test_acc"] <= 1.0 and 0.0 <= s_ev["val_acc"] <= 1.0


def test_finetune_without_from_or_scratch_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["finetune", str(VQA), "--set", f"storage.path={tmp_path}"])
    assert result.exit_code == 2
    assert "finetune.init = 'pretrained': needs from_run" in result.output
    assert "Traceback" not in result.output


def test_transfer_sweep_table_pretrained_vs_scratch_over_seeds(pretrained: Path, shapes_data: Path,
                                                               tmp_path: Path) -> None:
    from orchestrator.config import parse_override
    from orchestrator.report.sweep_report import write_report
    from orchestrator.sweep.driver import run_sweep
    from orchestrator.sweep.spec import PRETRAIN_RUN, SweepSpec, plan_sweep

    sets = dict(parse_override(a) for a in _ft_args(shapes_data, tmp_path, "x", 2)[1::2])
    overrides = {k: v for k, v in sets.items() if k != "name"}
    spec = SweepSpec.model_validate({
        "name": "tr", "pretrain": {"config": str(pretrained / "config.yaml")}, "base": str(PROBE),
        "overrides": overrides, "out": str(tmp_path / "sweeps"),
        "space": {"finetune.task": ["color"], "finetune.labels": [24], "finetune.init": ["pretrained", "scratch"]},
        "seeds": 2, "metric": "eval/test_score", "mode": "max", "budget": {"steps": 2}})
    plan = plan_sweep(spec, PROBE.parent)
    sweep_dir = Path(plan.sweep_dir)
    shutil.copytree(pretrained, sweep_dir / "runs" / PRETRAIN_RUN)  # the shared run, found finished
    outcome = run_sweep(plan, console=Console(file=io.StringIO()))
    assert sorted(outcome.finished) == ["p00-s0", "p00-s1", "p01-s0", "p01-s1"] and not outcome.failed

    # seeds vary the label subset, the data order and the head's init, not only train.seed
    cfgs = [load_config(sweep_dir / "runs" / n / "config.yaml") for n in ("p00-s0", "p00-s1")]
    assert [c.train.seed for c in cfgs] == [0, 1] and [c.data.shuffle_seed for c in cfgs] == [0, 1]

    report = write_report(sweep_dir)
    table = report.files["transfer_markdown"].read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| color |")]
    assert len(rows) == 2, table  # the zero-shot row (from the pretraining summary) and the 24-label row
    zs, budget = (r.split(" | ") for r in rows)
    assert zs[1] == "0 (zero-shot)" and 0.0 <= float(zs[3]) <= 1.0 and float(zs[4]) == pytest.approx(1 / 6, abs=1e-3)
    assert budget[1] == "24" and budget[2] == "24"
    means = [float(c.split(" ± ")[0]) for c in budget[3:5]]
    assert all(0.0 <= m <= 1.0 for m in means) and all(" ± " in c for c in budget[3:6])
    assert budget[6].rstrip(" |") in ("exceeds spread", "≈ within spread")
    assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', report.files["transfer_html"].read_text())
