"""Mixture-of-Experts FFNs (DeepSpeed's expert-parallel layer), their gates, dispatch and stats.

Imported lazily (PEP 562) like the `models` package: `models.moe.config` is torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models._lazy import lazy_attributes

_LAZY = {
    "DISPATCHES": "models.moe.dispatch",
    "MOE_GATES": "models.moe.gates",
    "MoEFFN": "models.moe.layer",
    "MoEStats": "models.moe.stats",
    "collect_stats": "models.moe.stats",
}

if TYPE_CHECKING:
    from models.moe.dispatch import DISPATCHES
    from models.moe.gates import MOE_GATES
    from models.moe.layer import MoEFFN
    from models.moe.stats import MoEStats, collect_stats


__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = ["DISPATCHES", "MOE_GATES", "MoEFFN", "MoEStats", "collect_stats"]
