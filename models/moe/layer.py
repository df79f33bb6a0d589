"""A Mixture-of-Experts FFN: DeepSpeed's expert-parallel `MoE` with our gates and dispatch.

Shapes: B batch, S tokens, D model dim, F expert hidden dim, E experts, N = B*S flattened tokens.

Why DeepSpeed's layer: it creates the expert-parallel process groups (GShard, Lepikhin et al. 2020),
and DeepSpeed's engine, ZeRO optimizer and checkpointing know its parameters. We replace what it
lacks or does slowly: the gate (models/moe/gates.py: switch, gshard, noisy_topk) and, by default,
the dispatch (models/moe/dispatch.py). Things the rest of the system relies on:

- Expert parameters carry `allreduce = False` and `group_name = "ep_size_<n>"`: DeepSpeed reduces
  them over the expert-data-parallel group only. Optimizer param groups must be split with
  `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer`.
- Process groups for `ep_size > 1` are created by `deepspeed.initialize` (it calls
  `set_deepspeed_parallelism` on every `MoE`), not here. With `ep_size == 1` the layer runs on one
  device without `torch.distributed`; with `ep_size > 1` it must not be called before
  `deepspeed.initialize`.
- Parameter names contain `.deepspeed_moe.experts.deepspeed_experts.<i>.`: DeepSpeed's checkpoint
  code saves one file per global expert (`layer_<l>_expert_<ep_rank * L + i>_...`) and loads the
  right ones on each expert-parallel rank by that string. Gate parameters (`.deepspeed_moe.gate.wg`,
  `.gate.w_noise`) hold no "expert" in their names, so they are ordinary data-parallel weights.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from models.ffn import FeedForward, ffn_size
from models.moe.config import MoEConfig
from models.moe.dispatch import DISPATCHES
from models.moe.gates import MOE_GATES, Gate
from models.moe.stats import MoEStats, ReportsMoEStats
from models.recompute import recomputing


def cpu_accelerator_unless_cuda() -> None:
    """Before DeepSpeed's first import outside a training worker (mmpt plan, generate, export): name
    the CPU accelerator when there is no GPU, or DeepSpeed's detection logs a warning to the user's
    terminal. A DS_ACCELERATOR already set is kept."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


class MoEFFN(ReportsMoEStats, nn.Module):
    """`forward(x_BSD, mask_BS) -> (y_BSD, aux, counts_E)`.

    - Tokens where `mask_BS` is 0 (padding) are never routed: they take no expert capacity, appear
      in no count, and their output is 0 (the residual connection carries them through).
    - Routes over an expert's capacity are dropped (Switch §2.2): no output from that expert.
    - `counts_E` (long [E]) is the number of routes each expert processed, after capacity.
    - `aux` is the layer's total auxiliary loss, already weighted: `moe.aux_loss_weight` * the gate's
      balancing loss + `moe.z_loss_weight` * router z-loss. Add it to the training loss as is.
    - `last_stats` holds the detached stats of the latest forward (models/moe/stats.py).
    """

    def __init__(
        self,
        hidden_size: int,
        moe: MoEConfig,
        expert_hidden_size: int | None = None,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if not moe.enabled:
            raise ValueError("MoEFFN needs moe.num_experts > 0")
        cpu_accelerator_unless_cuda()
        from models.deepspeed_import import import_deepspeed

        import_deepspeed()  # lazily (slow, and it must see DS_ACCELERATOR), without what mmpt never uses
        from deepspeed.moe.layer import MoE

        width = expert_hidden_size or moe.expert_hidden_size or ffn_size(hidden_size, mlp_ratio)
        self.num_experts = moe.num_experts
        # DeepSpeed deep-copies the expert module into each local expert; the model's weight init
        # re-draws every copy so the experts do not start identical. Its own TopKGate is replaced.
        self.moe = MoE(hidden_size=hidden_size, expert=FeedForward(hidden_size, width),
                       num_experts=moe.num_experts, ep_size=moe.ep_size, k=1, min_capacity=0)
        DISPATCHES[moe.dispatch](self.moe, MOE_GATES[moe.gate](hidden_size, moe))

    @property
    def gate(self) -> Gate:
        # Not a second registered submodule: that would put the router twice in the state dict.
        return self.moe.deepspeed_moe.gate

    def forward(self, x_BSD: Tensor, mask_BS: Tensor, modality: int | Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """`modality`: the tokens' modality for the stats (stats.TEXT / IMAGE, or long [S] per
        position); None = not known."""
        used_N = mask_BS.reshape(-1).bool()  # DeepSpeed flattens x to [N, D] in the same row order
        self.gate.last_routing = None
        y_BSD, _, _ = self.moe(x_BSD, used_N)
        r = self.gate.last_routing
        if r is None:
            raise RuntimeError("the MoE gate did not run: DeepSpeed's MoE no longer calls deepspeed_moe.gate")
        self.gate.last_routing = None
        if recomputing():  # activation checkpointing's second forward: already counted
            return y_BSD, r.aux, r.counts_E
        self.record_stats(MoEStats.of(r, _per_token(modality, x_BSD.shape[:2], x_BSD.device)), self.training)
        return y_BSD, r.aux, r.counts_E


def _per_token(modality: int | Tensor | None, shape: tuple[int, int], device: torch.device) -> Tensor | None:
    """long [B*S] modality of each flattened token, from one code or a [S] per-position code."""
    if modality is None:
        return None
    B, S = shape
    if isinstance(modality, int):
        return torch.full((B * S,), modality, dtype=torch.long, device=device)
    return modality.to(device=device, dtype=torch.long).expand(B, S).reshape(-1)
