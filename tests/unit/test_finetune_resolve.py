"""orchestrator/run/finetune.resolve: the pretrained run's architecture, tokenizer and checkpoint, as
absolute paths (the workers do not run in the driver's directory); RunFailed survives pickling
(a sweep trial's error crosses from its Tune actor to the driver)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.run.finetune import resolve
from orchestrator.run.runner import RunFailed

ROOT = Path(__file__).resolve().parents[2]


def test_resolve_copies_the_architecture_with_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data/shapes/train").mkdir(parents=True)
    Path("data/shapes/tokenizer.json").write_text("{}")
    pre = yaml.safe_load((ROOT / "jobs/configs/quickstart.yaml").read_text())
    pre["model"]["hidden_size"], pre["moe"]["num_experts"] = 96, 0
    Path("runs/pre/checkpoint_0000100").mkdir(parents=True)
    Path("runs/pre/checkpoint_0000200").mkdir()
    Path("runs/pre/config.yaml").write_text(yaml.safe_dump(pre))
    cfg = resolve(load_config(ROOT / "jobs/configs/finetune/vqa.yaml", ["finetune.from_run=runs/pre"]))
    assert cfg.model.hidden_size == 96 and cfg.moe.num_experts == 0 and cfg.objectives == {"mlm": 1.0, "itm": 1.0}
    assert cfg.data.tokenizer == str(tmp_path / "data/shapes/tokenizer.json")
    assert cfg.finetune is not None and cfg.finetune.from_run == str(tmp_path / "runs/pre")
    assert cfg.finetune.checkpoint == str(tmp_path / "runs/pre/checkpoint_0000200")  # the latest
    scratch = resolve(load_config(ROOT / "jobs/configs/finetune/vqa.yaml", ["finetune.from_run=runs/pre",
                                                                            "finetune.init=scratch"]))
    assert scratch.finetune is not None and scratch.finetune.checkpoint is None and scratch.model.hidden_size == 96


def test_run_failed_pickles_with_its_cause() -> None:
    err = pickle.loads(pickle.dumps(RunFailed("ValueError: bad", Path("/x/ray.log"))))
    assert isinstance(err, RunFailed) and err.cause == "ValueError: bad" and err.log_file == Path("/x/ray.log")
    assert str(err) == "training failed: ValueError: bad (full traceback: /x/ray.log)"
