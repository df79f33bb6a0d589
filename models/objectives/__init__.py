"""Pretraining objectives and the input views they consume, as registries keyed by name."""

from models.objectives.base import IGNORE_INDEX, Objective, ObjectiveContext, View
from models.objectives.captioning import Captioning, caption_view
from models.objectives.contrastive import ImageTextContrastive, clean_view
from models.objectives.masked import MaskedLanguageModeling, mask_tokens, masked_text_view
from models.objectives.matching import ImageTextMatching, itm_pairs_view

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (MaskedLanguageModeling, ImageTextMatching, ImageTextContrastive, Captioning)
}

VIEWS: dict[str, View] = {
    "masked_text": masked_text_view,
    "itm_pairs": itm_pairs_view,
    "clean": clean_view,
    "caption": caption_view,
}

__all__ = [
    "IGNORE_INDEX",
    "Captioning",
    "ImageTextContrastive",
    "OBJECTIVES",
    "VIEWS",
    "ImageTextMatching",
    "MaskedLanguageModeling",
    "Objective",
    "ObjectiveContext",
    "View",
    "caption_view",
    "clean_view",
    "itm_pairs_view",
    "mask_tokens",
    "masked_text_view",
]
