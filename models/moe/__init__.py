"""Mixture-of-Experts FFNs (DeepSpeed's expert-parallel layer), their gates, dispatch and stats."""

from models.moe.dispatch import DISPATCHES
from models.moe.gates import MOE_GATES
from models.moe.layer import MoEFFN
from models.moe.stats import MoEStats, collect_stats

__all__ = ["DISPATCHES", "MOE_GATES", "MoEFFN", "MoEStats", "collect_stats"]
