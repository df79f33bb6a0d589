"""A Mixture-of-Experts FFN: DeepSpeed's expert-parallel `MoE` behind the interface of a dense FFN.

Shapes: B batch, S tokens, D model dim, F expert hidden dim, E experts, N = B*S flattened tokens.

Why DeepSpeed's layer: it does the all-to-all dispatch for expert parallelism (GShard, Lepikhin et
al. 2020) and DeepSpeed's engine, optimizer and checkpointing know its parameters. Things the rest
of the system relies on:

- Expert parameters carry `allreduce = False` and `group_name = "ep_size_<n>"`: DeepSpeed reduces
  them over the expert-data-parallel group only. Optimizer param groups must be split with
  `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer` (the engine does it
  when it builds the optimizer from a config).
- Process groups for `ep_size > 1` are created by `deepspeed.initialize` (it calls
  `set_deepspeed_parallelism` on every module that has it), not here. With `ep_size == 1` the layer
  runs on one device without `torch.distributed`; with `ep_size > 1` it must not be called before
  `deepspeed.initialize`.
- Parameter names contain `.deepspeed_moe.experts.deepspeed_experts.<i>.`: DeepSpeed's checkpoint
  code finds expert weights by that string, so the DeepSpeed module is kept as is (not renamed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from models.ffn import FeedForward, ffn_size
from models.moe.config import MoEConfig
from models.moe.gates import MOE_GATES


class MoEFFN(nn.Module):
    """`forward(x_BSD, mask_BS) -> (y_BSD, aux_loss, counts_E)`.

    - Tokens where `mask_BS` is 0 (padding) are never routed: they take no expert capacity, appear
      in no count, and their output is 0 (the residual connection carries them through).
    - Tokens over an expert's capacity are dropped (Switch §2.2): output 0, residual only.
    - `counts_E` is the number of tokens each expert actually processed, after capacity. DeepSpeed's
      own `exp_counts` is taken before the capacity cut; we read the post-capacity routes instead.
    - `aux_loss` is Switch's load-balancing loss E * sum_e f_e * P_e (Switch eq. 4), already
      multiplied by `moe.aux_loss_weight`: the layer owns its auxiliary terms and their weights.
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
        width = expert_hidden_size or moe.expert_hidden_size or ffn_size(hidden_size, mlp_ratio)
        self.num_experts = moe.num_experts
        self.aux_loss_weight = moe.aux_loss_weight
        # DeepSpeed deep-copies this module into every expert; the model's weight init re-draws
        # each copy so the experts do not start identical.
        self.moe = MOE_GATES[moe.gate](hidden_size, FeedForward(hidden_size, width), moe)
        self._routes: Tensor | None = None
        self.moe.deepspeed_moe.gate.register_forward_hook(self._record_routes)

    def _record_routes(self, module: nn.Module, args: Any, output: Any) -> None:
        # MOELayer asks its gate for sparse routes: (l_aux, capacity, E, indices_KN, locations_KN,
        # gates_KN, exp_counts), where a route that was not used (padding) or was cut by the
        # capacity limit has expert index -1.
        if not (isinstance(output, tuple) and len(output) == 7):
            raise RuntimeError(
                "unexpected DeepSpeed TopKGate output; MoEFFN reads its sparse routes "
                "(written against deepspeed 0.19 sharded_moe.MOELayer)"
            )
        self._routes = output[3].detach()

    def forward(self, x_BSD: Tensor, mask_BS: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # DeepSpeed flattens x to [N, D] and multiplies the one-hot routing [N, E] by used_token [N]
        # ("s,se->se"), so the mask must be flat, in the same row order, and integer like the one-hot.
        used_N = mask_BS.reshape(-1).to(torch.long)
        self._routes = None
        y_BSD, aux, _ = self.moe(x_BSD, used_N)
        assert self._routes is not None
        routes = self._routes.reshape(-1).long()
        self._routes = None
        counts_E = torch.bincount(routes[routes >= 0], minlength=self.num_experts)
        return y_BSD, self.aux_loss_weight * aux, counts_E
