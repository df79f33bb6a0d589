"""Single-device PyTorch models for image-text pretraining (no Ray here, ever).

Build a model with `build_pretrainer(model_cfg, moe_cfg, objectives, text_spec, image_spec)`.
"""

from models.factory import build_pretrainer
from models.objectives import OBJECTIVES
from models.presets import PRESETS
from models.pretrainer import Pretrainer
from models.weights import count_parameters

__all__ = ["OBJECTIVES", "PRESETS", "Pretrainer", "build_pretrainer", "count_parameters"]
