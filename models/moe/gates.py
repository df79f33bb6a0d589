"""Routing gates: gate name -> a module with DeepSpeed TopKGate's interface.

    switch, gshard, noisy_topk   token choice (each token picks its experts; capacity drops)
    expert_choice                each expert picks its tokens (Zhou et al. 2022)
    aux_free                     token choice balanced by a per-expert bias, no aux loss (DeepSeek-V3)

Shapes: N tokens (flattened batch), D model dim, E experts, K experts per token.

Every gate computes its router in fp32 (Switch "selective precision") and returns a `Routing`
from `route(x_ND, used_N)`. Its `forward(input, used_token, sparse_routes=True, use_tutel=False)`
is the call DeepSpeed's `MOELayer` makes on its `gate` (deepspeed 0.19 `sharded_moe.TopKGate`):
it returns the sparse routes `(l_aux, capacity, E, indices_KN, locations_KN, gates_KN,
exp_counts)`, so these gates also run inside DeepSpeed's own dispatch (`moe.dispatch: deepspeed`).
They do not subclass TopKGate: importing deepspeed here would slow every `import models`.

Differences from DeepSpeed's gates, on purpose:
- capacity counts real tokens (DeepSpeed counts padding too), and padding is never routed (its
  top-2 gate routes padding);
- GShard's second expert is the runner-up, dispatched with probability 2 * its normalised gate
  (GShard Algorithm 1); DeepSpeed instead samples *which* second expert with Gumbel noise and always
  dispatches it. With `second_expert_policy: all` and no drops both agree;
- GShard's combine weights are normalised before the capacity cut (GShard Algorithm 1): a token
  whose second route is dropped keeps g1 / (g1 + g2), DeepSpeed renormalises it to 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from models.moe.config import MoEConfig
from models.moe.routing import (
    NO_EXPERT,
    Routing,
    cut,
    cv_squared,
    finish,
    normal_cdf,
    router_entropy,
    router_logits,
    softmax_and_lse,
    switch_balance_loss,
    top1_router,
    z_loss,
)
from models.recompute import recomputing


class Gate(nn.Module):
    """Common part: router weight `wg` (DeepSpeed's name, kept for its checkpoint code), capacity,
    drops, losses. Subclasses implement `_choose`."""

    k: int

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.num_experts = moe.num_experts
        self.k = moe.k
        self.capacity_factor = moe.capacity_factor
        self.eval_capacity_factor = moe.eval_capacity_factor
        self.min_capacity = moe.min_capacity
        self.dropless = moe.dropless
        self.drop_policy = moe.drop_policy
        self.aux_loss_weight = moe.aux_loss_weight
        self.z_loss_weight = moe.z_loss_weight
        self.noisy_gate_policy = moe.noisy_gate_policy
        self.router_jitter = moe.router_jitter
        self.ep_group: Any = None
        # The routing of the latest forward, for MoEFFN's stats (it takes and clears it).
        self.last_routing: Routing | None = None
        # The logits' argmax while route() runs (_choose of a top-1 gate reuses it).
        self._argmax_N: Tensor | None = None

    def _set_ep_group(self, ep_group: Any) -> None:
        if self.ep_group is not None and ep_group is not self.ep_group:
            raise RuntimeError("this gate already belongs to another expert-parallel group")
        self.ep_group = ep_group

    def _router_input(self, x_ND: Tensor) -> Tensor:
        x_ND = x_ND.float()
        if self.training and self.noisy_gate_policy == "jitter" and self.router_jitter > 0:
            # Switch (Fedus et al. 2021, Table 2 "input jitter"): multiplicative noise on the router input.
            eps = self.router_jitter
            x_ND = x_ND * torch.empty_like(x_ND).uniform_(1.0 - eps, 1.0 + eps)
        return x_ND

    def _choose(self, x_ND: Tensor, logits_NE: Tensor, probs_NE: Tensor, used_N: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (expert_KN with NO_EXPERT for routes not dispatched, gate_KN fp32, unweighted balancing loss)."""
        raise NotImplementedError

    @staticmethod
    def _real(x_ND: Tensor, used_N: Tensor | None) -> Tensor:
        """bool [N]: the real (unpadded) tokens; all of them when no mask is given."""
        if used_N is None:
            return torch.ones(x_ND.shape[0], dtype=torch.bool, device=x_ND.device)
        return used_N.reshape(-1).bool()

    def _factor(self) -> float | None:
        """The capacity factor in force (None: dropless)."""
        if self.dropless:
            return None
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def buffer_rows(self, num_tokens: int) -> int:
        """A static bound on the routes dispatched for `num_tokens` tokens (the dispatch buffer's rows)."""
        return self.k * num_tokens

    def route(self, x_ND: Tensor, used_N: Tensor | None = None) -> Routing:
        used_N = self._real(x_ND, used_N)
        logits_NE = router_logits(self._router_input(x_ND), self.wg.weight)
        probs_NE, lse_N, self._argmax_N = softmax_and_lse(logits_NE)
        expert_KN, gate_KN, balance = self._choose(x_ND, logits_NE, probs_NE, used_N)
        self._argmax_N = None
        routing = finish(
            expert_KN=expert_KN, gate_KN=gate_KN, logits_NE=logits_NE, probs_NE=probs_NE, lse_N=lse_N, used_N=used_N,
            balance=balance, capacity_factor=self._factor(),
            min_capacity=self.min_capacity, policy=self.drop_policy,
            aux_loss_weight=self.aux_loss_weight, z_loss_weight=self.z_loss_weight,
        )
        self.last_routing = routing
        return routing

    def forward(self, input: Tensor, used_token: Tensor | None = None, sparse_routes: bool = True,
                use_tutel: bool = False) -> tuple[Any, ...]:
        """DeepSpeed's gate call (MOELayer.forward) -> its sparse routes."""
        if not sparse_routes or use_tutel:
            raise ValueError("mmpt gates only produce DeepSpeed's sparse routes (sparse_routes=True, no Tutel)")
        r = self.route(input, used_token)
        capacity = r.capacity.clone()
        if self.ep_group is not None and dist.get_world_size(group=self.ep_group) > 1:
            # DeepSpeed's all-to-all exchanges [E, C, D] buffers: every rank needs the same C.
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        return (r.aux, capacity, self.num_experts, r.expert_KN.to(torch.int32), r.slot_KN.to(torch.int32),
                r.gate_KN, r.wanted_E)


class SwitchGate(Gate):
    """Top-1 (Fedus et al. 2021): expert = argmax of the router, combine weight = its probability
    (not renormalised, so the router gets a gradient through the output), Switch balancing loss.
    `noisy_gate_policy: rsample` picks the argmax of Gumbel-perturbed logits in training (DeepSpeed)."""

    def route(self, x_ND: Tensor, used_N: Tensor | None = None) -> Routing:
        if self.training and self.noisy_gate_policy == "rsample":
            return super().route(x_ND, used_N)
        # The router in one autograd function (routing._Top1Router): same values and gradients.
        used_N = self._real(x_ND, used_N)
        gate_N, expert_N, aux, losses, entropy = top1_router(
            self._router_input(x_ND), self.wg.weight, used_N, self.aux_loss_weight, self.z_loss_weight)
        routing = cut(expert_KN=expert_N[None], gate_KN=gate_N[None], used_N=used_N, num_experts=self.num_experts,
                      capacity_factor=self._factor(), min_capacity=self.min_capacity,
                      policy=self.drop_policy, aux=aux, losses=losses, entropy=entropy)
        self.last_routing = routing
        return routing

    def _choose(self, x_ND: Tensor, logits_NE: Tensor, probs_NE: Tensor, used_N: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        if self.training and self.noisy_gate_policy == "rsample":
            u = torch.rand_like(logits_NE).clamp(min=1e-20, max=1 - 1e-7)
            expert_N = (logits_NE - torch.log(-torch.log(u))).argmax(dim=-1)
        else:  # the logits' argmax, which route() took with their max
            expert_N = self._argmax_N if self._argmax_N is not None else logits_NE.argmax(dim=-1)
        gate_N = probs_NE.gather(1, expert_N[:, None]).squeeze(1)
        return expert_N[None], gate_N[None], switch_balance_loss(probs_NE, expert_N, used_N)


class GShardGate(Gate):
    """Top-2 (Lepikhin et al. 2020, Algorithm 1): the two best experts, gates normalised to sum to 1,
    the second dispatched only with probability 2 * g2 in training ("random routing": a token whose
    runner-up has a small gate rarely spends capacity on it); the GShard aux loss over first choices."""

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__(hidden_size, moe)
        self.second_expert_policy = moe.second_expert_policy

    def _choose(self, x_ND: Tensor, logits_NE: Tensor, probs_NE: Tensor, used_N: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        top_N2, expert_N2 = probs_NE.topk(2, dim=-1)
        gate_N2 = top_N2 / top_N2.sum(-1, keepdim=True).clamp(min=torch.finfo(top_N2.dtype).eps)
        expert_2N, gate_2N = expert_N2.t(), gate_N2.t()
        if self.training and self.second_expert_policy == "random":
            dispatch_N = torch.rand_like(gate_2N[1]) < 2.0 * gate_2N[1].detach()
            expert_2N = torch.stack([expert_2N[0], torch.where(dispatch_N, expert_2N[1], NO_EXPERT)])
            gate_2N = torch.stack([gate_2N[0], torch.where(dispatch_N, gate_2N[1], 0.0)])
        return expert_2N, gate_2N, switch_balance_loss(probs_NE, expert_N2[:, 0], used_N)


class NoisyTopKGate(Gate):
    """Noisy top-k (Shazeer et al. 2017): H = x W_g + N(0,1) * softplus(x W_noise) in training,
    G = softmax(KeepTopK(H, k)), and the loss CV^2(Importance) + CV^2(Load), where Importance sums
    the gates per expert and Load sums P(expert chosen | a fresh noise draw) = Phi((clean - threshold)
    / noise std) (§4, Appendix A). Without noise (eval) Load counts the routes instead."""

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__(hidden_size, moe)
        self.w_noise = nn.Linear(hidden_size, moe.num_experts, bias=False)
        # Shazeer et al. initialise W_noise to zero: noise std softplus(0) = 0.69 at the start.
        nn.init.zeros_(self.w_noise.weight)
        self.noise_epsilon = moe.noise_epsilon

    def _choose(self, x_ND: Tensor, logits_NE: Tensor, probs_NE: Tensor, used_N: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        k, E = self.k, self.num_experts
        noisy = self.training
        if noisy:
            std_NE = F.softplus(router_logits(x_ND, self.w_noise.weight)) + self.noise_epsilon
            h_NE = logits_NE + torch.randn_like(logits_NE) * std_NE
        else:
            h_NE = logits_NE
        top_NK1, expert_NK1 = h_NE.topk(min(k + 1, E), dim=-1)
        gate_NK = top_NK1[:, :k].softmax(dim=-1)  # KeepTopK, then softmax over the kept k
        expert_NK = expert_NK1[:, :k]
        w_N1 = used_N.to(gate_NK.dtype)[:, None]
        importance_E = torch.zeros_like(logits_NE).scatter(1, expert_NK, gate_NK * w_N1).sum(0)
        if noisy:
            in_threshold_N1 = top_NK1[:, k:k + 1]  # (k+1)-th best: what an expert in the top k must beat
            out_threshold_N1 = top_NK1[:, k - 1:k]  # k-th best: what an expert outside must beat
            is_in_NE = h_NE > in_threshold_N1
            p_in = normal_cdf((logits_NE - in_threshold_N1) / std_NE)
            p_out = normal_cdf((logits_NE - out_threshold_N1) / std_NE)
            load_E = (torch.where(is_in_NE, p_in, p_out) * w_N1).sum(0)
        else:
            load_E = torch.zeros_like(logits_NE).scatter(1, expert_NK, w_N1.expand_as(gate_NK)).sum(0)
        return expert_NK.t(), gate_NK.t(), cv_squared(importance_E) + cv_squared(load_E)


class ExpertChoiceGate(Gate):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by router probability
    (softmax over experts), C = ceil(capacity_factor * N / E) -- capacity_factor is the paper's c,
    the experts a token gets on average (paper: 2). Balanced by construction: no balancing loss, no
    route is ever over capacity; a token may get several experts or none (`skipped_N`). Padding is
    never taken ahead of a real token; C counts the padded length, so it is a host int (no sync).
    Looks across the batch: not for autoregressive decoding (a token's routing depends on later ones).
    Routing rows: K = E (row e = expert e's picks)."""

    def capacity_for(self, num_tokens: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return max(1, min(num_tokens, max(self.min_capacity, math.ceil(factor * num_tokens / self.num_experts))))

    def buffer_rows(self, num_tokens: int) -> int:
        return self.num_experts * self.capacity_for(num_tokens)

    def route(self, x_ND: Tensor, used_N: Tensor | None = None) -> Routing:
        N, E = x_ND.shape[0], self.num_experts
        used_N = self._real(x_ND, used_N)
        logits_NE = router_logits(self._router_input(x_ND), self.wg.weight)
        probs_NE, lse_N, _ = softmax_and_lse(logits_NE)
        C = self.capacity_for(N)
        # Real tokens score >= 0, padding -1: an expert takes padding only once it has no real token left.
        score_EN = torch.where(used_N[None, :], probs_NE.t(), -1.0)
        _, token_EC = score_EN.detach().topk(C, dim=1)
        kept_EC = used_N[token_EC]
        experts_EC = torch.arange(E, device=x_ND.device)[:, None].expand(E, C)
        expert_KN = torch.full((E, N), NO_EXPERT, dtype=torch.long, device=x_ND.device)
        expert_KN.scatter_(1, token_EC, torch.where(kept_EC, experts_EC, NO_EXPERT))
        slot_KN = torch.zeros_like(expert_KN).scatter_(
            1, token_EC, torch.arange(C, device=x_ND.device).expand(E, C).contiguous())
        gate_KN = torch.where(expert_KN >= 0, probs_NE.t(), torch.zeros_like(probs_NE.t()))
        counts_E = kept_EC.sum(1)
        z = z_loss(lse_N, used_N)
        routing = Routing(
            expert_KN=expert_KN, gate_KN=gate_KN, slot_KN=torch.where(expert_KN >= 0, slot_KN, 0),
            capacity=torch.tensor(C, device=x_ND.device), counts_E=counts_E, wanted_E=counts_E,
            aux=self.z_loss_weight * z, losses={"aux": torch.zeros_like(z), "z_loss": z},
            entropy=router_entropy(probs_NE, logits_NE, lse_N, used_N), tokens=used_N.sum(), used_N=used_N,
        )
        self.last_routing = routing
        return routing


class AuxFreeGate(Gate):
    """Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 §2.1.2): sigmoid affinities
    s = sigmoid(x W); the top-k experts are chosen by s + b, with b a per-expert bias that no gradient
    touches, while the combine weights use s alone (normalised over the chosen k when k > 1, as
    DeepSeek-V3; for k = 1 the raw s, so the router still learns from the output). After every
    training forward b_e += rate * sign(mean load - load_e), the load counted over all data-parallel
    ranks (one all-reduce of E counts), so every rank keeps the same bias. No balancing loss."""

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__(hidden_size, moe)
        self.bias_update_rate = moe.bias_update_rate
        # Not named "expert...": DeepSpeed's checkpoint code sends every such key to the expert files.
        self.register_buffer("balance_bias", torch.zeros(moe.num_experts))

    def _choose(self, x_ND: Tensor, logits_NE: Tensor, probs_NE: Tensor, used_N: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        scores_NE = torch.sigmoid(logits_NE)
        _, expert_NK = (scores_NE.detach() + self.balance_bias.float()).topk(self.k, dim=-1)
        gate_NK = scores_NE.gather(1, expert_NK)
        if self.k > 1:
            gate_NK = gate_NK / gate_NK.sum(-1, keepdim=True).clamp(min=1e-20)
        return expert_NK.t(), gate_NK.t(), logits_NE.new_zeros(())

    def route(self, x_ND: Tensor, used_N: Tensor | None = None) -> Routing:
        routing = super().route(x_ND, used_N)
        if self.training and self.bias_update_rate > 0 and not recomputing():
            load_E = routing.wanted_E.float()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(load_E)
            with torch.no_grad():
                self.balance_bias.add_(self.bias_update_rate * torch.sign(load_E.mean() - load_E))
        return routing


MOE_GATES: dict[str, type[Gate]] = {"switch": SwitchGate, "gshard": GShardGate, "noisy_topk": NoisyTopKGate,
                                    "expert_choice": ExpertChoiceGate, "aux_free": AuxFreeGate}
