"""Pretraining objectives and the input views they consume, as registries keyed by name."""

from models.objectives.alignment import WordPatchAlignment, WordRegionAlignment
from models.objectives.base import IGNORE_INDEX, Objective, ObjectiveContext, View
from models.objectives.captioning import Captioning, caption_view
from models.objectives.contrastive import ImageTextContrastive, clean_view
from models.objectives.masked import (
    MaskedLanguageModeling,
    MaskedSegmentModeling,
    mask_tokens,
    masked_segments_view,
    masked_text_view,
)
from models.objectives.matching import ImageTextMatching, itm_pairs_view
from models.objectives.region import (
    MaskedObjectClassification,
    MaskedRegionClassification,
    MaskedRegionClassificationKL,
    MaskedRegionFeatureRegression,
    masked_regions_view,
)

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        MaskedLanguageModeling,
        MaskedSegmentModeling,
        ImageTextMatching,
        ImageTextContrastive,
        Captioning,
        MaskedRegionFeatureRegression,
        MaskedRegionClassification,
        MaskedObjectClassification,
        MaskedRegionClassificationKL,
        WordRegionAlignment,
        WordPatchAlignment,
    )
}

VIEWS: dict[str, View] = {
    "masked_text": masked_text_view,
    "masked_segments": masked_segments_view,
    "itm_pairs": itm_pairs_view,
    "clean": clean_view,
    "caption": caption_view,
    "masked_regions": masked_regions_view,
}

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "VIEWS",
    "Captioning",
    "ImageTextContrastive",
    "ImageTextMatching",
    "MaskedLanguageModeling",
    "MaskedObjectClassification",
    "MaskedRegionClassification",
    "MaskedRegionClassificationKL",
    "MaskedRegionFeatureRegression",
    "MaskedSegmentModeling",
    "Objective",
    "ObjectiveContext",
    "View",
    "WordPatchAlignment",
    "WordRegionAlignment",
    "caption_view",
    "clean_view",
    "itm_pairs_view",
    "mask_tokens",
    "masked_segments_view",
    "masked_text_view",
]
