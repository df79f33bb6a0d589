"""Token dispatch: how routed tokens reach their experts and come back.

Shapes: B batch, S tokens, N = B*S flattened tokens, D model dim, E experts, L local experts
(E / ep_size), K routes per token, R = K*N routes, M = R rows of the expert-sorted buffer.

`indexed` (default) computes only the routed tokens (MegaBlocks, Gale et al. 2022, without its
block-sparse kernels): the gate's slots already say where each kept route goes in an expert-sorted
buffer (expert e's routes at rows start_e + slot, start_e = kept routes of the experts before e), so
the buffer is filled by index arithmetic -- no sort, no host sync -- and the layer's experts run as
one grouped matmul per projection over their row ranges (models/moe/experts.py). The buffer has a
static size R; dropped routes sit past the kept rows and are not computed. DeepSpeed's `MOELayer`
instead copies tokens into [E, C, D] buffers padded to capacity C and runs every expert on all C
rows: its cost grows with the capacity factor whether or not the slots are used. With expert
parallelism the indexed dispatch exchanges per-expert counts first (the layer's one host sync:
all-to-all split sizes are host ints), then uneven all-to-alls (`all_to_all_single` with split sizes).

`deepspeed` keeps DeepSpeed's `MOELayer` and swaps its gate and experts (the same stacked experts,
run as a batched matmul over its buffers), for comparison and as a fallback. Either way the layer
sits at `MoE.deepspeed_moe` with its experts at `.experts`, whose state dict keeps DeepSpeed's
per-expert names (`.experts.deepspeed_experts.<i>.fc1.weight`) for its engine's checkpoint code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.moe.experts import StackedExperts
from models.moe.gates import Gate
from models.moe.routing import Routing

if TYPE_CHECKING:  # deepspeed is imported lazily (slow, and fragile in Ray workers)
    from deepspeed.moe.layer import MoE


class _AllToAllV(torch.autograd.Function):
    """all_to_all_single with split sizes; the backward sends gradients along the reverse splits."""

    @staticmethod
    def forward(ctx: Any, x_RD: Tensor, send: list[int], recv: list[int], group: Any) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x_RD.new_empty((sum(recv), x_RD.shape[1]))
        dist.all_to_all_single(out, x_RD.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                               group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _AllToAllV.apply(grad.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


class _Permute(torch.autograd.Function):
    """x.index_select(0, order) for a permutation `order` whose inverse is known: the backward is the
    inverse gather, not index_select's zero-filled index_add (one pass instead of two, no atomics)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class DispatchPlan(NamedTuple):
    """Where each route goes, computed with no sort and no host sync (module docstring)."""

    dest_R: Tensor  # long: row of route r in the expert-sorted buffer (kept routes first, by expert)
    src_M: Tensor  # long [M = R]: token whose hidden state fills each buffer row
    ends_E: Tensor  # long: end row of each expert's rows (cumulative kept counts)
    row_expert_M: Tensor  # long: expert of each buffer row (0 for the dropped rows past ends_E[-1])
    route_M: Tensor  # long: route that fills each buffer row


def plan_dispatch(r: Routing, rows: int | None = None) -> DispatchPlan:
    """Expert-sorted buffer positions from the gate's slots: route (e, slot s) goes to row
    start_e + s, where start_e = the kept routes of experts before e, so kept routes fill rows
    [0, total) grouped by expert. `rows` (M, default R) is a static bound on the kept routes: with
    M = R the dropped routes take the rows after `total`, in route order (dest_R is a permutation);
    with M < R (expert choice: E x C of E x N) they all go to row M, which is cut off."""
    K, N = r.expert_KN.shape
    R = K * N
    M = R if rows is None else rows
    expert_R = r.expert_KN.reshape(-1)
    kept_R = expert_R >= 0
    ends_E = torch.cumsum(r.counts_E, 0)
    starts_E = ends_E - r.counts_E
    parked_R = ends_E[-1] + torch.cumsum(~kept_R, 0) - 1 if M == R else torch.full_like(expert_R, M)
    dest_R = torch.where(kept_R, starts_E[expert_R.clamp(min=0)] + r.slot_KN.reshape(-1), parked_R)
    # Rows no route fills (M < R) take route 0: their output is 0 (experts.grouped masks rows >= total).
    route_M = torch.zeros(M + 1, dtype=torch.long, device=dest_R.device)
    route_M = route_M.index_copy_(0, dest_R, torch.arange(R, device=dest_R.device))[:M]
    return DispatchPlan(dest_R, route_M % N, ends_E, expert_R.clamp(min=0).index_select(0, route_M), route_M)


