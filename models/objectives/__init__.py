"""Pretraining objectives and the input views they consume, as registries keyed by name."""

from models.objectives.alignment import WordPatchAlignment, WordRegionAlignment
from models.objectives.base import IGNORE_INDEX, Objective, ObjectiveContext, View
from models.objectives.captioning import Captioning, caption_view
from models.objectives.contrastive import ImageTextContrastive, clean_view
from models.objectives.dalle import DalleLoss
from models.objectives.dvae import DVAELoss
from models.objectives.masked import (
    MaskedLanguageModeling,
    MaskedSegmentModeling,
    WholeWordMasking,
    mask_tokens,
    mask_words,
    masked_segments_view,
    masked_text_view,
    masked_words_view,
)
from models.objectives.matching import (
    ImageTextMatching,
    ImageTextMatchingHard,
    itm_hard_pairs_view,
    itm_pairs_view,
)
from models.objectives.region import (
    MaskedObjectClassification,
    MaskedRegionClassification,
    MaskedRegionClassificationKL,
    MaskedRegionFeatureRegression,
    masked_regions_view,
)
from models.objectives.scene_graph import SceneGraphPrediction, scene_graph_view

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        MaskedLanguageModeling,
        MaskedSegmentModeling,
        WholeWordMasking,
        SceneGraphPrediction,
        ImageTextMatching,
        ImageTextMatchingHard,
        ImageTextContrastive,
        Captioning,
        MaskedRegionFeatureRegression,
        MaskedRegionClassification,
        MaskedObjectClassification,
        MaskedRegionClassificationKL,
        WordRegionAlignment,
        WordPatchAlignment,
        DVAELoss,
        DalleLoss,
    )
}

VIEWS: dict[str, View] = {
    "masked_text": masked_text_view,
    "masked_segments": masked_segments_view,
    "masked_words": masked_words_view,
    "scene_graph": scene_graph_view,
    "itm_pairs": itm_pairs_view,
    "itm_hard_pairs": itm_hard_pairs_view,
    "clean": clean_view,
    "caption": caption_view,
    "masked_regions": masked_regions_view,
}
# Views that draw a [B, P] visual mask and so need NUM_VISUAL_TOKENS in their batch (the pretrainer adds it).
VISUAL_MASK_VIEWS: frozenset[str] = frozenset({"masked_regions"})

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "VIEWS",
    "VISUAL_MASK_VIEWS",
    "Captioning",
    "DVAELoss",
    "DalleLoss",
    "ImageTextContrastive",
    "ImageTextMatching",
    "ImageTextMatchingHard",
    "MaskedLanguageModeling",
    "MaskedObjectClassification",
    "MaskedRegionClassification",
    "MaskedRegionClassificationKL",
    "MaskedRegionFeatureRegression",
    "MaskedSegmentModeling",
    "Objective",
    "ObjectiveContext",
    "SceneGraphPrediction",
    "View",
    "WholeWordMasking",
    "WordPatchAlignment",
    "WordRegionAlignment",
    "caption_view",
    "clean_view",
    "itm_hard_pairs_view",
    "itm_pairs_view",
    "mask_tokens",
    "mask_words",
    "masked_segments_view",
    "masked_text_view",
    "masked_words_view",
    "scene_graph_view",
]
