"""The memory planner: the ZeRO paper's formula, the activation formula, the rows and the suggestion,
`mmpt plan` end to end on a dense config."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.config import RunConfig
from jobs.memory import expected_model_states
from orchestrator.run.memory_plan import (
    GiB,
    ModelSize,
    activation_bytes,
    count_model,
    ep_choices,
    estimate,
    layer_activation_bytes,
    plan,
    suggest,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "configs" / "quickstart.yaml"


def test_the_papers_worked_example() -> None:
    """ZeRO (Rajbhandari et al. 2020) Figure 1: 7.5B parameters, 64 GPUs, K = 12."""
    totals = [expected_model_states(7_500_000_000, 0, stage, dp=64, precision="bf16")["total"] / 1e9
              for stage in (0, 1, 2, 3)]
    assert [round(t, 1) for t in totals] == [120.0, 31.4, 16.6, 1.9]


def test_fp32_figures_are_what_deepspeed_keeps() -> None:
    psi, n = 1000, 4
    totals = [expected_model_states(psi, 0, stage, dp=n, precision="fp32")["total"] for stage in (0, 1, 2, 3)]
    # stage 0: no master copy (K=8); stages 1-3: ZeRO clones an fp32 master partition (K=12)
    assert totals == [16 * psi, 8 * psi + 12 * psi / n, 4 * psi + 16 * psi / n, 20 * psi / n]


def test_experts_are_divided_by_ep_then_partitioned_over_the_expert_data_parallel_group() -> None:
    # 8B expert parameters, ep 4 of 8 GPUs: 2B per rank, partitioned over 8/4 = 2 ranks at stage 2
    out = expected_model_states(0, 8_000_000_000, 2, dp=8, ep=4, precision="bf16")
    assert out["total"] == out["total"] - out["params_dense"] - out["grads_dense"] - out["optim_dense"]
    assert out["total"] == 2 * 2e9 + 14 * 2e9 / 2
    assert expected_model_states(10, 0, 2, dp=8, ep=8)["total"] == expected_model_states(10, 0, 2, dp=8)["total"]


def test_bad_stage_or_ep_is_an_error_naming_the_value() -> None:
    with pytest.raises(ValueError, match="ep=3 must divide the data-parallel size dp=8"):
        expected_model_states(10, 10, 2, dp=8, ep=3)
    with pytest.raises(ValueError, match="zero stage 4 is not one of 0, 1, 2, 3"):
        expected_model_states(10, 0, 4, dp=8)


def test_layer_activations_reduce_to_korthikanti_et_al() -> None:
    s, b, h, a = 2048, 4, 4096, 32
    naive = layer_activation_bytes(s, b, h, a, ffn_ratio=4, act_bytes=2, dropout=True, fused_attention=False)
    assert naive == s * b * h * (34 + 5 * a * s / h)
    assert layer_activation_bytes(s, b, h, a, 4, 2, dropout=True) == 34 * s * b * h  # fused: no s² terms
    assert layer_activation_bytes(s, b, h, a, 4, 4, dropout=False) == 64 * s * b * h  # fp32, no masks


def test_ep_choices_divide_both_gpus_and_experts() -> None:
    assert ep_choices(4, 8) == [1, 2, 4]
    assert ep_choices(6, 4) == [1, 2]
    assert ep_choices(0, 8) == [1]


def _size(expert: int = 0, dense: int = 1_000_000_000) -> ModelSize:
    return ModelSize(dense=dense, expert=expert, num_layers=24, num_moe_layers=12 if expert else 0,
                     views=2, text_len=32, visual_tokens=196)


def _bf16(**moe: int) -> RunConfig:
    return RunConfig.model_validate({"train": {"precision": "bf16", "batch_size": 8},
                                     "model": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16},
                                     "moe": moe})


def test_zero3_is_infeasible_with_moe_and_the_suggestion_is_the_lowest_fitting_stage_largest_ep() -> None:
    cfg = _bf16(num_experts=8, ep_size=1)
    rows = plan(cfg, _size(expert=16_000_000_000, dense=4_000_000_000), gpus=8, gpu_mem=80 * GiB)
    assert [(r.stage, r.ep) for r in rows] == [(s, e) for s in (0, 1, 2, 3) for e in (1, 2, 4, 8)]
    assert all(r.infeasible and "ZeRO-3" in r.infeasible for r in rows if r.stage == 3)
    # stage 0 holds 16 B x (4B dense + 16B/ep experts) >= 96 GB: over 80 GiB for every ep
    assert not any(r.fits for r in rows if r.stage == 0)
    # stage 1, ep 8: 4 B x 4B + 12 B x 4B / 8 dense, 16 B x 2B experts (not partitioned: 8/8 = 1 rank)
    row = next(r for r in rows if (r.stage, r.ep) == (1, 8))
    assert row.states == 4 * 4e9 + 12 * 4e9 / 8 + 16 * 2e9
    assert [r.fits for r in rows if r.stage == 1] == [False, True, True, True]
    best, ckpt = suggest(rows)
    assert (best.stage, best.ep, ckpt) == (1, 8, False)


def test_checkpointing_is_suggested_only_when_nothing_fits_without_it() -> None:
    cfg = _bf16()
    rows = plan(cfg, _size(), gpus=8, gpu_mem=80 * GiB)
    act, act_ckpt = rows[0].activations, rows[0].activations_ckpt
    assert act_ckpt < act / 5
    tight = plan(cfg, _size(), gpus=8, gpu_mem=rows[-1].total_ckpt + 1)  # only stage 3 with ckpt fits
    best, ckpt = suggest(tight)
    assert (best.stage, ckpt) == (3, True)
    assert suggest(plan(cfg, _size(), gpus=8, gpu_mem=GiB)) is None


def test_activation_checkpointing_keeps_layer_inputs_plus_one_layer() -> None:
    cfg = _bf16()
    size = _size()
    b, s, h = 8, size.seq_len, 1024
    layer = layer_activation_bytes(s, b, h, 16, 4.0, 2, dropout=True)
    assert activation_bytes(cfg, size, checkpointing=False) == 2 * 24 * layer
    assert activation_bytes(cfg, size, checkpointing=True) == 2 * 24 * 2 * s * b * h + layer


def test_moe_dispatch_memory_is_linear_when_indexed_and_quadratic_with_deepspeeds_dense_tensors() -> None:
    from orchestrator.run.memory_plan import _moe_extra_bytes

    def cfg(dispatch: str) -> RunConfig:
        return RunConfig.model_validate({"model": {"hidden_size": 64, "mlp_ratio": 2.0},
                                         "moe": {"num_experts": 4, "capacity_factor": 1.0, "min_capacity": 0,
                                                 "dispatch": dispatch}})

    s, b = 100, 8  # 800 tokens, top-1, capacity 200 per expert (E*C = the tokens)
    indexed, dense = _moe_extra_bytes(cfg("indexed"), b, s, 4), _moe_extra_bytes(cfg("deepspeed"), b, s, 4)
    # the experts' activations over E*C = 800 slots (indexed: its K*S = 800 rows) equal the dense FFN's,
    # the dispatched in/out are 2 x 4 bytes x 800 x 64; indexed keeps three int64 indices and an fp32
    # weight per route, DeepSpeed's dispatch keeps fp32 combine weights + a bool mask over [tokens, E, C]
    assert indexed == 2 * 4 * 800 * 64 + 28 * 800
    assert dense == 2 * 4 * 800 * 64 + 5 * 800 * 4 * 200
    assert _moe_extra_bytes(cfg("indexed"), 2 * b, s, 4) == 2 * indexed  # doubling the batch
    assert _moe_extra_bytes(cfg("deepspeed"), 2 * b, s, 4) > 3.9 * dense - 4 * 2 * 4 * 800 * 64


def test_count_model_counts_the_built_model_exactly() -> None:
    from models import build_pretrainer, count_parameters
    from models.config import ImageSpec, TextSpec

    cfg = RunConfig.model_validate({"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2},
                                    "data": {"image_size": 16, "max_text_len": 8}})
    size = count_model(cfg, vocab_size=50)
    model = build_pretrainer(cfg.model, cfg.moe, cfg.active_objectives, TextSpec(50, 8), ImageSpec(16))
    assert (size.dense, size.expert) == (count_parameters(model), 0)
    assert (size.seq_len, size.views) == (8 + 4, len(model.views))


def test_stage_buffers_are_the_reduce_bucket() -> None:
    cfg = RunConfig.model_validate({"deepspeed": {"extra": {"zero_optimization": {"reduce_bucket_size": 1000}}}})
    assert [estimate(cfg, _size(), 2, stage, 1).buffers for stage in (0, 1, 2, 3)] == [0, 4000, 4000, 4000]


def test_mmpt_plan_prints_every_stage_and_a_suggestion() -> None:
    from orchestrator.cli.main import app

    res = CliRunner().invoke(app, ["plan", str(QUICKSTART), "--gpus", "4", "--vocab-size", "500",
                                   "--set", "moe.num_experts=0", "--set", "moe.ep_size=1"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("│")]
    assert [ln.split("│")[1].strip() for ln in lines] == ["0", "1", "2", "3"]
    assert "vocab 500: --vocab-size" in res.output
    assert "suggested: --set deepspeed.zero_stage=0 (" in res.output


def test_mmpt_plan_bad_override_is_one_line_and_exit_2() -> None:
    from orchestrator.cli.main import app

    res = CliRunner().invoke(app, ["plan", str(QUICKSTART), "--gpus", "4", "--set", "train.precision=fp8"])
    assert res.exit_code == 2
    assert "train.precision = 'fp8'" in res.output


class _FakeEngine:
    """The parts of a DeepSpeed engine `measure_model_states` reads: stage 0, plain AdamW, one rank."""

    def __init__(self, module: object, optimizer: object) -> None:
        self.module, self.optimizer, self.device = module, optimizer, "cpu"

    def zero_optimization_stage(self) -> int:
        return 0

    def bfloat16_enabled(self) -> bool:
        return False

    def allreduce_gradients(self) -> None:
        pass


def test_measure_counts_each_storage_once_and_watches_the_gradients() -> None:
    import torch
    from torch import nn

    from jobs.memory import measure_model_states, watch_gradients

    flat = torch.zeros(100)  # two parameters viewing one flat buffer (as ZeRO-1/2 lays them out)
    module = nn.Module()
    module.a = nn.Parameter(flat[:60].view(6, 10))
    module.b = nn.Parameter(flat[60:90])  # the last 10 elements are padding: held all the same
    module.c = nn.Parameter(torch.zeros(5))
    opt = torch.optim.AdamW(module.parameters())
    engine = _FakeEngine(module, opt)
    watch_gradients(engine)
    (module.a.sum() + module.b.sum() + module.c.sum()).backward()
    engine.allreduce_gradients()  # the end of backward: every gradient is held here
    opt.step()  # the watch unwraps itself after the step
    opt.zero_grad(set_to_none=True)
    m = measure_model_states(engine)
    assert m["memory/params_bytes"] == 4 * (100 + 5)
    assert m["memory/grads_bytes"] == 4 * (60 + 30 + 5) and m["memory/grads_watched"] == 1
    assert m["memory/optim_bytes"] == 4 * 2 * (60 + 30 + 5) + 4 * 3  # exp_avg, exp_avg_sq + 3 step counters
    assert m["memory/master_bytes"] == m["memory/buffers_bytes"] == m["memory/host_bytes"] == 0
    assert m["memory/expected_bytes"] == 16 * 95 and m["memory/num_params"] == 95
    assert "step" not in vars(opt) and "allreduce_gradients" not in vars(engine)  # unwrapped