class IndexedMoELayer(nn.Module):
    """Drop-in for DeepSpeed's `MOELayer` (same attributes: gate, experts, ep_group, l_aux, exp_counts)
    that computes only the routed tokens. `forward(x_BSD, used_N) -> y_BSD`; unrouted tokens get 0."""

    def __init__(self, gate: Gate, experts: StackedExperts, ep_size: int, num_local_experts: int) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.ep_size = ep_size
        self.num_local_experts = num_local_experts
        self.ep_group: Any = None
        self.l_aux: Tensor | None = None
        self.exp_counts: Tensor | None = None

    def _set_ep_group(self, ep_group: Any) -> None:
        self.ep_group = ep_group
        self.gate._set_ep_group(ep_group)

    def forward(self, x: Tensor, used_token: Tensor | None = None) -> Tensor:
        D = x.shape[-1]
        x_ND = x.reshape(-1, D)
        r = self.gate.route(x_ND, used_token)
        self.l_aux, self.exp_counts = r.aux, r.counts_E
        plan = plan_dispatch(r, self.gate.buffer_rows(x_ND.shape[0]))
        if _is_permutation(plan, x_ND):
            x_MD = _Permute.apply(x_ND, plan.src_M, plan.dest_R)
        else:
            x_MD = x_ND.index_select(0, plan.src_M)
        if self.ep_size == 1:
            y_MD = self.experts.grouped(x_MD, plan.ends_E, plan.row_expert_M)
        else:
            y_MD = self._exchange(x_MD, r.counts_E)
        return _combine(y_MD, plan, r, x_ND).reshape(x.shape)

    def _exchange(self, x_MD: Tensor, counts_E: Tensor) -> Tensor:
        """Expert parallelism: the kept rows (sorted by global expert) to the ranks that hold their
        experts, computed there, and back. Split sizes must be host ints: one sync per layer."""
        if self.ep_group is None:
            raise RuntimeError("ep_size > 1 needs the expert-parallel group: call deepspeed.initialize first")
        P, L = self.ep_size, self.num_local_experts
        # recv_PL[p, l]: rows rank p sends to my local expert l.
        recv_PL = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_PL, counts_E.contiguous(), group=self.ep_group)
        recv_PL = recv_PL.view(P, L)
        send, recv = counts_E.view(P, L).sum(1).tolist(), recv_PL.sum(1).tolist()
        total = sum(send)
        x_in = _AllToAllV.apply(x_MD[:total], send, recv, self.ep_group)
        # Arrived grouped by (source rank, local expert): regroup by local expert, run, restore order.
        local_of_row = torch.repeat_interleave(
            torch.arange(L, device=x_MD.device).repeat(P), recv_PL.reshape(-1), output_size=x_in.shape[0]
        )
        order = torch.argsort(local_of_row, stable=True)
        y_sorted = self.experts.grouped(x_in.index_select(0, order), torch.cumsum(recv_PL.sum(0), 0),
                                        local_of_row.index_select(0, order))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y_kept = _AllToAllV.apply(y_sorted.index_select(0, inverse), recv, send, self.ep_group)
        return torch.cat([y_kept, y_kept.new_zeros((x_MD.shape[0] - total, x_MD.shape[1]))])


def _is_permutation(plan: DispatchPlan, x_ND: Tensor) -> bool:
    """One route per token and a buffer of N rows: src_M and dest_R are inverse permutations."""
    return plan.dest_R.shape[0] == plan.src_M.shape[0] == x_ND.shape[0]


def _combine(y_MD: Tensor, plan: DispatchPlan, r: Routing, x_ND: Tensor) -> Tensor:
    """Each token's sum of gate * expert output over its kept routes (0 for a token with none)."""
    K, N = r.expert_KN.shape
    gate_R = r.gate_KN.reshape(-1)  # 0 for dropped routes
    if _is_permutation(plan, x_ND):  # one route per token, buffer = a permutation: gather, no sum
        y_RD = _Permute.apply(y_MD, plan.dest_R, plan.src_M)  # back to route order; a dropped route's row is 0
        return (y_RD * gate_R.to(y_RD.dtype)[:, None]).to(x_ND.dtype)
    # Weighted sum over each token's buffer rows, in fp32 (as DeepSpeed's _sparse_decode: bf16 sums
    # over routes lose precision); rows no kept route fills hold 0.
    contrib_MD = y_MD.float() * gate_R.index_select(0, plan.route_M)[:, None]
    out = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
    return out.index_add_(0, plan.src_M, contrib_MD).to(x_ND.dtype)


def _indexed(layer: MoE, gate: Gate) -> None:
    old = layer.deepspeed_moe
    layer.deepspeed_moe = IndexedMoELayer(gate, StackedExperts.of(old.experts), old.ep_size, old.num_local_experts)


def _deepspeed(layer: MoE, gate: Gate) -> None:
    layer.deepspeed_moe.gate = gate
    layer.deepspeed_moe.experts = StackedExperts.of(layer.deepspeed_moe.experts)


# dispatch name -> installs a gate (and dispatch) into a freshly built DeepSpeed MoE layer.
DISPATCHES: dict[str, Callable[[MoE, Gate], None]] = {"indexed": _indexed, "deepspeed": _deepspeed}
