"""Single-device PyTorch models for image-text pretraining (no Ray here, ever).

Build a model with `build_pretrainer(model_cfg, moe_cfg, objectives, text_spec, image_spec)`.

The names below are imported on first use (PEP 562): `models.config` and the other torch-free
modules stay cheap to import for processes that never build a model (Ray Data's preprocessing
tasks, the CLI's config checks), which would otherwise pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models._lazy import lazy_attributes

_LAZY = {
    "build_pretrainer": "models.factory",
    "OBJECTIVES": "models.objectives",
    "PRESETS": "models.presets",
    "Pretrainer": "models.pretrainer",
    "count_parameters": "models.weights",
}

if TYPE_CHECKING:
    from models.factory import build_pretrainer
    from models.objectives import OBJECTIVES
    from models.presets import PRESETS
    from models.pretrainer import Pretrainer
    from models.weights import count_parameters


__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = ["OBJECTIVES", "PRESETS", "Pretrainer", "build_pretrainer", "count_parameters"]
