"""Gates on hand-built logits: capacity, drops, losses against hand-computed values, GShard's random
second expert, fp32 routing under bf16, and agreement with DeepSpeed's own gating functions.

The router weight is the identity (D = E), so the input rows ARE the router logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from models.moe import MOE_GATES
from models.moe.config import MoEConfig
from models.moe.gates import Gate
from models.moe.routing import NO_EXPERT


def gate(E: int = 4, train: bool = True, **overrides: object) -> Gate:
    cfg = dict(num_experts=E, min_capacity=0, drop_policy="position")
    cfg.update(overrides)
    moe = MoEConfig(**cfg)
    g = MOE_GATES[moe.gate](E, moe)
    with torch.no_grad():
        g.wg.weight.copy_(torch.eye(E))
    return g.train(train)


def one_hot_logits(experts: list[int], E: int = 4, high: float = 3.0) -> Tensor:
    x = torch.zeros(len(experts), E)
    x[torch.arange(len(experts)), torch.tensor(experts)] = high
    return x


# -- capacity arithmetic ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gate_name, factor, min_capacity, expected",
    [
        ("switch", 1.25, 0, 4),  # ceil(10 real tokens / 4 experts * 1.25) = ceil(3.125)
        ("switch", 1.0, 0, 3),  # ceil(2.5)
        ("switch", 1.25, 6, 6),  # min_capacity wins
        ("gshard", 1.25, 0, 7),  # ceil(2 * 10 / 4 * 1.25) = ceil(6.25): top-2 capacity counts both routes
    ],
)
def test_capacity_counts_real_tokens(gate_name: str, factor: float, min_capacity: int, expected: int) -> None:
    g = gate(gate=gate_name, capacity_factor=factor, min_capacity=min_capacity, second_expert_policy="all")
    used = torch.ones(12, dtype=torch.bool)
    used[10:] = False  # padding takes no capacity and does not inflate it
    r = g.route(torch.randn(12, 4), used)
    assert int(r.capacity) == expected
    assert (r.expert_KN[:, 10:] == NO_EXPERT).all()


def test_eval_capacity_factor_applies_in_eval_mode() -> None:
    x = torch.randn(16, 4)
    assert int(gate(capacity_factor=0.5, eval_capacity_factor=3.0).route(x).capacity) == 2
    assert int(gate(capacity_factor=0.5, eval_capacity_factor=3.0, train=False).route(x).capacity) == 12


def test_dropless_capacity_is_the_largest_expert_and_nothing_drops() -> None:
    r = gate(dropless=True, capacity_factor=0.1).route(one_hot_logits([0, 0, 0, 0, 0, 1, 2, 2]))
    assert int(r.capacity) == 5
    assert r.expert_KN.tolist() == [[0, 0, 0, 0, 0, 1, 2, 2]]
    assert r.counts_E.tolist() == r.wanted_E.tolist() == [5, 1, 2, 0]


# -- which routes are dropped -------------------------------------------------------------------


def test_position_policy_drops_the_latest_tokens_over_capacity() -> None:
    # 8 tokens, 4 experts, factor 2 -> capacity 4; expert 0 is wanted by tokens 0-5.
    r = gate(capacity_factor=2.0).route(one_hot_logits([0, 0, 0, 0, 0, 0, 1, 1]))
    assert int(r.capacity) == 4
    assert r.expert_KN.tolist() == [[0, 0, 0, 0, NO_EXPERT, NO_EXPERT, 1, 1]]
    assert r.slot_KN.tolist() == [[0, 1, 2, 3, 0, 0, 0, 1]]
    assert r.counts_E.tolist() == [4, 2, 0, 0] and r.wanted_E.tolist() == [6, 2, 0, 0]
    assert r.gate_KN[0, 4:6].tolist() == [0.0, 0.0]


def test_priority_policy_drops_the_least_confident_tokens() -> None:
    x = one_hot_logits([0] * 6 + [1, 1])
    x[:6, 0] = torch.tensor([3.0, 1.0, 4.0, 0.5, 5.0, 2.0])  # tokens 1 and 3 have the smallest gates
    r = gate(capacity_factor=2.0, drop_policy="priority").route(x)
    assert r.expert_KN[0].tolist() == [0, NO_EXPERT, 0, NO_EXPERT, 0, 0, 1, 1]
    assert r.slot_KN[0, [4, 2, 0, 5]].tolist() == [0, 1, 2, 3]  # served in order of confidence


def test_random_policy_drops_uniformly_over_positions() -> None:
    g = gate(capacity_factor=2.0, drop_policy="random")
    x = one_hot_logits([0] * 6 + [1, 1])
    torch.manual_seed(0)
    dropped = torch.zeros(6)
    for _ in range(150):
        r = g.route(x)
        assert int(r.counts_E[0]) == 4
        dropped += (r.expert_KN[0, :6] == NO_EXPERT).float()
    # each of the 6 tokens is dropped with probability 2/6, whatever its position
    assert torch.allclose(dropped / 150, torch.full((6,), 1 / 3), atol=0.12)  # 3 binomial sd


def test_gshard_second_choices_queue_after_all_first_choices() -> None:
    x = torch.tensor([[3.0, 2.0, 0.0, 0.0], [3.0, 2.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0]])
    # capacity ceil(2 * 4 / 4 * 1.0) = 2: experts 0 and 1 are filled by first choices
    r = gate(gate="gshard", capacity_factor=1.0, second_expert_policy="all").route(x)
    assert r.expert_KN.tolist() == [[0, 0, 1, 1], [NO_EXPERT] * 4]
    assert r.wanted_E.tolist() == [4, 4, 0, 0]


# -- losses against hand-computed values --------------------------------------------------------


def _softmax(row: list[float]) -> list[float]:
    z = [math.exp(v) for v in row]
    return [v / sum(z) for v in z]


def test_switch_balance_and_z_loss_match_hand_computation() -> None:
    rows = [[1.0, 0.0, 0.0], [2.0, 0.5, 0.0], [0.0, 1.5, 0.2], [0.3, 0.0, 0.1]]
    used = torch.tensor([True, True, True, False])  # the padded row counts in neither loss
    r = gate(E=3, dropless=True, aux_loss_weight=0.5, z_loss_weight=0.1).route(torch.tensor(rows), used)
    probs = [_softmax(row) for row in rows[:3]]
    f = [2 / 3, 1 / 3, 0.0]  # first choices: expert 0, 0, 1
    P = [sum(p[e] for p in probs) / 3 for e in range(3)]
    balance = 3 * sum(fe * pe for fe, pe in zip(f, P, strict=True))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows[:3]) / 3
    entropy = sum(-sum(p * math.log(p) for p in ps) for ps in probs) / 3
    assert r.losses["aux"].item() == pytest.approx(balance, rel=1e-5)
    assert r.losses["z_loss"].item() == pytest.approx(z, rel=1e-5)
    assert r.aux.item() == pytest.approx(0.5 * balance + 0.1 * z, rel=1e-5)
    assert r.entropy.item() == pytest.approx(entropy, rel=1e-5)
    assert r.gate_KN[0, :3].tolist() == pytest.approx([probs[0][0], probs[1][0], probs[2][1]], rel=1e-5)


def _cv2(v: list[float]) -> float:
    mean = sum(v) / len(v)
    return (sum((x - mean) ** 2 for x in v) / len(v)) / (mean**2 + 1e-10)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_noisy_topk_importance_and_load_losses_without_noise() -> None:
    rows = [[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.5, 0.2]]
    r = gate(E=3, gate="noisy_topk", top_k=2, dropless=True, train=False).route(torch.tensor(rows))
    importance, load = [0.0] * 3, [0.0] * 3
    for row in rows:
        top = sorted(range(3), key=lambda e: -row[e])[:2]
        g = _softmax([row[e] for e in top])  # KeepTopK, then softmax over the kept two
        for e, ge in zip(top, g, strict=True):
            importance[e] += ge
            load[e] += 1
    assert r.expert_KN.tolist() == [[0, 2, 0], [1, 1, 1]]
    assert r.losses["aux"].item() == pytest.approx(_cv2(importance) + _cv2(load), rel=1e-5)


def test_noisy_topk_load_loss_uses_the_smooth_estimator_with_noise() -> None:
    rows = [[2.0, 1.0, 0.0, -1.0], [0.0, 1.0, 3.0, 0.5], [1.0, 0.5, 0.2, 0.9]]
    x = torch.tensor(rows)
    g = gate(E=4, gate="noisy_topk", top_k=2, dropless=True, noise_epsilon=0.05)
    with torch.no_grad():
        g.w_noise.weight.copy_(0.5 * torch.eye(4))
    torch.manual_seed(7)
    r = g.route(x)
    torch.manual_seed(7)
    noise = torch.randn(3, 4).tolist()
    importance, load = [0.0] * 4, [0.0] * 4
    for n, row in enumerate(rows):
        std = [math.log1p(math.exp(0.5 * v)) + 0.05 for v in row]
        h = [row[e] + noise[n][e] * std[e] for e in range(4)]
        ranked = sorted(h, reverse=True)
        top = sorted(range(4), key=lambda e: -h[e])[:2]
        for e, ge in zip(top, _softmax([h[e] for e in top]), strict=True):
            importance[e] += ge
        for e in range(4):
            # P(e in top-k under a fresh noise draw): beat the k-th best of the *other* experts
            threshold = ranked[2] if e in top else ranked[1]
            load[e] += _phi((row[e] - threshold) / std[e])
    assert r.losses["aux"].item() == pytest.approx(_cv2(importance) + _cv2(load), rel=1e-4)
    assert r.losses["aux"].requires_grad


def test_noisy_topk_loss_trains_router_and_noise_weights() -> None:
    g = gate(E=4, gate="noisy_topk", top_k=2, dropless=True)
    torch.manual_seed(0)
    g.route(torch.randn(32, 4)).aux.backward()
    assert g.wg.weight.grad.abs().sum() > 0 and g.w_noise.weight.grad.abs().sum() > 0


# -- GShard's random second expert ---------------------------------------------------------------


@pytest.mark.parametrize("g2", [0.2, 0.4])
def test_gshard_dispatches_second_expert_with_probability_twice_its_gate(g2: float) -> None:
    N = 4000
    # softmax over (a, b, -inf, -inf) with b - a = log(g2 / (1 - g2)): normalised top-2 gates 1-g2, g2
    x = torch.full((N, 4), -30.0)
    x[:, 0], x[:, 1] = 0.0, math.log(g2 / (1 - g2))
    torch.manual_seed(0)
    r = gate(gate="gshard", dropless=True).route(x)
    rate = (r.expert_KN[1] == 1).float().mean().item()
    assert rate == pytest.approx(2 * g2, abs=0.03)  # binomial sd <= 0.008
    assert r.gate_KN[0].mean().item() == pytest.approx(1 - g2, rel=1e-4)
    kept = r.expert_KN[1] == 1
    assert torch.allclose(r.gate_KN[1][kept], torch.tensor(g2), rtol=1e-4)
    assert (r.gate_KN[1][~kept] == 0).all()


def test_gshard_dispatches_both_experts_at_eval() -> None:
    x = torch.tensor([[0.0, -1.5, -30.0, -30.0]]).repeat(100, 1)
    r = gate(gate="gshard", dropless=True, train=False).route(x)
    assert (r.expert_KN[1] == 1).all()


# -- fp32 router under bf16 ---------------------------------------------------------------------


def test_router_runs_in_fp32_under_bf16() -> None:
    g = gate(E=2).bfloat16()
    assert g.wg.weight.dtype == torch.bfloat16
    # bf16 rows whose logits differ by 1/128: a bf16 softmax would round the gate to a coarse value
    x = torch.tensor([[1.0, 1.0 + 2**-7], [0.0, 0.5]], dtype=torch.bfloat16)
    r = g.route(x)
    assert r.gate_KN.dtype == torch.float32
    expected = torch.softmax(x.float(), dim=-1).max(dim=-1).values
    assert torch.allclose(r.gate_KN[0], expected, rtol=1e-6, atol=0)
    bf16_gate = torch.softmax(x, dim=-1).max(dim=-1).values.float()
    assert (r.gate_KN[0] - bf16_gate).abs().max() > 1e-4  # what a bf16 router would have lost
    assert r.expert_KN[0].tolist() == [1, 1]


# -- agreement with DeepSpeed's gating functions ------------------------------------------------


def test_switch_agrees_with_deepspeed_top1gating() -> None:
    from deepspeed.moe.sharded_moe import top1gating

    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    for factor, drop in [(8.0, True), (1.0, False)]:
        ours = gate(E=8, capacity_factor=factor, dropless=not drop).route(logits)
        l_aux, cap, E, idx, loc, gates, counts = top1gating(
            logits.clone(), factor, 0, drop_tokens=drop, use_rts=False, sparse_routes=True)
        assert int(cap) == int(ours.capacity)
        assert torch.equal(idx.long(), ours.expert_KN)
        assert torch.equal(loc.long(), ours.slot_KN)
        assert torch.allclose(gates, ours.gate_KN)
        assert torch.equal(counts, ours.wanted_E)
        assert l_aux.item() == pytest.approx(ours.losses["aux"].item(), rel=1e-6)


def test_switch_keeps_as_many_tokens_as_deepspeed_when_dropping() -> None:
    from deepspeed.moe.sharded_moe import top1gating

    torch.manual_seed(1)
    logits = torch.randn(64, 8) + torch.tensor([2.0, 1.0, 0, 0, 0, 0, 0, 0])  # crowd experts 0 and 1
    ours = gate(E=8, capacity_factor=1.0).route(logits)
    *_, idx, _, _, _ = top1gating(logits.clone(), 1.0, 0, use_rts=False, sparse_routes=True)
    theirs = torch.bincount(idx[idx >= 0].long(), minlength=8)
    assert torch.equal(theirs, ours.counts_E) and int(ours.counts_E.sum()) < 64


def test_gshard_agrees_with_deepspeed_top2gating() -> None:
    from deepspeed.moe.sharded_moe import top2gating

    torch.manual_seed(0)
    logits = torch.randn(64, 8) + torch.tensor([1.5, 0, 0, 0, 0, 0, 0, 0])
    for factor in (8.0, 0.75):
        ours = gate(E=8, gate="gshard", capacity_factor=factor, second_expert_policy="all").route(logits)
        l_aux, cap, E, idx, loc, gates, counts = top2gating(
            logits.clone(), factor, 0, top2_2nd_expert_sampling=False, sparse_routes=True)
        assert int(cap) == int(ours.capacity)
        assert (ours.expert_KN == NO_EXPERT).any() == (factor < 1)
        assert torch.equal(idx.long(), ours.expert_KN)  # drops included: both queue by position
        kept = ours.expert_KN >= 0
        assert torch.equal(loc.long()[kept], ours.slot_KN[kept])
        assert torch.equal(counts, ours.wanted_E)
        assert l_aux.item() == pytest.approx(ours.losses["aux"].item(), rel=1e-6)
        both = kept.all(dim=0)  # combine weights agree where neither route was dropped
        assert both.any() and torch.allclose(gates[:, both], ours.gate_KN[:, both], atol=1e-6)


def test_noisy_topk_without_noise_agrees_with_deepspeed_topkgating() -> None:
    from deepspeed.moe.sharded_moe import topkgating

    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    ours = gate(E=8, gate="noisy_topk", top_k=3, dropless=True, train=False).route(logits)
    _, cap, _, idx, _, gates, counts = topkgating(logits.clone(), 3, 1.0, 0, drop_tokens=False,
                                                  sparse_routes=True)
    assert int(cap) == int(ours.capacity)
    assert torch.equal(idx.long(), ours.expert_KN)
    assert torch.allclose(gates, ours.gate_KN, atol=1e-6)
    assert torch.equal(counts, ours.wanted_E)


# -- router noise -------------------------------------------------------------------------------


def _choices(g: Gate, x: Tensor, draws: int = 20) -> set[tuple[int, ...]]:
    torch.manual_seed(0)
    return {tuple(g.route(x).expert_KN[0].tolist()) for _ in range(draws)}


def test_jitter_perturbs_the_router_input_in_training_only() -> None:
    x = torch.tensor([[1.0, 1.0 + 1e-3, -5.0, -5.0]]).repeat(16, 1)  # near tie between experts 0 and 1
    noisy = gate(dropless=True, noisy_gate_policy="jitter", router_jitter=0.1)
    assert len(_choices(noisy, x)) > 1
    assert _choices(noisy.eval(), x) == {(1,) * 16}
    assert _choices(gate(dropless=True, noisy_gate_policy="jitter", router_jitter=0.0), x) == {(1,) * 16}
    # multiplicative U(1-eps, 1+eps): with both logits > 0 and eps small, a clear winner stays
    x_clear = torch.tensor([[1.0, 2.0, -5.0, -5.0]]).repeat(16, 1)
    assert _choices(gate(dropless=True, noisy_gate_policy="jitter", router_jitter=0.1), x_clear) == {(1,) * 16}


def test_rsample_picks_gumbel_perturbed_argmax_and_gates_its_probability() -> None:
    x = torch.tensor([[0.0, 0.2, -30.0, -30.0]]).repeat(2000, 1)
    torch.manual_seed(0)
    r = gate(dropless=True, noisy_gate_policy="rsample").route(x)
    p = _softmax([0.0, 0.2])
    # Gumbel-max samples the expert from the router's distribution
    assert (r.expert_KN[0] == 1).float().mean().item() == pytest.approx(p[1], abs=0.04)
    assert torch.allclose(r.gate_KN[0][r.expert_KN[0] == 0], torch.tensor(p[0]))
    assert (gate(dropless=True, noisy_gate_policy="rsample", train=False).route(x).expert_KN == 1).all()


def test_noisy_topk_noise_only_in_training() -> None:
    x = torch.tensor([[1.0, 1.05, 0.0, -1.0]]).repeat(16, 1)
    g = gate(gate="noisy_topk", top_k=1, dropless=True)
    assert len(_choices(g, x)) > 1
    assert _choices(g.eval(), x) == {(1,) * 16}


@pytest.mark.parametrize("E", [4, 16])  # 4: below SMALL_SOFTMAX, the softmax written out on CPU
def test_softmax_and_lse_equal_torch_and_their_gradients(E: int) -> None:
    """lse = max - log p_max (O(N) after the softmax) and the router entropy lse - sum p * logits equal
    torch.logsumexp and -sum p log p, gradients included; the argmax is the logits' argmax."""
    from models.moe.routing import SMALL_SOFTMAX, router_entropy, softmax_and_lse

    assert (E < SMALL_SOFTMAX) == (E == 4)
    logits = (5 * torch.randn(64, E, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    probs, lse, arg = softmax_and_lse(logits)
    ref = logits.detach().clone().requires_grad_(True)
    torch.testing.assert_close(probs, torch.softmax(ref, -1))
    torch.testing.assert_close(lse, torch.logsumexp(ref, -1))
    assert torch.equal(arg, ref.argmax(-1))
    w = torch.randn(64, E)
    ((probs * w).sum() + lse.square().sum()).backward()
    ((torch.softmax(ref, -1) * w).sum() + torch.logsumexp(ref, -1).square().sum()).backward()
    torch.testing.assert_close(logits.grad, ref.grad)
    used = torch.ones(64, dtype=torch.bool)
    p = torch.softmax(ref.detach(), -1)
    torch.testing.assert_close(router_entropy(probs, logits, lse, used), -(p * p.log()).sum(-1).mean())


def _composed_switch(x: Tensor, weight: Tensor, used: Tensor, aux_w: float, z_w: float) -> dict[str, Tensor]:
    """The Switch router from torch's own ops: what routing._Top1Router fuses."""
    logits = torch.nn.functional.linear(x.float(), weight.float())
    probs = torch.softmax(logits, -1)
    gate_N, arg = probs.max(-1)
    w, E = used.float(), weight.shape[0]
    n = w.sum()
    f = torch.zeros(E).index_add_(0, arg, w) / n
    balance = E * (f * ((w[:, None] * probs).sum(0) / n)).sum()
    z = (torch.logsumexp(logits, -1).square() * w).sum() / n
    entropy = (-(probs * probs.log()).sum(-1) * w).sum() / n
    return {"gate": gate_N, "arg": arg, "aux": aux_w * balance + z_w * z, "balance": balance, "z": z,
            "entropy": entropy}


@pytest.mark.parametrize("E", [4, 32])  # the written-out softmax, and torch's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_top1_router_equals_torchs_ops_values_and_gradients(E: int, dtype: torch.dtype) -> None:
    """Gate, argmax, balancing loss, z-loss, entropy and the weighted aux loss of the one-function
    Switch router, and its hand-written gradients w.r.t. the input and the router weight, equal the
    same router composed from torch's ops under autograd (padding excluded from every mean)."""
    from models.moe.routing import top1_router

    g = torch.Generator().manual_seed(E)
    x = (torch.randn(96, 24, generator=g) * 2).to(dtype).requires_grad_(True)
    weight = torch.randn(E, 24, generator=g).to(dtype).requires_grad_(True)
    used = torch.rand(96, generator=g) > 0.25
    coef = torch.randn(96, generator=g)  # a downstream use of the gates (the combine)
    gate_N, arg, aux, losses, entropy = top1_router(x, weight, used, 0.5, 0.1)
    ((gate_N * coef).sum() + aux).backward()
    x2, w2 = x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    ref = _composed_switch(x2, w2, used, 0.5, 0.1)
    ((ref["gate"] * coef).sum() + ref["aux"]).backward()
    assert torch.equal(arg, ref["arg"])
    for got, want in [(gate_N, ref["gate"]), (aux, ref["aux"]), (losses["aux"], ref["balance"]),
                      (losses["z_loss"], ref["z"]), (entropy, ref["entropy"])]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert gate_N.dtype == torch.float32 and x.grad.dtype == dtype and weight.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(weight.grad, w2.grad, **tol)
    assert x.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dropless,policy", [(True, "position"), (False, "position"), (False, "priority"),
                                             (False, "random")])
