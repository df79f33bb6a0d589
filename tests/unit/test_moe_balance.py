"""Gates that balance without dropping: expert choice (Zhou et al. 2022) and auxiliary-loss-free
bias balancing (DeepSeek-V3); and the per-modality skipped-token stats every MoE layer reports.

The router weight is the identity (D = E), so the input rows ARE the router logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.moe import MoEFFN, collect_stats
from models.moe.config import MoEConfig
from models.moe.stats import IMAGE, TEXT
from models.recompute import _recompute, recomputing
from tests.unit.test_moe_gates import gate, one_hot_logits


def test_expert_choice_each_expert_takes_its_top_tokens() -> None:
    g = gate(E=4, gate="expert_choice", capacity_factor=1.0)
    torch.manual_seed(0)
    x = torch.randn(12, 4)
    used = torch.ones(12, dtype=torch.bool)
    used[10:] = False  # two padded tokens
    r = g.route(x, used)
    C = math.ceil(1.0 * 12 / 4)
    assert r.expert_KN.shape == (4, 12) and int(r.capacity) == C == 3
    probs = torch.softmax(x, -1)
    for e in range(4):
        picked = torch.nonzero(r.expert_KN[e] == e).flatten()
        expected = torch.topk(torch.where(used, probs[:, e], -1.0), C).indices
        assert sorted(picked.tolist()) == sorted(expected.tolist())  # real tokens only: 10 > C
        torch.testing.assert_close(r.gate_KN[e, picked], probs[picked, e])
        assert sorted(r.slot_KN[e, picked].tolist()) == list(range(C))
    assert r.counts_E.tolist() == [C] * 4 and r.wanted_E.tolist() == [C] * 4
    assert not r.expert_KN[:, 10:].ge(0).any()  # padding is never taken
    # no balancing loss; a token nobody picked is skipped (it passes on the residual)
    assert float(r.losses["aux"]) == 0.0
    skipped = [n for n in range(10) if (r.expert_KN[:, n] < 0).all()]
    assert r.skipped_N.nonzero().flatten().tolist() == skipped


def test_expert_choice_takes_padding_only_when_out_of_real_tokens() -> None:
    g = gate(E=2, gate="expert_choice", capacity_factor=2.0)  # C = ceil(2 * 4 / 2) = 4 > 3 real tokens
    used = torch.tensor([True, True, True, False])
    r = g.route(torch.randn(4, 2), used)
    assert r.counts_E.tolist() == [3, 3]  # the 4th pick of each expert is padding: not kept
    assert not r.expert_KN[:, 3].ge(0).any()


def test_expert_choice_layer_output_is_the_gated_sum_of_the_experts_that_chose_the_token() -> None:
    torch.manual_seed(1)
    moe = MoEFFN(8, MoEConfig(num_experts=4, gate="expert_choice", capacity_factor=1.5, min_capacity=0),
                 expert_hidden_size=16)
    x = torch.randn(2, 6, 8, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.long)
    y, _, counts = moe(x, mask)
    r = moe.gate.route(x.detach().reshape(-1, 8))  # the same routing again (no noise)
    experts = moe.moe.deepspeed_moe.experts
    x_N = x.detach().reshape(-1, 8)
    expected = torch.stack([sum((r.gate_KN[e, n] * experts.expert(e)(x_N[n]) for e in range(4)
                                 if r.expert_KN[e, n] >= 0), torch.zeros(8)) for n in range(12)])
    torch.testing.assert_close(y.detach().reshape(-1, 8), expected)
    assert counts.tolist() == [math.ceil(1.5 * 12 / 4)] * 4
    y.square().sum().backward()
    assert moe.gate.wg.weight.grad.abs().sum() > 0  # the router learns through the gates


def test_aux_free_chooses_by_score_plus_bias_but_gates_by_score() -> None:
    g = gate(E=4, gate="aux_free", dropless=True)
    with torch.no_grad():
        g.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    x = one_hot_logits([0, 1, 2, 0])
    r = g.eval().route(x)
    assert r.expert_KN[0].tolist() == [3, 3, 3, 3]  # the bias decides the choice
    torch.testing.assert_close(r.gate_KN[0], torch.sigmoid(x[:, 3]))  # ... not the weight
    assert float(r.losses["aux"]) == 0.0
    two = gate(E=4, gate="aux_free", top_k=2).eval().route(one_hot_logits([0, 1]))
    torch.testing.assert_close(two.gate_KN.sum(0), torch.ones(2))  # k > 1: normalised over the chosen


def test_aux_free_bias_moves_against_the_load_in_training_only() -> None:
    g = gate(E=4, gate="aux_free", bias_update_rate=0.01)
    x = one_hot_logits([0, 0, 0, 1])  # load 3, 1, 0, 0: mean 1
    g.route(x)
    torch.testing.assert_close(g.balance_bias, torch.tensor([-0.01, 0.0, 0.01, 0.01]))
    g.eval().route(x)
    torch.testing.assert_close(g.balance_bias, torch.tensor([-0.01, 0.0, 0.01, 0.01]))  # eval: unchanged
    g.train()
    with _recompute():
        g.route(x)
    torch.testing.assert_close(g.balance_bias, torch.tensor([-0.01, 0.0, 0.01, 0.01]))  # recomputation: unchanged
    # checkpointed with the model, under a name DeepSpeed does not take for an expert weight
    assert "balance_bias" in g.state_dict() and not any("expert" in k for k in g.state_dict())


def test_aux_free_balances_a_collapsed_router_within_a_few_hundred_steps() -> None:
    """Every token prefers expert 0; the bias alone (no gradient) spreads them out."""
    g = gate(E=4, gate="aux_free", bias_update_rate=0.01)
    torch.manual_seed(0)
    x = torch.randn(256, 4) * 0.1 + torch.tensor([1.0, 0.0, 0.0, 0.0])
    first = g.route(x).wanted_E.max().item() / 256
    for _ in range(300):
        r = g.route(x)
    assert first > 0.9 and r.wanted_E.max().item() / 256 < 0.4


def test_layer_stats_report_skipped_tokens_per_modality() -> None:
    torch.manual_seed(0)
    moe = MoEFFN(4, MoEConfig(num_experts=4, capacity_factor=0.5, drop_policy="position", min_capacity=0),
                 expert_hidden_size=8)
    with torch.no_grad():
        moe.gate.wg.weight.copy_(torch.eye(4))
    # 6 text tokens then 10 image tokens, all of them on expert 0: capacity ceil(0.5*16/4) = 2
    x = torch.zeros(1, 16, 4)
    x[..., 0] = 3.0
    modality = torch.tensor([TEXT] * 6 + [IMAGE] * 10)
    moe(x, torch.ones(1, 16), modality)
    stats = collect_stats(moe)
    # position policy keeps the first 2 routes: both text tokens
    assert stats["moe/layer0/skipped_text"] == pytest.approx(4 / 6)
    assert stats["moe/layer0/skipped_image"] == pytest.approx(1.0)
    assert stats["moe/skipped_text"] == pytest.approx(4 / 6) and stats["moe/skipped_image"] == pytest.approx(1.0)
    moe(x, torch.ones(1, 16))  # modality not given: no per-modality keys
    assert "moe/layer0/skipped_text" not in collect_stats(moe)


def test_encoders_tell_their_moe_layers_which_tokens_are_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.conftest import build, make_batch, moe_cfg

    seen: list[object] = []
    real = MoEFFN.forward

    def spy(self, x, mask, modality=None):  # noqa: ANN001, ANN202
        seen.append(modality if modality is None or isinstance(modality, int) else tuple(modality.tolist()))
        return real(self, x, mask, modality)

    monkeypatch.setattr(MoEFFN, "forward", spy)
    build("vilt", {"mlm": 1.0}, moe_cfg())(make_batch())
    T, P = make_batch()["input_ids"].shape[1], 4
    assert seen and all(m == (TEXT,) * T + (IMAGE,) * P for m in seen)  # the joint sequence
    seen.clear()
    build("clip", {"itc": 1.0}, moe_cfg())(make_batch())
    assert sorted(set(seen)) == [TEXT, IMAGE]
    assert recomputing() is False
