"""Sweep files: schema, search space -> points, budget, and the one-line errors before any trial."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.config import ConfigError
from orchestrator.sweep.driver import concurrency, prepare
from orchestrator.sweep.spec import (
    SweepPlan,
    SweepSpec,
    expand_points,
    load_plan,
    load_spec,
    plan_sweep,
    tokens_per_step,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "jobs" / "configs" / "quickstart.yaml")
TINY = {"data.image_size": 32, "data.max_text_len": 24, "model.hidden_size": 32, "model.num_layers": 2,
        "model.num_heads": 2, "train.batch_size": 8, "scaling.num_workers": 1, "moe.ep_size": 1}


def _spec(**fields: Any) -> SweepSpec:
    raw: dict[str, Any] = {"name": "t", "base": QUICKSTART, "overrides": dict(TINY),
                           "objective_sets": {"mlm": ["mlm"], "mlm+itm": ["mlm", "itm"]},
                           "metric": "eval/mlm_acc", "mode": "max"}
    raw.update(fields)
    return SweepSpec.model_validate({k: v for k, v in raw.items() if v is not None})


def _problems(tmp_path: Path, **fields: Any) -> list[str]:
    path = tmp_path / "sweep.yaml"
    raw = {"name": "t", "base": QUICKSTART, "overrides": dict(TINY), "objective_sets": {"mlm": ["mlm"]},
           "metric": "eval/mlm_acc", "mode": "max"}
    raw.update(fields)
    path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}))
    with pytest.raises(ConfigError) as exc:
        spec, spec_dir = load_spec(path)
        plan_sweep(spec, spec_dir, tmp_path / "out")
    assert all("\n" not in p for p in exc.value.problems)
    return exc.value.problems


def test_objective_sets_cross_the_grid_and_seeds_repeat_every_point(tmp_path: Path) -> None:
    spec = _spec(objective_sets={"mlm": ["mlm"], "weighted": {"mlm": 1.0, "itm": 0.5}},
                 space={"moe.gate": ["switch", "gshard"]}, seeds=2, budget={"steps": 7})
    plan = plan_sweep(spec, ROOT, tmp_path)
    assert [p.label for p in plan.points] == [
        "objectives=mlm moe.gate=switch", "objectives=mlm moe.gate=gshard",
        "objectives=weighted moe.gate=switch", "objectives=weighted moe.gate=gshard"]
    assert plan.points[0].overrides == {"objectives": {"mlm": 1.0}, "moe.gate": "switch"}
    assert plan.points[3].overrides["objectives"] == {"mlm": 1.0, "itm": 0.5}
    assert len(plan.trials) == 8 and plan.seeds == [0, 1]
    cfg = plan.trial_config("p03", 1)
    assert (cfg.name, cfg.train.seed, cfg.train.steps, cfg.moe.gate) == ("p03-s1", 1, 7, "gshard")
    assert cfg.objectives == {"mlm": 1.0, "itm": 0.5} and cfg.storage.path == str(tmp_path)


def test_drawn_dimensions_are_drawn_once_per_sample_within_bounds() -> None:
    spec = _spec(objective_sets={}, samples=5, space_seed=3, space={
        "train.lr": {"loguniform": [1e-4, 1e-2]}, "train.weight_decay": {"uniform": [0.0, 0.1]},
        "train.batch_size": {"randint": [4, 16]}, "deepspeed.zero_stage": {"choice": [1, 2]},
        "model.num_layers": {"grid": [2, 4]}})
    points = expand_points(spec)
    assert len(points) == 2 * 5
    for p in points:
        ov = p.overrides
        assert 1e-4 <= ov["train.lr"] <= 1e-2 and 0.0 <= ov["train.weight_decay"] <= 0.1
        assert 4 <= ov["train.batch_size"] <= 16 and ov["deepspeed.zero_stage"] in (1, 2)
    assert len({p.overrides["train.lr"] for p in points}) == 10
    assert [p.overrides for p in expand_points(spec)] == [p.overrides for p in points]  # space_seed: reproducible


def test_variants_are_named_bundles_of_overrides() -> None:
    spec = _spec(objective_sets={}, space={"routing": {"variants": {
        "dense": {"moe.num_experts": 0}, "top2": {"moe.gate": "gshard", "moe.expert_hidden_size": 64}}}})
    points = expand_points(spec)
    assert [(p.label, p.overrides) for p in points] == [
        ("routing=dense", {"moe.num_experts": 0}),
        ("routing=top2", {"moe.gate": "gshard", "moe.expert_hidden_size": 64})]


def test_a_token_budget_gives_each_point_its_steps(tmp_path: Path) -> None:
    spec = _spec(objective_sets={}, space={"train.batch_size": [8, 16]}, budget={"tokens": 32000})
    plan = plan_sweep(spec, ROOT, tmp_path)
    # vilt, 32 px images in 8 px patches = 16 visual tokens, + 24 text positions = 40 per sample
    assert tokens_per_step(plan.trial_config("p00", 0)) == 40 * 8
    assert [p.steps for p in plan.points] == [math.ceil(32000 / 320), math.ceil(32000 / 640)]


def test_plan_round_trips_through_the_sweep_dir(tmp_path: Path) -> None:
    plan = plan_sweep(_spec(seeds=[3, 5]), ROOT, tmp_path)
    (tmp_path / "sweep.yaml").write_text(plan.to_yaml())
    again = load_plan(tmp_path)
    assert again.points == plan.points and again.seeds == [3, 5] and again.base == plan.base


def test_sweep_set_overrides_reach_the_sweep_file_or_the_base(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": QUICKSTART, "objective_sets": {"mlm": ["mlm"]},
                                    "metric": "loss/mlm", "mode": "min"}))
    spec, _ = load_spec(path, ["sweep.seeds=3", "train.lr=0.5"])
    assert spec.seeds == 3 and spec.overrides == {"train.lr": 0.5}


@pytest.mark.parametrize(("fields", "expected"), [
    ({"bogus": 1}, "bogus: unknown key; allowed keys here: base, budget, max_concurrent, metric, mode, name, "),
    ({"space": {"train.lr": {"gird": [1]}}}, "space.train.lr.gird: unknown key; allowed keys here: choice, grid, "),
    ({"space": {"train.lrr": [1e-3]}}, "space.train.lrr: unknown config key 'lrr' in train; allowed: activation_checkpointing, adversarial, batch_size"),
    ({"overrides": {"modle.hidden_size": 8}}, "overrides.modle.hidden_size: unknown config key 'modle' in the run config"),
    ({"objective_sets": {}}, "space: empty; give at least one dimension under space: or objective_sets:"),
    ({"space": {"moe.gate": []}}, "space.moe.gate = []: grid is empty; give at least one value"),
    ({"space": {"train.lr": {"uniform": [1.0, 0.1]}}}, "space.train.lr: uniform = [1.0, 0.1]: needs [low, high]"),
    ({"objective_sets": {"mlm": ["mlm"], "x": ["mlm", "mrx"]}}, "objective_sets.x = ['mlm', 'mrx']: unknown objective(s) mrx; registered: "),
    ({"metric": "eval/i2t_r1"}, "metric = 'eval/i2t_r1': no point of this sweep reports it: p00 (objectives=mlm): "
                                "retrieval needs ITM scores (itm) or ITC embeddings (itc); active objectives: mlm"),
    ({"metric": "loss/itm"}, "metric = 'loss/itm': no point of this sweep reports it: p00 (objectives=mlm): needs objective 'itm'"),
    ({"space": {"moe.gate": ["switch", "topk"]}}, "point p01 (objectives=mlm moe.gate=topk): moe.gate = 'topk': Input should be"),
    ({"mode": "maximum"}, "mode = 'maximum': Input should be 'min' or 'max'"),
    ({"budget": {"steps": 3, "tokens": 10}}, "budget: give exactly one of steps, tokens"),
    ({"seeds": 0}, "seeds = 0: must be >= 1 (repeats per point) or a list of seeds"),
    ({"scheduler": {"type": "asha"}}, "scheduler = asha: metric 'eval/mlm_acc' is only reported at the last step"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path: Path, fields: dict[str, Any], expected: str) -> None:
    problems = _problems(tmp_path, **fields)
    assert any(p.startswith(expected) for p in problems), problems


def test_the_cli_reports_a_bad_sweep_file_before_starting_anything(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": QUICKSTART, "objective_sets": {"mlm": ["mlm"]},
                                    "metric": "eval/i2t_r1", "mode": "max"}))
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: metric = 'eval/i2t_r1': no point of this sweep reports it")
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["sweep", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "not a sweep directory" in result.output


def test_an_existing_sweep_dir_needs_resume_or_fresh(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": QUICKSTART, "overrides": TINY, "out": str(tmp_path),
                                    "objective_sets": {"mlm": ["mlm"]}, "metric": "loss/mlm", "mode": "min"}))
    plan = prepare(path, [])
    Path(plan.sweep_dir).mkdir()
    (Path(plan.sweep_dir) / "sweep.yaml").write_text(plan.to_yaml())
    with pytest.raises(ConfigError, match=r"exists; continue it with `mmpt sweep --resume .*`, or start over with --fresh"):
        prepare(path, [])
    assert prepare(path, [], fresh=True).sweep_dir == plan.sweep_dir and not Path(plan.sweep_dir).exists()


def test_concurrency_follows_the_resources_a_trial_needs(tmp_path: Path) -> None:
    plan = plan_sweep(_spec(), ROOT, tmp_path)  # 1 worker x 1 CPU + 1 CPU for its data tasks
    assert concurrency(plan, {"CPU": 4.0}) == 2
    assert concurrency(plan, {"CPU": 1.0}) == 1
    gpu = plan_sweep(_spec(overrides={**TINY, "scaling.use_gpu": True, "scaling.num_workers": 2}), ROOT, tmp_path)
    assert concurrency(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    plan.spec["max_concurrent"] = 3
    assert concurrency(plan, {"CPU": 1.0}) == 3


@pytest.mark.parametrize("name", ["objectives.yaml", "moe_routing.yaml", "zero.yaml"])
def test_the_ready_sweep_files_plan(name: str, tmp_path: Path) -> None:
    spec, spec_dir = load_spec(ROOT / "jobs" / "configs" / "sweeps" / name)
    plan = plan_sweep(spec, spec_dir, tmp_path)
    assert len(plan.points) >= 2 and all(p.steps > 0 for p in plan.points)
    if name == "moe_routing.yaml":  # equal FLOPs: k experts of width 256/k, the same tokens
        from models.moe.config import MoEConfig

        cfgs = [plan.trial_config(p.id, 0) for p in plan.points]
        assert {c.moe.gate for c in cfgs if c.moe.enabled} == set(MoEConfig.model_fields["gate"].annotation.__args__)
        dense_ffn = cfgs[0].model.hidden_size * cfgs[0].model.mlp_ratio
        assert {c.moe.k * c.moe.expert_hidden_size for c in cfgs if c.moe.enabled} == {dense_ffn}
        assert len({p.steps for p in plan.points}) == 1


def test_plans_are_plain_data() -> None:
    assert SweepPlan.__dataclass_fields__.keys() >= {"points", "seeds", "base", "metric"}


def test_asha_stops_on_train_steps_with_milestones_from_the_budget(tmp_path: Path) -> None:
    from orchestrator.sweep.driver import _scheduler

    plan = plan_sweep(_spec(metric="loss/mlm", mode="min", budget={"steps": 40}, scheduler={"type": "asha"}),
                      ROOT, tmp_path)
    asha = _scheduler(plan)
    assert asha._time_attr == "step" and asha._max_t == 40
    assert asha._stop_last_trials is False  # a trial at its last step finishes (and writes its summary)
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [40, 20, 10]  # grace = budget / 4
    assert _scheduler(plan_sweep(_spec(), ROOT, tmp_path)) is None


def test_a_trial_forwards_each_complete_metrics_line_once(tmp_path: Path) -> None:
    from orchestrator.sweep.driver import _forward_new_lines

    path, seen = tmp_path / "metrics.jsonl", []
    assert _forward_new_lines(path, 0, seen.append) == 0  # not written yet
    path.write_text('{"step": 1, "loss/mlm": 2.5, "checkpoint": "/x", "moe/layer1/load": [0.5, 0.5]}\n{"step": 2')
    offset = _forward_new_lines(path, 0, seen.append)
    assert seen == [{"step": 1, "loss/mlm": 2.5}]  # numbers only; the half-written line waits
    with open(path, "a") as f:
        f.write(', "loss/mlm": 2.0}\n')
    _forward_new_lines(path, offset, seen.append)
    assert seen == [{"step": 1, "loss/mlm": 2.5}, {"step": 2, "loss/mlm": 2.0}]
