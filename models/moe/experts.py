"""A layer's local experts as stacked weights: one grouped matmul per projection, not a loop.

Shapes: L local experts, D model dim, F expert hidden dim, M rows (routes) sorted by expert,
G expert-parallel ranks, C capacity slots.

Each expert is the block's FeedForward (Linear(D, F) -> GELU -> Linear(F, D), with biases); the L
experts' weights are stacked as `fc1_weight` [L, F, D], `fc1_bias` [L, F], `fc2_weight` [L, D, F],
`fc2_bias` [L, D] (nn.Linear's layout per expert, so mat_b is column-major for the grouped GEMM, as
torchtitan and DeepSpeed's GroupedExperts store theirs).

- `grouped(x_MD, offsets_L, row_expert_M)`: rows sorted by expert, `offsets_L[l]` = end of expert
  l's rows (on the device: no host sync); rows past offsets_L[-1] are not computed: their output is
  0 and they get no gradient. On CPU, where reading the counts costs nothing, only the kept rows
  are computed by a hand-written forward and backward (models/moe/host_experts.py). On a GPU, one
  `torch.nn.functional.grouped_mm` per projection over all rows, masked (CUDA kernels for bf16 on
  sm80+); without it (older PyTorch, fp32 on CUDA) a loop over the experts' slices, which needs
  the counts on the host.
- `forward(x_GLCD)`: DeepSpeed's MOELayer call (capacity-padded [G, L, C, D] buffers,
  `moe.dispatch: deepspeed`): one batched matmul per projection.

DeepSpeed's checkpoint layout is kept: `state_dict()` yields one entry per expert under
`deepspeed_experts.<i>.fc1.weight` ... (the names its engine saves to one file per global expert
and loads back by), and `load_state_dict` stacks them again. Parameters carry DeepSpeed's expert
marks (`allreduce = False`, `group_name`), so ZeRO reduces them over the expert-data-parallel group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.moe.host_experts import GradBuffers, HostExpertsFFN

_PER_EXPERT = {"fc1_weight": "fc1.weight", "fc1_bias": "fc1.bias", "fc2_weight": "fc2.weight", "fc2_bias": "fc2.bias"}
_EXPERTS_KEY = "deepspeed_experts"


def grouped_mm_supported(x: Tensor) -> bool:
    """Whether PyTorch's grouped GEMM takes this input (the CUDA kernels are bf16-only, sm80+)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)


