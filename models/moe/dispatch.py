"""Token dispatch: how routed tokens reach their experts and come back.

Shapes: B batch, S tokens, N = B*S flattened tokens, D model dim, E experts, L local experts
(E / ep_size), R routes that are dispatched (kept after capacity), K routes per token.

`indexed` (default) sorts the kept routes by expert and runs each expert on its contiguous slice,
so compute and all-to-all volume follow the tokens actually routed (MegaBlocks, Gale et al. 2022,
without its block-sparse kernels). DeepSpeed's `MOELayer` instead copies tokens into [E, C, D]
buffers padded to capacity C and runs every expert on all C rows: its cost grows with the capacity
factor whether or not the slots are used. With expert parallelism the indexed dispatch exchanges
per-expert counts first, then uneven all-to-alls (`all_to_all_single` with split sizes).

`deepspeed` keeps DeepSpeed's `MOELayer` and only swaps its gate (for comparison and as a fallback).
Either way the layer sits at `MoE.deepspeed_moe` with its experts at `.experts.deepspeed_experts.<i>`,
the names DeepSpeed's engine and checkpoint code look for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

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


class IndexedMoELayer(nn.Module):
    """Drop-in for DeepSpeed's `MOELayer` (same attributes: gate, experts, ep_group, l_aux, exp_counts)
    that computes only the routed tokens. `forward(x_BSD, used_N) -> y_BSD`; unrouted tokens get 0."""

    def __init__(self, gate: Gate, experts: nn.Module, ep_size: int, num_local_experts: int) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts  # DeepSpeed's Experts: .deepspeed_experts is a ModuleList of L experts
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
        return _combine(x_ND, r, self._run).reshape(x.shape)

    def _run(self, x_RD: Tensor, counts_E: Tensor, counts: list[int]) -> Tensor:
        """Expert outputs for rows sorted by global expert id, `counts[e]` rows for expert e."""
        if self.ep_size == 1:
            return self._local(x_RD, counts)
        if self.ep_group is None:
            raise RuntimeError("ep_size > 1 needs the expert-parallel group: call deepspeed.initialize first")
        P, L = self.ep_size, self.num_local_experts
        # recv_PL[p, l]: rows rank p sends to my local expert l.
        recv_PL = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_PL, counts_E.contiguous(), group=self.ep_group)
        recv_PL = recv_PL.view(P, L)
        send, recv = counts_E.view(P, L).sum(1).tolist(), recv_PL.sum(1).tolist()
        x_in = _AllToAllV.apply(x_RD, send, recv, self.ep_group)
        # Arrived grouped by (source rank, local expert): regroup by local expert, run, restore order.
        local_of_row = torch.repeat_interleave(
            torch.arange(L, device=x_RD.device).repeat(P), recv_PL.reshape(-1), output_size=x_in.shape[0]
        )
        order = torch.argsort(local_of_row, stable=True)
        y_sorted = self._local(x_in.index_select(0, order), recv_PL.sum(0).tolist())
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return _AllToAllV.apply(y_sorted.index_select(0, inverse), recv, send, self.ep_group)

    def _local(self, x_RD: Tensor, counts: list[int]) -> Tensor:
        outs = []
        # Every expert runs, on zero rows if none were routed to it, so all expert parameters get a
        # gradient each step (DeepSpeed's ZeRO bookkeeping expects one).
        for chunk, expert in zip(x_RD.split(counts), self.experts.deepspeed_experts, strict=True):
            out = expert(chunk)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs)


def _combine(x_ND: Tensor, r: Routing, run: Callable[[Tensor, Tensor, list[int]], Tensor]) -> Tensor:
    """Gather kept routes sorted by expert, run them, add gate * output back into their tokens."""
    K, N = r.expert_KN.shape
    expert_R = r.expert_KN.reshape(-1)
    counts = r.counts_E.tolist()  # the one device-to-host sync: chunk sizes must be host ints
    # Stable sort by expert puts not-dispatched routes (-1) first; cut them off by count.
    order = torch.argsort(expert_R, stable=True)[expert_R.numel() - sum(counts):]
    token_R = order % N  # routes are k-major: route index k*N + n is token n
    gate_R = r.gate_KN.reshape(-1).index_select(0, order)
    y_RD = run(x_ND.index_select(0, token_R), r.counts_E, counts)
    # Weighted sum in fp32 (as DeepSpeed's _sparse_decode): bf16 sums over routes lose precision.
    out = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
    out = out.index_add(0, token_R, y_RD.float() * gate_R[:, None])
    return out.to(x_ND.dtype)


def _indexed(layer: MoE, gate: Gate) -> None:
    old = layer.deepspeed_moe
    layer.deepspeed_moe = IndexedMoELayer(gate, old.experts, old.ep_size, old.num_local_experts)


def _deepspeed(layer: MoE, gate: Gate) -> None:
    layer.deepspeed_moe.gate = gate


# dispatch name -> installs a gate (and dispatch) into a freshly built DeepSpeed MoE layer.
DISPATCHES: dict[str, Callable[[MoE, Gate], None]] = {"indexed": _indexed, "deepspeed": _deepspeed}
