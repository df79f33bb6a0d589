"""Architecture presets named after their papers: each a choice of blocks + its paper's objectives.

Shapes: none (configuration only; no torch here, so the config schema can consult it).

A preset fixes the encoder family (models/families.py) and the visual inputs it takes, and
supplies defaults for the block fields of `ModelConfig` left at `None`; models/blocks.py
`resolve(cfg)` turns a config into the concrete `Blocks` the encoders are built from.

No detector can be trained or downloaded here, so where a paper feeds Faster R-CNN region features
(BUTD, Anderson et al. 2018) we take the regions from the scene boxes the shards carry and compute
their features from the image crops (models/visual.py); real BUTD features can be read from the
shards instead (`region_source: precomputed`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from models.families import Family, RegionSource, VisualKind


@dataclass(frozen=True)
class Preset:
    """A named configuration of blocks. `objectives` are the paper's pretraining tasks under our
    objective names; `default_objectives` keeps those that exist in this build (others arrive with
    the objectives that implement them)."""

    name: str
    paper: str
    family: Family
    visual_inputs: tuple[VisualKind, ...]  # allowed; the first is the default
    objectives: Mapping[str, float]
    doc: str
    region_source: RegionSource = "crop_pool"
    object_tags: bool = False
    mask_pixels: bool = False  # masked regions zero their box's pixels (VL-BERT); pixel-computed regions only

    def default_objectives(self, known: Collection[str]) -> dict[str, float]:
        """The paper's objectives that exist in `known` (the OBJECTIVES registry)."""
        return {name: w for name, w in self.objectives.items() if name in known}

    def pending_objectives(self, known: Collection[str]) -> list[str]:
        """The paper's objectives not implemented yet: left out of the defaults."""
        return [name for name in self.objectives if name not in known]


def get_preset(name: str) -> Preset:
    preset = PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return preset


def _objectives(**weights: float) -> Mapping[str, float]:
    return MappingProxyType(dict(weights))


