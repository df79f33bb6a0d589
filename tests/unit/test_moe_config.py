"""The `moe` config section: defaults users rely on, layer selection, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.moe.config import MoEConfig
from orchestrator.config import ConfigError, load_config

QUICKSTART = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "quickstart.yaml"


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, list(overrides))
    return info.value.problems


def test_quickstart_routing() -> None:
    moe = load_config(QUICKSTART).moe
    assert (moe.gate, moe.k, moe.capacity_factor, moe.layers, moe.dropless) == ("switch", 1, 1.25, "every_other", False)
    assert (moe.dispatch, moe.drop_policy, moe.z_loss_weight) == ("indexed", "random", 0.0)


def test_experts_per_token() -> None:
    assert MoEConfig(num_experts=8, gate="gshard").k == 2
    assert MoEConfig(num_experts=8, gate="noisy_topk").k == 2
    assert MoEConfig(num_experts=8, gate="noisy_topk", top_k=4).k == 4


@pytest.mark.parametrize(
    "layers, moe_layers",
    [("all", [0, 1, 2, 3, 4]), ("every_other", [1, 3]), ([0, 4], [0, 4])],
)
def test_layer_selection(layers: object, moe_layers: list[int]) -> None:
    cfg = MoEConfig(num_experts=4, layers=layers)
    assert [i for i in range(5) if cfg.is_moe_layer(i)] == moe_layers
    assert not MoEConfig(num_experts=0, layers=layers).is_moe_layer(1)


def test_layer_problems_against_the_model_depth() -> None:
    assert MoEConfig(num_experts=4, layers=[1, 3]).layer_problems(4) == []
    assert MoEConfig(num_experts=4, layers=[1, 5]).layer_problems(4) == [
        ("moe.layers", [1, 5], "indices must be below model.num_layers=4 (got [5])")]
    assert MoEConfig(num_experts=4).layer_problems(1)[0][2].startswith("selects no layer of a 1-layer model")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["moe.top_k=3"], "moe: top_k=3 does not apply to gate=switch, which routes to 1 expert(s); "
                          "use gate=noisy_topk for another k"),
        (["moe.gate=noisy_topk", "moe.top_k=4"], "moe: gate=noisy_topk with top_k=4 needs num_experts > 4 "
                                                 "(got num_experts=4)"),
        (["moe.gate=gshard", "moe.num_experts=1", "moe.ep_size=1"],
         "moe: gate=gshard routes each token to 2 experts, so it needs num_experts >= 2 (got num_experts=1)"),
        (["moe.gate=gshard", "moe.noisy_gate_policy=rsample"],
         "moe: noisy_gate_policy=rsample (Gumbel top-1) applies to gate=switch only, not gate=gshard"),
        (["moe.gate=noisy_topk", "moe.noisy_gate_policy=jitter"],
         "moe: noisy_gate_policy=jitter does not apply to gate=noisy_topk, which has its own learned noise; "
         "use 'none'"),
        (["moe.layers=[1, 1]"], "moe: layers=[1, 1] repeats an index; list each layer once"),
        (["moe.layers=[-1]"], "moe.layers = [-1]: must be 'all', 'every_other', or a list of layer indices "
                              "(integers >= 0)"),
        (["moe.gate=topk"], "moe.gate = 'topk': Input should be 'switch', 'gshard', 'noisy_topk', 'expert_choice' or 'aux_free'"),
        (["moe.capacity_factor=0"], "moe.capacity_factor = 0: Input should be greater than 0"),
        (["moe.router_jitter=1.5"], "moe.router_jitter = 1.5: Input should be less than 1"),
        (["moe.dispatch=tutel"], "moe.dispatch = 'tutel': Input should be 'indexed' or 'deepspeed'"),
    ],
)
def test_one_line_errors(overrides: list[str], message: str) -> None:
    assert problems(*overrides) == [message]


def test_existing_field_names_still_load() -> None:
    cfg = load_config(QUICKSTART, ["moe.num_experts=8", "moe.ep_size=2", "moe.capacity_factor=1.0",
                                   "moe.eval_capacity_factor=2.5", "moe.min_capacity=2", "moe.layers=all",
                                   "moe.expert_hidden_size=64", "moe.aux_loss_weight=0.1",
                                   "moe.noisy_gate_policy=jitter"]).moe
    assert (cfg.num_experts, cfg.eval_capacity_factor, cfg.expert_hidden_size, cfg.noisy_gate_policy) == (
        8, 2.5, 64, "jitter")
