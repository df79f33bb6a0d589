"""Routing choices: gate name -> builder of a DeepSpeed MoE layer with that gate.

Shapes: D model dim, E experts.

DeepSpeed's `MoE` owns gate, dispatch and experts together, so a "gate" here is a builder of the
whole DeepSpeed layer configured for that routing. Later gates (GShard top-2, noisy top-k) plug in as
new entries; `MoEFFN` never branches on the name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from models.moe.config import MoEConfig

if TYPE_CHECKING:  # deepspeed is imported lazily: at import time it is slow and breaks in Ray workers
    from deepspeed.moe.layer import MoE

# config spelling -> DeepSpeed spelling of TopKGate's `noisy_gate_policy`.
NOISY_GATE_POLICIES: dict[str, str | None] = {"none": None, "jitter": "Jitter", "rsample": "RSample"}

GateBuilder = Callable[[int, nn.Module, MoEConfig], "MoE"]


def _switch(hidden_size: int, expert: nn.Module, moe: MoEConfig) -> MoE:
    """Switch Transformer routing (Fedus et al. 2021): top-1, fixed capacity, overflow dropped.

    DeepSpeed computes the router in fp32 whatever the model dtype (Switch §2.4 "selective
    precision"), picks capacity = max(ceil(tokens / E * factor), min_capacity), and with
    `use_rts` (its default) chooses which over-capacity tokens to drop at random rather than by
    position, so late tokens in a sequence are not systematically dropped.
    """
    from deepspeed.moe.layer import MoE

    return MoE(
        hidden_size=hidden_size,
        expert=expert,
        num_experts=moe.num_experts,
        ep_size=moe.ep_size,
        k=1,
        capacity_factor=moe.capacity_factor,
        eval_capacity_factor=moe.eval_capacity_factor,
        min_capacity=moe.min_capacity,
        noisy_gate_policy=NOISY_GATE_POLICIES[moe.noisy_gate_policy],
        drop_tokens=True,
    )


MOE_GATES: dict[str, GateBuilder] = {"switch": _switch}