def test_switch_route_equals_the_generic_gate_path(dropless: bool, policy: str) -> None:
    """SwitchGate.route (the fused router + the capacity cut) gives the same routing as the generic
    Gate.route (softmax_and_lse + _choose + finish): experts, slots, counts, gates, losses, and the
    same router gradient."""
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=8, min_capacity=0, capacity_factor=0.75, dropless=dropless, drop_policy=policy,
                    z_loss_weight=0.01)
    sw = MOE_GATES["switch"](16, moe).train()
    x = torch.randn(128, 16)
    used = torch.rand(128) > 0.2
    routes = []
    for route in (sw.route, lambda xi, u: Gate.route(sw, xi, u)):
        sw.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the random drop order draws the same permutation
        r = route(x, used)
        (r.gate_KN.square().sum() + r.aux).backward()
        routes.append((r, sw.wg.weight.grad.clone()))
    (fused, g_fused), (generic, g_generic) = routes
    for field in ("expert_KN", "slot_KN", "counts_E", "wanted_E", "capacity", "tokens"):
        assert torch.equal(getattr(fused, field), getattr(generic, field)), field
    assert (fused.expert_KN == NO_EXPERT).sum() > (0 if dropless else 20)  # padding (and drops) left out
    for a, b in [(fused.gate_KN, generic.gate_KN), (fused.aux, generic.aux), (fused.entropy, generic.entropy),
                 (fused.losses["aux"], generic.losses["aux"]), (fused.losses["z_loss"], generic.losses["z_loss"])]:
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(g_fused, g_generic)
