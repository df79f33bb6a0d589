"""The indexed MoE dispatch as it was before the grouped GEMM (models/moe/dispatch.py @ d011efc), kept
for benchmarks/moe.py's side-by-side figures."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.ffn import FeedForward
from models.moe import MoEFFN
from models.moe.gates import Gate
from models.moe.routing import Routing


class OldIndexedLayer(nn.Module):
    """The previous IndexedMoELayer on the same gate and the same expert weights: sort the kept routes
    by expert (a second sort after the gate's), read the counts on the host, run each expert's module
    on its slice in a Python loop, add gate * output into an fp32 buffer."""

    def __init__(self, new: MoEFFN) -> None:
        super().__init__()
        from deepspeed.moe.experts import Experts

        stacked = new.moe.deepspeed_moe.experts
        L, Fh, D = stacked.fc1_weight.shape
        self.gate = new.gate
        self.experts = Experts(FeedForward(D, Fh), L)
        with torch.no_grad():
            for i, e in enumerate(self.experts.deepspeed_experts):
                e.fc1.weight.copy_(stacked.fc1_weight[i])
                e.fc1.bias.copy_(stacked.fc1_bias[i])
                e.fc2.weight.copy_(stacked.fc2_weight[i])
                e.fc2.bias.copy_(stacked.fc2_bias[i])

    def forward(self, x_BSD: Tensor, mask_BS: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_ND = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = Gate.route(self.gate, x_ND, mask_BS.reshape(-1).bool())  # the composed router (no _Top1Router)
        return self._combine(x_ND, r).reshape(x_BSD.shape), r.aux, r.counts_E

    def _local(self, x_RD: Tensor, counts: list[int]) -> Tensor:
        outs = []
        for chunk, expert in zip(x_RD.split(counts), self.experts.deepspeed_experts, strict=True):
            out = expert(chunk)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs)

    def _combine(self, x_ND: Tensor, r: Routing) -> Tensor:
        K, N = r.expert_KN.shape
        expert_R = r.expert_KN.reshape(-1)
        counts = r.counts_E.tolist()
        order = torch.argsort(expert_R, stable=True)[expert_R.numel() - sum(counts):]
        token_R = order % N
        gate_R = r.gate_KN.reshape(-1).index_select(0, order)
        y_RD = self._local(x_ND.index_select(0, token_R), counts)
        out = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
        out = out.index_add(0, token_R, y_RD.float() * gate_R[:, None])
        return out.to(x_ND.dtype)
