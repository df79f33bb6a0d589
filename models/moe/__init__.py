"""Mixture-of-Experts FFNs (DeepSpeed's expert-parallel layer) and the registry of routing gates."""

from models.moe.gates import MOE_GATES, NOISY_GATE_POLICIES
from models.moe.layer import MoEFFN

__all__ = ["MOE_GATES", "NOISY_GATE_POLICIES", "MoEFFN"]
