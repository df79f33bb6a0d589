"""Config loading: overrides, and one clear line per user mistake (no Ray, no data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, apply_overrides, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "configs" / "quickstart.yaml"


def _problems(path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def test_quickstart_loads_with_the_keys_users_rely_on() -> None:
    cfg = load_config(QUICKSTART)
    assert cfg.name == "quickstart"
    assert cfg.data.train == "data/shapes/train"
    assert (cfg.train.steps, cfg.train.batch_size, cfg.scaling.num_workers) == (300, 32, 2)
    assert (cfg.deepspeed.zero_stage, cfg.model.preset) == (2, "vilt")
    assert (cfg.moe.num_experts, cfg.moe.ep_size, cfg.moe.gate) == (4, 2, "switch")
    assert cfg.objectives == {"mlm": 1.0, "itm": 1.0}


def test_overrides_are_yaml_typed_and_nested() -> None:
    cfg = load_config(QUICKSTART, ["moe.num_experts=8", "train.lr=3e-4", "data.train=[a, b]",
                                   "objectives.itm=0.5", "scaling.use_gpu=true"])
    assert cfg.moe.num_experts == 8
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.train == ["a", "b"]
    assert cfg.objectives == {"mlm": 1.0, "itm": 0.5}
    assert cfg.scaling.use_gpu is True


def test_null_override_sets_none_and_switches_an_objective_off() -> None:
    raw = apply_overrides({"objectives": {"mlm": 1.0, "itm": 1.0}}, ["objectives.itm=null", "data.eval=null"])
    assert raw == {"objectives": {"mlm": 1.0, "itm": None}, "data": {"eval": None}}
    cfg = load_config(QUICKSTART, ["objectives.itm=null", "data.eval=null"])
    assert cfg.objectives == {"mlm": 1.0} and cfg.data.eval is None


def test_override_syntax_error_names_the_item() -> None:
    with pytest.raises(ConfigError) as info:
        parse_override("train.steps")
    assert info.value.problems == ["--set 'train.steps': expected dotted.key=value, e.g. --set moe.num_experts=8"]


def test_missing_file() -> None:
    assert _problems("no/such.yaml") == ["config file not found: no/such.yaml"]


def test_unknown_key_lists_allowed_keys() -> None:
    (msg,) = _problems(QUICKSTART, ["train.stepz=5"])
    assert msg.startswith("train.stepz: unknown key; allowed keys here: ")
    assert "steps" in msg and "batch_size" in msg


def test_wrong_type_and_out_of_range_name_field_and_value() -> None:
    problems = _problems(QUICKSTART, ["train.steps=many", "train.batch_size=0"])
    assert len(problems) == 2
    assert problems[0].startswith("train.steps = 'many': ")
    assert problems[1] == "train.batch_size = 0: Input should be greater than or equal to 1"


def test_zero_workers() -> None:
    assert _problems(QUICKSTART, ["scaling.num_workers=0"]) == [
        "scaling.num_workers = 0: Input should be greater than or equal to 1"]


def test_experts_not_divisible_by_ep_size() -> None:
    (msg,) = _problems(QUICKSTART, ["moe.num_experts=3"])
    assert msg.startswith("moe: num_experts=3 is not divisible by ep_size=2")


def test_zero3_with_moe_is_a_config_error() -> None:
    (msg,) = _problems(QUICKSTART, ["deepspeed.zero_stage=3"])
    assert msg.startswith("deepspeed.zero_stage = 3: DeepSpeed's MoE layers cannot be sharded by ZeRO stage 3")


def test_zero3_dense_is_fine() -> None:
    cfg = load_config(QUICKSTART, ["deepspeed.zero_stage=3", "moe.num_experts=0"])
    assert cfg.deepspeed.zero_stage == 3 and not cfg.moe.enabled


def test_ep_size_must_divide_workers_and_unknown_names() -> None:
    problems = _problems(QUICKSTART, ["moe.ep_size=4", "scaling.num_workers=2", "model.preset=nope",
                                      "objectives.foo=1"])
    assert any(p.startswith("moe.ep_size = 4: must divide scaling.num_workers=2") for p in problems)
    assert any(p.startswith("model.preset = 'nope': allowed: ") and "vilt" in p for p in problems)
    assert any(p.startswith("objectives.foo = 1.0: unknown objective; allowed: ") for p in problems)


def test_several_problems_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"steps": -1, "lr": 0}, "colour": "red"}))
    problems = sorted(_problems(bad))
    assert len(problems) == 3
    assert problems[0].startswith("colour: unknown key; allowed keys here: data, deepspeed, eval, finetune, model")
    assert problems[1] == "train.lr = 0: Input should be greater than 0"
    assert problems[2] == "train.steps = -1: Input should be greater than or equal to 1"


def test_cli_config_error_is_one_line_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.main", "run", str(QUICKSTART), "--set", "deepspeed.zero_stage=3",
         "--set", f"storage.path={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: deepspeed.zero_stage = 3: DeepSpeed's MoE layers cannot be sharded")
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