class StackedExperts(nn.Module):
    """The L local experts of one MoE layer (module docstring)."""

    def __init__(self, num_local_experts: int, hidden_size: int, expert_hidden_size: int,
                 group_name: str | None = None) -> None:
        super().__init__()
        L, D, Fh = num_local_experts, hidden_size, expert_hidden_size
        self.num_local_experts = L
        self.fc1_weight = nn.Parameter(torch.empty(L, Fh, D))
        self.fc1_bias = nn.Parameter(torch.zeros(L, Fh))
        self.fc2_weight = nn.Parameter(torch.empty(L, D, Fh))
        self.fc2_bias = nn.Parameter(torch.zeros(L, D))
        for p in self.parameters():
            p.allreduce = False  # DeepSpeed's expert marks (deepspeed.moe.experts.Experts sets the same)
            p.group_name = group_name
            p.stacked_experts = True  # dim 0 enumerates experts (init and diversification draw per element)
        for w in (self.fc1_weight, self.fc2_weight):
            nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04)
        self._grad_buffers = GradBuffers()  # the host path's weight-gradient buffers, reused across steps
        self._register_state_dict_hook(_per_expert_state)
        self._register_load_state_dict_pre_hook(_stack_state, with_module=True)

    @classmethod
    def of(cls, experts: nn.Module) -> StackedExperts:
        """Stack DeepSpeed's `Experts` (a ModuleList of FeedForward copies) into one module, same values."""
        copies = list(experts.deepspeed_experts)
        first = copies[0]
        group = getattr(first.fc1.weight, "group_name", None)
        out = cls(len(copies), first.fc1.in_features, first.fc1.out_features, group)
        with torch.no_grad():
            for name, sub in _PER_EXPERT.items():
                mod, attr = sub.split(".")
                getattr(out, name).copy_(torch.stack([getattr(getattr(c, mod), attr) for c in copies]))
        return out

    def expert(self, i: int) -> Callable[[Tensor], Tensor]:
        """Expert i alone, as a function of [..., D] (for tests and inspection)."""
        return lambda x: F.linear(F.gelu(F.linear(x, self.fc1_weight[i], self.fc1_bias[i])), self.fc2_weight[i],
                                  self.fc2_bias[i])

    def grouped(self, x_MD: Tensor, offsets_L: Tensor, row_expert_M: Tensor) -> Tensor:
        """[M, D] expert outputs of rows sorted by expert; rows past offsets_L[-1] give 0 and get no
        gradient. On the host (CPU) the counts are free to read: only the kept rows are computed, by
        one hand-written autograd function (models/moe/host_experts.py); on an accelerator, with no
        host sync, one grouped GEMM per projection over all M rows, masked (`_masked`)."""
        if x_MD.device.type == "cpu" and hasattr(F, "grouped_mm"):
            return self._host(x_MD, offsets_L, row_expert_M)
        if not grouped_mm_supported(x_MD):
            return self._loop(x_MD, offsets_L)
        return self._masked(x_MD, offsets_L, row_expert_M)

    def _host(self, x_MD: Tensor, offsets_L: Tensor, row_expert_M: Tensor) -> Tensor:
        ends = offsets_L.tolist()
        total = ends[-1]
        y_TD = HostExpertsFFN.apply(x_MD[:total], ends, row_expert_M[:total], self._grad_buffers, self.fc1_weight,
                                    self.fc1_bias, self.fc2_weight, self.fc2_bias)
        if total == x_MD.shape[0]:
            return y_TD
        return torch.cat([y_TD, y_TD.new_zeros((x_MD.shape[0] - total, y_TD.shape[1]))])

    def _masked(self, x_MD: Tensor, offsets_L: Tensor, row_expert_M: Tensor) -> Tensor:
        """The grouped GEMM leaves rows past offsets_L[-1] unwritten: masked before and after each
        projection."""
        offs = offsets_L.to(torch.int32)
        valid_M1 = (torch.arange(x_MD.shape[0], device=x_MD.device) < offsets_L[-1])[:, None]
        # The unwritten rows may hold NaN: zero them before anything elementwise touches them, or
        # their (masked) gradient turns into NaN * 0 in GELU's backward.
        x_MD = torch.where(valid_M1, x_MD, 0)
        h_MF = torch.where(valid_M1, F.grouped_mm(x_MD, self.fc1_weight.transpose(-2, -1), offs=offs), 0)
        h_MF = torch.where(valid_M1, F.gelu(h_MF + self.fc1_bias.index_select(0, row_expert_M)), 0)
        y_MD = torch.where(valid_M1, F.grouped_mm(h_MF, self.fc2_weight.transpose(-2, -1), offs=offs), 0)
        return torch.where(valid_M1, y_MD + self.fc2_bias.index_select(0, row_expert_M), 0)

    def _loop(self, x_MD: Tensor, offsets_L: Tensor) -> Tensor:
        ends = offsets_L.tolist()  # host sync: split sizes must be host ints
        starts = [0, *ends[:-1]]
        outs = [F.linear(F.gelu(F.linear(x_MD[a:b], self.fc1_weight[e], self.fc1_bias[e])),
                         self.fc2_weight[e], self.fc2_bias[e]) for e, (a, b) in enumerate(zip(starts, ends, strict=True))]
        tail = x_MD.new_zeros((x_MD.shape[0] - ends[-1], x_MD.shape[1]))
        return torch.cat([*outs, tail])

    def forward(self, x_GLCD: Tensor) -> Tensor:
        """DeepSpeed MOELayer's experts call: [G, L, C, D] capacity buffers -> the same shape."""
        G, L, C, D = x_GLCD.shape
        x_LMD = x_GLCD.transpose(0, 1).reshape(L, G * C, D)
        h_LMF = F.gelu(torch.baddbmm(self.fc1_bias[:, None, :], x_LMD, self.fc1_weight.transpose(-2, -1)))
        y_LMD = torch.baddbmm(self.fc2_bias[:, None, :], h_LMF, self.fc2_weight.transpose(-2, -1))
        return y_LMD.reshape(L, G, C, D).transpose(0, 1)


def split_stacked(items: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The same mapping with every stacked entry (`<prefix>fc1_weight` [L, ...]) replaced by DeepSpeed's
    per-expert entries (`<prefix>deepspeed_experts.<i>.fc1.weight`, views): for state dicts, and for
    per-parameter figures such as gradients."""
    out: dict[str, Tensor] = {}
    for key, value in items.items():
        prefix, _, name = key.rpartition(".")
        sub = _PER_EXPERT.get(name)
        if sub is None:
            out[key] = value
            continue
        for i in range(value.shape[0]):
            out[f"{prefix + '.' if prefix else ''}{_EXPERTS_KEY}.{i}.{sub}"] = value[i]
    return out


def _per_expert_state(module: StackedExperts, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict hook: the stacked tensors as DeepSpeed's per-expert entries (views, no copy)."""
    mine = {prefix + name: state.pop(prefix + name) for name in _PER_EXPERT}
    state.update(split_stacked(mine))


def _stack_state(module: StackedExperts, state: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                 missing: list[str], unexpected: list[str], errors: list[str]) -> None:
    """load_state_dict pre-hook: DeepSpeed's per-expert entries back into the stacked tensors."""
    for name, sub in _PER_EXPERT.items():
        keys = [f"{prefix}{_EXPERTS_KEY}.{i}.{sub}" for i in range(module.num_local_experts)]
        if all(k in state for k in keys):
            state[prefix + name] = torch.stack([state.pop(k) for k in keys])
