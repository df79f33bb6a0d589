"""The `moe` section of a run config: routing, experts, capacity, auxiliary losses.

Gates (see models/moe/gates.py for the papers):
    switch      top-1, Switch Transformer (Fedus et al. 2021)
    gshard      top-2 with random second-expert routing, GShard (Lepikhin et al. 2020)
    noisy_topk  noisy top-k, sparsely-gated MoE (Shazeer et al. 2017); `top_k` experts per token
    expert_choice  each expert takes its top tokens (Zhou et al. 2022); capacity_factor = experts per
                token on average
    aux_free    top-k on sigmoid scores + a per-expert balancing bias, no aux loss (DeepSeek-V3)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from models.schema import Strict

GateName = Literal["switch", "gshard", "noisy_topk", "expert_choice", "aux_free"]

# Experts per token that a gate fixes; noisy_topk and aux_free take `top_k` (defaults below).
# expert_choice has no per-token k (experts choose): 1 here, capacity_factor routes per token on average.
_FIXED_K: dict[str, int] = {"switch": 1, "gshard": 2, "expert_choice": 1}
_DEFAULT_K = {"noisy_topk": 2, "aux_free": 1}


class MoEConfig(Strict):
    """Mixture-of-Experts FFNs. `num_experts: 0` means a dense model."""

    num_experts: int = Field(0, ge=0, le=4096, description="experts per MoE layer; 0 = dense model")
    ep_size: int = Field(1, ge=1, description="expert-parallel group size (workers the experts are split over)")
    gate: GateName = Field("switch", description="routing: switch (top-1), gshard (top-2), noisy_topk (top-k)")
    top_k: int | None = Field(
        None, ge=1, description="experts per token for gate=noisy_topk (default 2) and aux_free (default 1); "
        "switch is 1, gshard 2"
    )
    dropless: bool = Field(False, description="no expert capacity: every routed token is computed, none dropped")
    capacity_factor: float = Field(
        1.25, gt=0, le=64, description="expert capacity = factor * top_k * tokens / experts (training)"
    )
    eval_capacity_factor: float = Field(2.0, gt=0, le=64, description="capacity factor at evaluation")
    min_capacity: int = Field(4, ge=0, description="lower bound on expert capacity")
    drop_policy: Literal["random", "position", "priority"] = Field(
        "random",
        description="which over-capacity routes are dropped: random (DeepSpeed's random token selection), "
        "position (later tokens first, Switch/Mesh TF), priority (lowest gate first, V-MoE's BPR)",
    )
    second_expert_policy: Literal["random", "all"] = Field(
        "random",
        description="gshard: dispatch the 2nd expert with probability 2*gate (GShard), or always",
    )
    layers: Literal["all", "every_other"] | list[int] = Field(
        "every_other",
        description="which FFNs are MoE: all, every_other (GShard: layers 1, 3, ...), or a list of layer indices",
    )
    expert_hidden_size: int | None = Field(None, ge=1, description="expert FFN width; default: the dense FFN's")
    aux_loss_weight: float = Field(
        0.01, ge=0, le=100,
        description="weight of the balancing loss (switch/gshard: Switch/GShard aux loss; "
        "noisy_topk: importance + load loss, Shazeer used 0.1)",
    )
    z_loss_weight: float = Field(
        0.0, ge=0, le=100, description="weight of the router z-loss (ST-MoE, Zoph et al. 2022, used 1e-3)"
    )
    noisy_gate_policy: Literal["none", "jitter", "rsample"] = Field(
        "none",
        description="router noise for switch/gshard: multiplicative jitter on the router input (Switch), "
        "or Gumbel-perturbed top-1 choice (rsample, switch only)",
    )
    router_jitter: float = Field(
        0.01, ge=0, lt=1, description="jitter epsilon: router input multiplied by U(1-eps, 1+eps) in training"
    )
    noise_epsilon: float = Field(
        0.01, ge=0, le=10, description="noisy_topk: floor added to the learned noise std softplus(x W_noise)"
    )
    bias_update_rate: float = Field(
        1e-3, ge=0, le=1,
        description="aux_free: step of the per-expert balancing bias per training forward (DeepSeek-V3: 0.001)",
    )
    dispatch: Literal["indexed", "deepspeed"] = Field(
        "indexed",
        description="token dispatch: indexed (sort by expert, compute routed tokens only) or deepspeed "
        "(DeepSpeed's capacity-padded buffers)",
    )

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @property
    def k(self) -> int:
        """Experts each token is routed to."""
        if self.gate in _FIXED_K:
            return _FIXED_K[self.gate]
        return self.top_k or _DEFAULT_K[self.gate]

    def is_moe_layer(self, index: int) -> bool:
        """Whether transformer layer `index` (0-based) gets a MoE FFN.

        `every_other` puts experts in the odd layers (1, 3, ...), as GShard and Switch do, so the
        first layer always has a dense FFN.
        """
        if not self.enabled:
            return False
        if isinstance(self.layers, list):
            return index in self.layers
        return self.layers == "all" or index % 2 == 1

    def layer_problems(self, num_layers: int) -> list[tuple[str, Any, str]]:
        """Problems of `layers` against a model of `num_layers` layers, as (field, value, allowed)."""
        if not self.enabled:
            return []
        if isinstance(self.layers, list):
            bad = [i for i in self.layers if i >= num_layers]
            if bad:
                return [("moe.layers", self.layers,
                         f"indices must be below model.num_layers={num_layers} (got {bad})")]
            return []
        if not any(self.is_moe_layer(i) for i in range(num_layers)):
            return [("moe.layers", self.layers,
                     f"selects no layer of a {num_layers}-layer model; use 'all' or a list of indices")]
        return []

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_selection(cls, value: Any) -> Any:
        # One message instead of pydantic's one per union member.
        ok = value in ("all", "every_other") or (
            isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                            for i in value))
        if not ok:
            raise ValueError("must be 'all', 'every_other', or a list of layer indices (integers >= 0)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MoEConfig:
        problems = self._problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _problems(self) -> list[str]:
        out: list[str] = []
        if self.enabled and self.num_experts % self.ep_size != 0:
            out.append(f"num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}; "
                       "each expert-parallel rank must hold the same number of experts")
        if self.top_k is not None and self.gate == "expert_choice":
            out.append(f"top_k={self.top_k} does not apply to gate=expert_choice, where experts choose their "
                       "tokens; capacity_factor sets the experts per token on average")
        elif self.top_k is not None and self.gate in _FIXED_K and self.top_k != _FIXED_K[self.gate]:
            out.append(f"top_k={self.top_k} does not apply to gate={self.gate}, which routes to "
                       f"{_FIXED_K[self.gate]} expert(s); use gate=noisy_topk for another k")
        if self.enabled and self.gate == "gshard" and self.num_experts < 2:
            out.append(f"gate=gshard routes each token to 2 experts, so it needs num_experts >= 2 "
                       f"(got num_experts={self.num_experts})")
        if self.enabled and self.gate == "noisy_topk" and self.k >= self.num_experts:
            # Shazeer's load loss compares each expert with the (k+1)-th best one.
            out.append(f"gate=noisy_topk with top_k={self.k} needs num_experts > {self.k} "
                       f"(got num_experts={self.num_experts})")
        if self.gate == "expert_choice" and self.dropless:
            out.append("gate=expert_choice has a fixed capacity per expert (experts choose their tokens); "
                       "dropless does not apply: raise capacity_factor instead")
        if self.gate == "expert_choice" and self.dispatch != "indexed":
            out.append("gate=expert_choice needs dispatch=indexed (DeepSpeed's dispatch takes a fixed k per token)")
        if self.gate == "aux_free" and self.k > self.num_experts and self.enabled:
            out.append(f"gate=aux_free with top_k={self.k} needs num_experts >= {self.k}")
        if self.noisy_gate_policy == "rsample" and self.gate != "switch":
            out.append(f"noisy_gate_policy=rsample (Gumbel top-1) applies to gate=switch only, not gate={self.gate}")
        if self.noisy_gate_policy != "none" and self.gate == "noisy_topk":
            out.append(f"noisy_gate_policy={self.noisy_gate_policy} does not apply to gate=noisy_topk, "
                       "which has its own learned noise; use 'none'")
        if isinstance(self.layers, list):
            if not self.layers:
                out.append("layers=[] selects no layer; give indices, 'all', 'every_other', or num_experts=0")
            elif len(set(self.layers)) != len(self.layers):
                out.append(f"layers={self.layers} repeats an index; list each layer once")
        return out