_BUTD = ("Faster R-CNN (BUTD) region features are replaced by the scene boxes of the shards and "
         "RoIAlign-pooled pixels of each box (region_source: crop_pool), plus a whole-image region")

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="visualbert", paper="Li et al. 2019", family="single", visual_inputs=("region",),
        objectives=_objectives(mlm=1.0, itm=1.0),
        doc="VisualBERT (Li et al. 2019, 'VisualBERT: A Simple and Performant Baseline for Vision and "
            "Language'): one BERT over text tokens and region features with segment and position "
            "embeddings; masked language modelling with the image + sentence-image prediction (our itm). "
            f"{_BUTD}.",
    ),
    Preset(
        name="vilbert", paper="Lu et al. 2019", family="coattention", visual_inputs=("region",),
        objectives=_objectives(mlm=1.0, mrc_kl=1.0, itm=1.0),
        doc="ViLBERT (Lu et al. 2019, 'ViLBERT: Pretraining Task-Agnostic Visiolinguistic Representations "
            "for Vision-and-Language Tasks'): a text stream of BERT layers and a region stream, joined by "
            "co-attentional transformer blocks (each stream's queries attend to the other's keys and "
            "values); regions carry the 5-d box encoding; pooled = product of the text [CLS] and image "
            "summaries; masked multimodal modelling (MLM + KL to the detector's class distribution, our "
            f"mrc_kl) and multimodal alignment (itm). {_BUTD}; both streams share one hidden size "
            "(the paper's visual stream is 1024 wide).",
    ),
    Preset(
        name="lxmert", paper="Tan & Bansal 2019", family="cross", visual_inputs=("region",),
        objectives=_objectives(mlm=1.0, mrfr=1.0, moc=1.0, itm=1.0),
        doc="LXMERT (Tan & Bansal 2019, 'LXMERT: Learning Cross-Modality Encoder Representations from "
            "Transformers'): a language encoder, an object-relationship encoder, then cross-modality "
            "layers (cross-attention shared by both directions, self-attention, FFN per stream); MLM, "
            "RoI-feature regression (mrfr), detected-label classification (moc) and cross-modality "
            f"matching (itm); image QA is left out (no QA data here). {_BUTD}.",
    ),
    Preset(
        name="unicoder-vl", paper="Li et al. 2020a", family="single", visual_inputs=("region",),
        objectives=_objectives(mlm=1.0, moc=1.0, itm=1.0),
        doc="Unicoder-VL (Li et al. 2020, 'Unicoder-VL: A Universal Encoder for Vision and Language by "
            "Cross-modal Pre-training'): single-stream transformer over words and regions (box "
            "location features); MLM, masked object classification (moc) and visual-linguistic "
            f"matching (itm). {_BUTD}.",
    ),
    Preset(
        name="vl-bert", paper="Su et al. 2020", family="single", visual_inputs=("region",),
        region_source="conv_stem", mask_pixels=True,
        objectives=_objectives(mlm=1.0, mrc=1.0),
        doc="VL-BERT (Su et al. 2020, 'VL-BERT: Pre-training of Generic Visual-Linguistic "
            "Representations'): single-stream over words and RoIs, the Fast R-CNN feature extractor "
            "trained jointly with the transformer; MLM with visual clues and masked RoI classification "
            "with linguistic clues (mrc); no image-text matching (the paper found it hurt). The "
            "jointly-trained detector is a small conv stem over RoIAlign crops of the scene boxes "
            "(region_source: conv_stem); as in the paper (§3.2), a masked RoI's pixels are zeroed before "
            "the extractor sees the image (mask_pixels), so its feature cannot leak what was masked; "
            "the paper's whole-image feature added to every word is left out (the whole-image region "
            "token carries it).",
    ),
    Preset(
        name="uniter", paper="Chen et al. 2020", family="single", visual_inputs=("region",),
        objectives=_objectives(mlm=1.0, itm=1.0, mrfr=1.0, mrc_kl=1.0, wra=1.0),
        doc="UNITER (Chen et al. 2020, 'UNITER: UNiversal Image-TExt Representation Learning'): "
            "single-stream transformer; region embedding = feature and box location projected and "
            "summed; MLM and MRM conditioned on the full other modality, ITM, MRFR, MRC-kl and "
            f"word-region alignment by optimal transport (wra). {_BUTD}; ViLBERT's 5-d box encoding "
            "stands in for UNITER's 7-d one.",
    ),
    Preset(
        name="imagebert", paper="Qi et al. 2020", family="single", visual_inputs=("region",),
        objectives=_objectives(mlm=1.0, moc=1.0, mrfr=1.0, itm=1.0),
        doc="ImageBERT (Qi et al. 2020, 'ImageBERT: Cross-modal Pre-training with Large-scale "
            "Weak-supervised Image-Text Data'): single-stream over words and RoIs with 5-d location "
            "embeddings; MLM, masked object classification (moc), masked region feature regression "
            f"(mrfr) and ITM. {_BUTD}; the paper's LAIT web corpus is the shapes world.",
    ),
    Preset(
        name="pixel-bert", paper="Huang et al. 2020", family="single", visual_inputs=("pixel",),
        objectives=_objectives(mlm=1.0, itm=1.0),
        doc="Pixel-BERT (Huang et al. 2020, 'Pixel-BERT: Aligning Image Pixels with Text by Deep "
            "Multi-Modal Transformers'): a CNN's feature-map cells are the visual tokens, trained end "
            "to end, with a random subset of them kept during pretraining (pixel_sample); MLM + ITM. "
            "The ResNet backbone is a small strided CNN (one stride-2 conv per halving of patch_size), "
            "and grid cells get learned 2-d position embeddings.",
    ),
    Preset(
        name="oscar", paper="Li et al. 2020b", family="single", visual_inputs=("region",),
        object_tags=True,
        objectives=_objectives(mlm=1.0, itm=1.0),
        doc="Oscar (Li et al. 2020, 'Oscar: Object-Semantics Aligned Pre-training for Vision-Language "
            "Tasks'): single-stream over (words, object tags, regions); the detected object tags anchor "
            "the alignment; masked token loss + contrastive loss on polluted (image, tags) pairs, "
            f"which our itm (swapped images and their tags) stands in for. {_BUTD}; tags are the "
            "scene's object classes, embedded by their own table (not the tag words' embeddings).",
    ),
    Preset(
        name="interbert", paper="Lin et al. 2020", family="interaction", visual_inputs=("region",),
        objectives=_objectives(mlm=1.0, mrc=1.0, itm=1.0),
        doc="InterBERT (Lin et al. 2020, 'InterBERT: Vision-and-Language Interaction for Multi-modal "
            "Pretraining'): a single-stream interaction module (all-attention) followed by a two-stream "
            "extraction module (one transformer per modality); masked segment modelling (mlm), masked "
            f"group modelling (mrc) and ITM with hard negatives (itm). {_BUTD}; the depth split is "
            "num_layers - text_layers joint layers, then text_layers/visual_layers per stream.",
    ),
    Preset(
        name="vilt", paper="Kim et al. 2021", family="single", visual_inputs=("patch",),
        objectives=_objectives(mlm=1.0, itm=1.0, wpa=1.0),
        doc="ViLT (Kim et al. 2021, 'ViLT: Vision-and-Language Transformer Without Convolution or Region "
            "Supervision'): single-stream transformer over text tokens and linearly projected image "
            "patches; MLM, ITM and word-patch alignment (wpa). Nothing substituted.",
    ),
    Preset(
        name="clip", paper="Radford et al. 2021", family="dual", visual_inputs=("patch", "pixel"),
        objectives=_objectives(itc=1.0),
        doc="CLIP (Radford et al. 2021, 'Learning Transferable Visual Models From Natural Language "
            "Supervision'): a causal text transformer (features at the end-of-text token) and a ViT "
            "image tower (class token), linearly projected, L2-normalised, compared with a learnable "
            "temperature initialised to 1/0.07 in a symmetric contrastive loss (itc). Pixel input stands "
            "in for CLIP's ResNet towers.",
    ),
    Preset(
        name="unimo", paper="Li et al. 2021", family="single", visual_inputs=("region",),
        objectives=_objectives(mlm=1.0, caption=1.0, mrfr=1.0, mrc=1.0, cmcl=1.0),
        doc="UNIMO (Li et al. 2021, 'UNIMO: Towards Unified-Modal Understanding and Generation via "
            "Cross-Modal Contrastive Learning'): one unified transformer for understanding (bidirectional "
            "MLM, masked region modelling) and generation (seq2seq: the caption attends causally to "
            "itself and fully to the image, the image never to the caption; our caption objective), "
            f"plus cross-modal contrastive learning (cmcl). {_BUTD}; no text-only or image-only corpora.",
    ),
    Preset(
        name="dvae", paper="Ramesh et al. 2021", family="dvae", visual_inputs=("patch",),
        objectives=_objectives(dvae=1.0),
        doc="DALL-E stage 1 (Ramesh et al. 2021, 'Zero-Shot Text-to-Image Generation', §2.1): a discrete "
            "VAE whose conv encoder gives each cell of an (image/downsample)^2 grid logits over a codebook of "
            "K entries; training samples the cells with the Gumbel-softmax relaxation (temperature "
            "annealed by a cosine from 1 to 1/16), the decoder reads the mixed codebook vectors, loss = "
            "reconstruction + beta * KL(q || uniform prior). Evaluation encodes with argmax (the tokens "
            "stage 2 sees). MSE stands in for the paper's logit-Laplace likelihood, and a small conv net "
            "with residual blocks for its ResNet; model.dvae sizes it.",
    ),
    Preset(
        name="dalle", paper="Ramesh et al. 2021", family="dalle", visual_inputs=("patch",),
        objectives=_objectives(dalle=1.0),
        doc="DALL-E stage 2 (Ramesh et al. 2021, §2.2): one decoder-only transformer over [caption tokens; "
            "image tokens of a frozen dVAE checkpoint (model.dalle.dvae)], every token attending causally "
            "to all before it; text and image cross-entropy weighted 1/8 : 7/8 as in the paper. Padded "
            "caption positions stay in the sequence, each with its own position embedding (the paper's "
            "per-position padding tokens); image tokens get row and column embeddings. Separate text and "
            "image output heads stand in for the paper's one logit layer over both vocabularies. "
            "`mmpt generate` samples (top-k, temperature) and reranks with a CLIP run.",
    ),
)}

__all__ = ["PRESETS", "Preset", "get_preset"]
