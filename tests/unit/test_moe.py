"""MoEFFN over DeepSpeed's MoE on one CPU: routing counts, padding, capacity, aux loss, param flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from models.config import MoEConfig
from models.moe import MOE_GATES, MoEFFN

D, E = 16, 4
Bsz, S = 4, 16


def make_moe(**overrides: object) -> MoEFFN:
    cfg = dict(num_experts=E, capacity_factor=float(E), eval_capacity_factor=float(E), min_capacity=0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return MoEFFN(D, MoEConfig(**cfg), mlp_ratio=2.0)


def inputs(pad_from: int | None = None) -> tuple[Tensor, Tensor]:
    x = torch.randn(Bsz, S, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.ones(Bsz, S, dtype=torch.long)
    if pad_from is not None:
        mask[:, pad_from:] = 0
    return x, mask


def test_output_shape_and_count_shape() -> None:
    y, aux, counts = make_moe()(*inputs())
    assert y.shape == (Bsz, S, D)
    assert aux.shape == ()
    assert counts.shape == (E,) and counts.dtype == torch.long


def test_counts_cover_every_token_when_capacity_is_large() -> None:
    _, _, counts = make_moe()(*inputs())
    assert int(counts.sum()) == Bsz * S


def test_padding_tokens_are_not_routed() -> None:
    x, mask = inputs(pad_from=10)
    y, _, counts = make_moe()(x, mask)
    assert int(counts.sum()) == int(mask.sum()) == Bsz * 10
    # an unrouted token gets no expert output; the residual connection carries it
    assert y[:, 10:].abs().sum() == 0
    assert (y[:, :10].abs().sum(-1) > 0).all()


def test_small_capacity_drops_tokens() -> None:
    moe = make_moe(capacity_factor=0.5)
    _, _, counts = moe(*inputs())
    capacity = (Bsz * S // E) // 2
    assert int(counts.sum()) < Bsz * S
    assert int(counts.max()) <= capacity


def test_eval_uses_the_eval_capacity_factor() -> None:
    moe = make_moe(capacity_factor=0.25, eval_capacity_factor=float(E))
    x, mask = inputs()
    _, _, train_counts = moe.train()(x, mask)
    _, _, eval_counts = moe.eval()(x, mask)
    assert int(train_counts.sum()) <= Bsz * S // 4
    assert int(eval_counts.sum()) == Bsz * S


def test_aux_loss_is_positive_and_trains_the_router() -> None:
    moe = make_moe()
    _, aux, _ = moe(*inputs())
    assert aux.item() > 0 and aux.requires_grad
    aux.backward()
    gate_grad = moe.moe.deepspeed_moe.gate.wg.weight.grad
    assert gate_grad is not None and gate_grad.abs().sum() > 0


def test_expert_params_are_flagged_for_expert_parallel_reduction() -> None:
    moe = make_moe()
    params = dict(moe.named_parameters())
    experts = {n: p for n, p in params.items() if ".deepspeed_experts." in n}
    assert len(experts) == E * 4  # fc1/fc2 weight and bias per expert
    assert all(p.allreduce is False and p.group_name == "ep_size_1" for p in experts.values())
    # the router is an ordinary data-parallel parameter
    assert getattr(params["moe.deepspeed_moe.gate.wg.weight"], "allreduce", True) is True


def test_expert_width_defaults_to_dense_ffn_and_follows_config() -> None:
    assert make_moe().moe.deepspeed_moe.experts.deepspeed_experts[0].fc1.out_features == 2 * D
    assert (
        make_moe(expert_hidden_size=24).moe.deepspeed_moe.experts.deepspeed_experts[0].fc1.out_features == 24
    )


@pytest.mark.parametrize(
    "policy, deepspeed_name", [("none", None), ("jitter", "Jitter"), ("rsample", "RSample")]
)
def test_noisy_gate_policy_is_mapped(policy: str, deepspeed_name: str | None) -> None:
    moe = make_moe(noisy_gate_policy=policy)
    gate = moe.moe.deepspeed_moe.gate
    assert gate.noisy_gate_policy == deepspeed_name
    assert gate.k == 1 and gate.drop_tokens is True


def test_gate_registry() -> None:
    assert "switch" in MOE_GATES


def test_dense_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_experts > 0"):
        MoEFFN(D, MoEConfig())


def test_importing_models_does_not_import_deepspeed() -> None:
    code = "import sys, models, models.moe, models.objectives; assert 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
