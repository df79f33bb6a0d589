"""The `moe` section of a run config: routing, experts, capacity, auxiliary losses."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models._schema import _Strict


class MoEConfig(_Strict):
    """Mixture-of-Experts FFNs. `num_experts: 0` means a dense model."""

    num_experts: int = Field(0, ge=0, description="experts per MoE layer; 0 = dense model")
    ep_size: int = Field(1, ge=1, description="expert-parallel group size (workers the experts are split over)")
    gate: Literal["switch"] = Field("switch", description="routing: switch = top-1 with capacity factor")
    capacity_factor: float = Field(1.25, gt=0, description="expert capacity = factor * tokens / experts (train)")
    eval_capacity_factor: float = Field(2.0, gt=0, description="capacity factor at evaluation")
    min_capacity: int = Field(4, ge=0, description="lower bound on expert capacity")
    layers: Literal["all", "every_other"] = Field(
        "every_other", description="which FFNs are MoE: every layer, or every other one (GShard)"
    )
    expert_hidden_size: int | None = Field(None, ge=1, description="expert FFN width; default: the dense FFN's")
    aux_loss_weight: float = Field(0.01, ge=0, description="weight of the load-balancing loss")
    noisy_gate_policy: Literal["none", "jitter", "rsample"] = Field(
        "none", description="router noise: Switch's multiplicative jitter, or Gumbel resampling"
    )

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        """Whether transformer layer `index` (0-based) gets a MoE FFN.

        `every_other` puts experts in the odd layers (1, 3, ...), as GShard and Switch do, so the
        first layer always has a dense FFN.
        """
        if not self.enabled:
            return False
        return self.layers == "all" or index % 2 == 1

    @model_validator(mode="after")
    def _experts_divide(self) -> MoEConfig:
        if self.enabled and self.num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}; "
                "each expert-parallel rank must hold the same number of experts"
            )
        return self
