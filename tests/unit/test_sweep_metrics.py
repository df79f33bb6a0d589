"""Which metric names a run config reports (orchestrator.sweep.trial_metrics): the rules, one by one."""

from __future__ import annotations

import pytest

import models
from jobs.config import RunConfig
from orchestrator.sweep.trial_metrics import example_metrics, metric_problem


def _cfg(objectives: dict[str, float], **sections: dict) -> RunConfig:
    return RunConfig.model_validate({"objectives": objectives, **sections})


MLM_ITM = _cfg({"mlm": 1.0, "itm": 1.0}, moe={"num_experts": 4})
MLM = _cfg({"mlm": 1.0})


@pytest.mark.parametrize("metric", [
    "loss/total", "loss/mlm", "loss/itm", "loss/moe_aux", "moe/layer1/dropped", "samples_per_s", "tokens_per_s",
    "step", "data/bad_samples", "memory/total_bytes", "eval/loss", "eval/i2t_r1", "eval/t2i_r5", "eval/i2t_r10",
    "eval/chance_r1", "eval/itm_acc", "eval/mlm_acc", "eval/grounded_mlm_acc", "eval/text_only_mlm_acc",
    "train/mlm_acc",
])
def test_metrics_a_mlm_itm_moe_run_reports(metric: str) -> None:
    assert metric_problem(metric, MLM_ITM) is None


@pytest.mark.parametrize(("metric", "why"), [
    ("eval/i2t_r1", "retrieval needs ITM scores (itm) or ITC embeddings (itc); active objectives: mlm"),
    ("eval/chance_r1", "retrieval needs ITM scores (itm)"),
    ("eval/itm_acc", "needs objective 'itm', which is not active (active: mlm)"),
    ("loss/itm", "needs objective 'itm', which is not active (active: mlm)"),
    ("loss/bogus", "needs objective 'bogus', which is not a registered objective (active: mlm)"),
    ("loss/moe_aux", "needs MoE layers (moe.num_experts is 0: a dense model)"),
    ("eval/foo_acc", "names no objective (registered: "),
    ("throughput", "is not a metric mmpt reports; metrics this run reports: loss/total, loss/mlm"),
])
def test_metrics_an_mlm_only_dense_run_does_not_report(metric: str, why: str) -> None:
    problem = metric_problem(metric, MLM)
    assert problem is not None and why in problem and "\n" not in problem


def test_eval_metrics_need_held_out_data() -> None:
    cfg = _cfg({"mlm": 1.0, "itm": 1.0}, data={"eval": None})
    assert metric_problem("eval/mlm_acc", cfg) == "needs held-out data (data.eval is null)"
    assert metric_problem("eval/i2t_r1", cfg) == "needs held-out data (data.eval is null)"
    assert metric_problem("train/mlm_acc", cfg) is None  # training metrics need no eval split


def test_an_objective_registered_later_is_covered_without_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.OBJECTIVES, "mrc", models.OBJECTIVES["mlm"])
    monkeypatch.setitem(models.OBJECTIVES, "mrc_kl", models.OBJECTIVES["mlm"])
    cfg = _cfg({"mlm": 1.0, "mrc_kl": 0.5})
    assert metric_problem("loss/mrc_kl", cfg) is None
    assert metric_problem("eval/mrc_kl_acc", cfg) is None  # the longest registered name wins
    assert metric_problem("eval/mrc_acc", cfg) == "needs objective 'mrc', which is not active (active: mlm, mrc_kl)"


def test_example_metrics_follow_the_config() -> None:
    assert example_metrics(MLM_ITM) == ["loss/total", "loss/itm", "loss/mlm", "loss/moe_aux", "eval/itm_acc",
                                        "eval/mlm_acc", "eval/i2t_r1", "eval/t2i_r1", "samples_per_s", "tokens_per_s"]
    assert "eval/i2t_r1" not in example_metrics(MLM)
