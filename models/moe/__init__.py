"""Mixture-of-Experts FFNs (DeepSpeed's expert-parallel layer), their gates, dispatch and stats.

Imported lazily (PEP 562) like the `models` package: `models.moe.config` is torch-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'models.moe' has no attribute {name!r}")


__all__ = ["DISPATCHES", "MOE_GATES", "MoEFFN", "MoEStats", "collect_stats"]
