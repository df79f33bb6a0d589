"""Routing arithmetic shared by every gate: capacity, slots, drops, balancing losses, router stats.

Shapes: N tokens (the flattened batch), E experts, K routes per token (experts chosen per token),
R = K * N routes. A route (k, n) sends token n to expert `expert_KN[k, n]` with combine weight
`gate_KN[k, n]`; routes are ordered k-major, so all first choices come before all second choices
when experts fill up (GShard Algorithm 1, Mesh TF).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

DropPolicy = Literal["random", "position", "priority"]

# Routes not dispatched anywhere (padding, GShard's skipped second expert, over capacity).
NO_EXPERT = -1


@dataclass
class Routing:
    """A gate's decision for one batch.

    expert_KN  long [K,N]   expert of each route after the capacity cut, NO_EXPERT if not dispatched
    gate_KN    fp32 [K,N]   combine weight of each route (0 where not dispatched)
    slot_KN    long [K,N]   position of the route in its expert's buffer (valid where expert_KN >= 0)
    capacity   long []      slots per expert (dropless: the largest expert's count)
    counts_E   long [E]     routes each expert processes (after capacity)
    wanted_E   long [E]     routes each expert was chosen for (before capacity)
    aux        fp32 []      the gate's total auxiliary loss, already weighted (what training adds)
    losses     {name: fp32 []} unweighted terms: "aux" (balancing loss), "z_loss"
    entropy    fp32 []      mean router entropy over real tokens (nats), detached
    tokens     long []      real (unpadded) tokens routed
    used_N     bool [N]     real (unpadded) tokens

    Token-choice gates have K = experts per token. Expert choice (Zhou et al. 2022) has K = E: row e
    holds expert e's picks (route (e, n) = expert e takes token n), so a token may get 0..E routes.
    """

    expert_KN: Tensor
    gate_KN: Tensor
    slot_KN: Tensor
    capacity: Tensor
    counts_E: Tensor
    wanted_E: Tensor
    aux: Tensor
    losses: dict[str, Tensor]
    entropy: Tensor
    tokens: Tensor
    used_N: Tensor

    @property
    def skipped_N(self) -> Tensor:
        """bool [N]: real tokens that no expert processes (they pass the layer on the residual only)."""
        return self.used_N & (self.expert_KN < 0).all(0)


def router_logits(x_ND: Tensor, weight_ED: Tensor) -> Tensor:
    """Router logits in fp32 whatever the model dtype: Switch §2.4 "selective precision" (a bf16
    softmax over experts is unstable, and the router is a negligible share of the FLOPs)."""
    return torch.nn.functional.linear(x_ND.float(), weight_ED.float())


def expert_capacity(tokens: Tensor, k: int, num_experts: int, factor: float, min_capacity: int) -> Tensor:
    """max(ceil(k * tokens / E * factor), min_capacity) (Switch eq. 3; GShard's 2N/E for k = 2).

    `tokens` counts real tokens only, so padding neither takes slots nor inflates the capacity.
    """
    cap = torch.ceil(tokens.to(torch.float64) * (k * factor / num_experts)).to(torch.long)
    return cap.clamp(min=min_capacity)


def masked_mean(v_N: Tensor, used_N: Tensor) -> Tensor:
    w = used_N.to(v_N.dtype)
    return (v_N * w).sum() / w.sum().clamp(min=1)


def switch_balance_loss(probs_NE: Tensor, first_N: Tensor, used_N: Tensor) -> Tensor:
    """E * sum_e f_e * P_e (Switch eq. 4; GShard's l_aux): f_e the fraction of real tokens whose first
    choice is e, P_e their mean router probability. 1.0 when balanced, E when all pick one expert."""
    E = probs_NE.shape[1]
    w_N = used_N.to(probs_NE.dtype)
    n = w_N.sum().clamp(min=1)
    f_E = torch.zeros(E, dtype=probs_NE.dtype, device=probs_NE.device).index_add_(0, first_N, w_N) / n
    P_E = (w_N @ probs_NE) / n
    return E * (f_E * P_E).sum()


# Below this many experts, ATen's CPU softmax over the last dim runs a scalar loop (it vectorises
# along the softmax dim, 16 fp32 lanes on AVX-512): at E = 4, [2048, 4] takes ~160 us, where exp / sum
# / divide written out take ~40 (benchmarks/moe_cost.py prints both).
SMALL_SOFTMAX = 16


def softmax_and_lse(logits_NE: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(router probabilities, logsumexp of the logits, argmax of the logits). One fused softmax (its
    backward is one pass, where exp(logits - logsumexp) takes three); the logsumexp then costs O(N),
    not another pass over [N, E]: lse = max - log p_max, which is how logsumexp computes it (p_max >=
    1/E: well conditioned). The argmax comes with the max (top-1 gates take it: no second reduction).
    On CPU with few experts the softmax is written out (`SMALL_SOFTMAX`): lse = max + log(sum exp)."""
    max_N, arg_N = logits_NE.max(dim=-1)
    if logits_NE.device.type == "cpu" and logits_NE.shape[1] < SMALL_SOFTMAX:
        exp_NE = (logits_NE - max_N[:, None]).exp()  # not in place: autograd saves exp's output
        sum_N = exp_NE.sum(-1)
        return exp_NE / sum_N[:, None], max_N + sum_N.log(), arg_N
    probs_NE = torch.softmax(logits_NE, dim=-1)
    return probs_NE, max_N - probs_NE.gather(1, arg_N[:, None]).squeeze(1).log(), arg_N


def z_loss(lse_N: Tensor, used_N: Tensor) -> Tensor:
    """Router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return masked_mean(lse_N.square(), used_N)


def cv_squared(v_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation var/mean^2 (population variance, as tensor2tensor's cv_squared
    that Shazeer et al. 2017 used for the importance and load losses)."""
    v_E = v_E.float()
    if v_E.numel() < 2:
        return v_E.new_zeros(())
    return v_E.var(unbiased=False) / (v_E.mean().square() + eps)


@torch.no_grad()
def router_entropy(probs_NE: Tensor, logits_NE: Tensor, lse_N: Tensor, used_N: Tensor) -> Tensor:
    """Mean over real tokens of -sum_e p log p = lse - sum_e p * logits (no log over [N, E])."""
    ent_N = lse_N - (probs_NE * logits_NE).sum(-1)
    return masked_mean(ent_N, used_N)


def _position(gate_KN: Tensor) -> Tensor:
    N = gate_KN.shape[1]
    return torch.arange(N, device=gate_KN.device).expand_as(gate_KN)


def _random(gate_KN: Tensor) -> Tensor:
    # Random token selection (DeepSpeed-MoE): which tokens overflow must not depend on their
    # position, or the image patches that follow the text in a sequence are always the ones dropped.
    N = gate_KN.shape[1]
    return torch.randperm(N, device=gate_KN.device).expand_as(gate_KN)


def _priority(gate_KN: Tensor) -> Tensor:
    # Batch prioritized routing (Riquelme et al. 2021, V-MoE): tokens with the most confident
    # first choice are served first; within each k, ties broken by position.
    order_N = torch.argsort(gate_KN[0].detach(), descending=True, stable=True)
    rank_N = torch.empty_like(order_N)
    rank_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    return rank_N.expand_as(gate_KN)


_DROP_ORDER: dict[str, Callable[[Tensor], Tensor]] = {
    "position": _position,
    "random": _random,
    "priority": _priority,
}


def assign_slots(expert_KN: Tensor, gate_KN: Tensor, num_experts: int, policy: DropPolicy) -> Tensor:
    """Position of every route in its expert's queue: all k-th choices before any (k+1)-th, and
    within one k the order of `policy`. One sort over R routes, no [N, E] one-hot or cumsum."""
    K, N = expert_KN.shape
    R = K * N
    rank_KN = _DROP_ORDER[policy](gate_KN) + N * torch.arange(K, device=expert_KN.device)[:, None]
    e_R = torch.where(expert_KN >= 0, expert_KN, num_experts).reshape(-1)
    order_R = torch.argsort(e_R * R + rank_KN.reshape(-1))
    counts = _bincount(e_R, num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    slot_R = torch.empty_like(e_R)
    slot_R[order_R] = torch.arange(R, device=e_R.device) - starts[e_R[order_R]]
    return slot_R.view(K, N)


def finish(
    *,
    expert_KN: Tensor,
    gate_KN: Tensor,
    logits_NE: Tensor,
    probs_NE: Tensor,
    lse_N: Tensor,
    used_N: Tensor,
    balance: Tensor,
    capacity_factor: float | None,
    min_capacity: int,
    policy: DropPolicy,
    aux_loss_weight: float,
    z_loss_weight: float,
) -> Routing:
    """Apply capacity (None = dropless) to the chosen routes and gather losses and stats.

    `expert_KN` holds the gate's choices with NO_EXPERT for routes it does not dispatch; padding
    tokens are removed here. Over-capacity routes are dropped: their token gets nothing from that
    expert and the residual connection carries it (Switch §2.2).
    """
    z = z_loss(lse_N, used_N)
    return cut(
        expert_KN=expert_KN, gate_KN=gate_KN, used_N=used_N, num_experts=probs_NE.shape[1],
        capacity_factor=capacity_factor, min_capacity=min_capacity, policy=policy,
        aux=aux_loss_weight * balance + z_loss_weight * z, losses={"aux": balance, "z_loss": z},
        entropy=router_entropy(probs_NE, logits_NE, lse_N, used_N),
    )


def cut(
    *,
    expert_KN: Tensor,
    gate_KN: Tensor,
    used_N: Tensor,
    num_experts: int,
    capacity_factor: float | None,
    min_capacity: int,
    policy: DropPolicy,
    aux: Tensor,
    losses: dict[str, Tensor],
    entropy: Tensor,
) -> Routing:
    """The capacity cut of `finish`, for a gate that computed its losses and entropy itself."""
    K, N = expert_KN.shape
    E = num_experts
    expert_KN = torch.where(used_N[None, :], expert_KN, NO_EXPERT)
    # Dropless: the order within an expert matters to no one; skip the random draw.
    slot_KN = assign_slots(expert_KN, gate_KN, E, policy if capacity_factor is not None else "position")
    wanted_E = _count(expert_KN, E)
    tokens = used_N.sum()
    if capacity_factor is None:
        capacity = wanted_E.max()
        kept_KN = expert_KN >= 0
        counts_E = wanted_E
    else:
        capacity = expert_capacity(tokens, K, E, capacity_factor, min_capacity)
        kept_KN = (expert_KN >= 0) & (slot_KN < capacity)
        expert_KN = torch.where(kept_KN, expert_KN, NO_EXPERT)
        counts_E = _count(expert_KN, E)
    return Routing(
        expert_KN=expert_KN,
        gate_KN=torch.where(kept_KN, gate_KN, 0.0),
        slot_KN=torch.where(kept_KN, slot_KN, 0),
        capacity=capacity,
        counts_E=counts_E,
        wanted_E=wanted_E,
        aux=aux,
        losses=losses,
        entropy=entropy,
        tokens=tokens,
        used_N=used_N,
    )


class _Top1Router(torch.autograd.Function):
    """The top-1 router (Switch) in one autograd function: logits = x W^T in fp32, softmax, the
    argmax and its probability (the combine weight), the Switch balancing loss E * sum_e f_e P_e
    and the z-loss mean(lse^2) over real tokens, their weighted sum, and the router entropy. The
    backward is written out (d logits = p * (d p - <d p, p> + 2 c lse), c the z-loss factor): ~10
    tensor ops where autograd over the same forward runs ~40 nodes (per-op overhead is most of a
    router's cost: its GEMM is [N, D] x [D, E]). Same values and gradients as the composed path
    (`softmax_and_lse` + `switch_balance_loss` + `z_loss`; tests/unit/test_moe_gates.py)."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, weight_ED: Tensor, w_N: Tensor, aux_weight: float,  # type: ignore[override]
                z_weight: float) -> tuple[Tensor, ...]:
        x32, w32 = x_ND.float(), weight_ED.float()
        logits_NE = torch.nn.functional.linear(x32, w32)
        probs_NE, lse_N, arg_N = softmax_and_lse(logits_NE)  # no autograd inside forward
        gate_N = probs_NE.gather(1, arg_N[:, None]).squeeze(1)
        E = probs_NE.shape[1]
        n = w_N.sum().clamp(min=1)
        f_E = torch.zeros(E, dtype=probs_NE.dtype, device=probs_NE.device).index_add_(0, arg_N, w_N).div_(n)
        balance = E * torch.dot(f_E, (w_N @ probs_NE).div_(n))
        lw_N = lse_N * w_N
        used_N = w_N.bool()
        z, entropy = z_loss(lse_N, used_N), router_entropy(probs_NE, logits_NE, lse_N, used_N)
        ctx.save_for_backward(x32, w32, probs_NE, arg_N, lw_N, w_N, f_E, n)
        ctx.factors = (aux_weight * E, 2.0 * z_weight)
        ctx.dtypes = (x_ND.dtype, weight_ED.dtype)
        ctx.mark_non_differentiable(arg_N, balance, z, entropy)
        return gate_N, aux_weight * balance + z_weight * z, arg_N, balance, z, entropy

    @staticmethod
    def backward(ctx, g_gate_N: Tensor, g_aux: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x32, w32, probs_NE, arg_N, lw_N, w_N, f_E, n = ctx.saved_tensors
        balance_factor, z_factor = ctx.factors
        # d loss / d probs: the gate's probability, and P_e = sum_n w_n p_ne / n in the balancing loss
        d_NE = torch.outer(w_N, f_E * (g_aux * balance_factor / n))
        d_NE.scatter_add_(1, arg_N[:, None], g_gate_N[:, None].float())
        # softmax backward, plus the z-loss's d lse_n / d logits = p_n (times 2 lse_n w_n / n)
        shift_N = lw_N * (g_aux * z_factor / n) - (d_NE * probs_NE).sum(-1)
        d_NE.add_(shift_N[:, None]).mul_(probs_NE)
        x_dtype, w_dtype = ctx.dtypes
        g_x = torch.mm(d_NE, w32).to(x_dtype) if ctx.needs_input_grad[0] else None
        g_w = torch.mm(d_NE.t(), x32).to(w_dtype) if ctx.needs_input_grad[1] else None
        return g_x, g_w, None, None, None


def top1_router(x_ND: Tensor, weight_ED: Tensor, used_N: Tensor, aux_loss_weight: float, z_loss_weight: float
                ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor], Tensor]:
    """-> (gate_N, argmax expert_N, weighted aux loss, {"aux": balancing loss, "z_loss": z}, entropy)
    of the Switch router (`_Top1Router`); `used_N` bool [N] marks the real tokens."""
    gate_N, aux, arg_N, balance, z, entropy = _Top1Router.apply(
        x_ND, weight_ED, used_N.to(torch.float32), aux_loss_weight, z_loss_weight)
    return gate_N, arg_N, aux, {"aux": balance, "z_loss": z}, entropy


def _bincount(bins: Tensor, size: int) -> Tensor:
    """torch.bincount with a known size: no device-to-host sync on GPU (bincount reads the max)."""
    return torch.zeros(size, dtype=torch.long, device=bins.device).scatter_add_(0, bins, torch.ones_like(bins))


def _count(expert_KN: Tensor, num_experts: int) -> Tensor:
    """Routes per expert; NO_EXPERT routes land in an extra bin that is cut off."""
    bins = torch.where(expert_KN >= 0, expert_KN, num_experts).reshape(-1)
    return _bincount(bins, num_experts + 1)[:num_experts]


def normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
