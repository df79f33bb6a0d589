"""The encoder families and visual inputs: each declared once, with what it takes and what it builds.

Shapes: none (configuration only; no torch here, so the config schema can consult it).

A family (torchtitan's `ModelSpec`, one per model folder) says which optional `ModelConfig` fields
and sections it reads (setting another one is a "does not fit" error), how `num_layers` splits
into its stacks, how deep its FFN indices go (MoE placement, `moe.layers`), and which encoder
class builds it (imported on first use: the class needs torch). The encoder class declares the
outputs it can provide (`CAN_PROVIDE`, models/encoders/base.py), which the objectives' `requires`
are checked against. `FAMILIES` lists them explicitly: nothing registers itself on import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, NamedTuple, Protocol

# How the encoder combines the modalities (the entries of FAMILIES below).
Family = Literal["single", "interaction", "coattention", "cross", "dual", "dvae", "dalle"]
# What a visual token is (models/visual.py): an image patch, an object region, a CNN grid cell.
VisualKind = Literal["patch", "region", "pixel"]
# Where region features come from: pooled pixels of the box crop, a small conv stem trained with
# the model, or precomputed detector features read from the shards (BUTD-style).
RegionSource = Literal["crop_pool", "conv_stem", "precomputed"]

# Which optional fields each visual input uses.
VISUAL_FIELDS: Mapping[str, frozenset[str]] = MappingProxyType({
    "patch": frozenset(),
    "region": frozenset({"region_source", "region_pool", "region_feature_size", "mask_pixels"}),
    "pixel": frozenset({"pixel_channels", "pixel_sample"}),
})


class LayerFields(Protocol):
    """The depth fields of a model config (models/config.py ModelConfig) a family splits."""

    num_layers: int
    text_layers: int | None
    visual_layers: int | None
    cross_layers: int | None


class Layers(NamedTuple):
    """Layer counts per stack: `joint` single-stream layers, `text` / `visual` modality-only layers,
    `cross` co-attention or cross-modality blocks."""

    joint: int
    text: int
    visual: int
    cross: int


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


@dataclass(frozen=True)
class FamilySpec:
    """One encoder family: what it takes and what it builds."""

    name: Family
    title: str  # how `mmpt models list` names it
    encoder: str  # "module:Class" of the encoder that builds it
    split: Callable[[LayerFields], Layers]  # num_layers (and explicit overrides) -> stacks, per its paper
    depth: Callable[[Layers], int]  # one past the deepest FFN index (models/encoders/*: `ffn_index`)
    fields: frozenset[str] = frozenset()  # optional ModelConfig fields it reads
    sections: frozenset[str] = frozenset()  # ModelConfig sections only it reads (model.dvae, model.dalle)

    def encoder_class(self) -> type:
        """The models.encoders.base.Encoder subclass (not imported here: this module stays torch-free and
        below the encoders, which import the config that imports it)."""
        module, _, cls = self.encoder.partition(":")
        return getattr(importlib.import_module(module), cls)


def _interaction(cfg: LayerFields) -> Layers:
    # InterBERT: a single-stream interaction module, then one extraction stream per modality.
    text = _or(cfg.text_layers, max(1, cfg.num_layers // 3))
    return Layers(max(1, cfg.num_layers - text), text, _or(cfg.visual_layers, text), 0)


def _coattention(cfg: LayerFields) -> Layers:
    # ViLBERT: BERT's text layers, the later half of them paired with co-attention blocks.
    text = _or(cfg.text_layers, cfg.num_layers // 2)
    return Layers(0, text, 0, _or(cfg.cross_layers, max(1, cfg.num_layers - text)))


def _cross(cfg: LayerFields) -> Layers:
    # LXMERT: 9 language, 5 object-relationship, 5 cross-modality layers (5/14 of the text path).
    cross = _or(cfg.cross_layers, max(1, 5 * cfg.num_layers // 14))
    return Layers(0, _or(cfg.text_layers, max(1, cfg.num_layers - cross)), _or(cfg.visual_layers, cross), cross)


FAMILIES: Mapping[str, FamilySpec] = MappingProxyType({f.name: f for f in (
    # one transformer over [text; visual] tokens (VisualBERT, UNITER, ViLT, ...)
    FamilySpec("single", "single-stream", "models.encoders.single_stream:SingleStreamEncoder",
               split=lambda cfg: Layers(cfg.num_layers, 0, 0, 0), depth=lambda n: n.joint,
               fields=frozenset({"object_tags", "embed_dim"})),
    # single-stream layers, then one stream per modality (InterBERT)
    FamilySpec("interaction", "single→two-stream", "models.encoders.single_stream:InteractionEncoder",
               split=_interaction, depth=lambda n: n.joint + max(n.text, n.visual),
               fields=frozenset({"text_layers", "visual_layers", "embed_dim"})),
    # text-only layers, then co-attention blocks between two streams, two FFNs each (ViLBERT)
    FamilySpec("coattention", "co-attention", "models.encoders.co_attention:CoAttentionEncoder",
               split=_coattention, depth=lambda n: n.text + 2 * n.cross,
               fields=frozenset({"text_layers", "cross_layers"})),
    # language + object encoders, then cross-modality layers (LXMERT)
    FamilySpec("cross", "cross-modality", "models.encoders.cross:CrossModalityEncoder",
               split=_cross, depth=lambda n: max(n.text, n.visual) + n.cross,
               fields=frozenset({"text_layers", "visual_layers", "cross_layers"})),
    # two separate towers meeting only in a contrastive loss, each num_layers deep unless set (CLIP)
    FamilySpec("dual", "dual encoder", "models.encoders.clip:DualEncoder",
               split=lambda cfg: Layers(0, cfg.text_layers or cfg.num_layers, cfg.visual_layers or cfg.num_layers, 0),
               depth=lambda n: max(n.text, n.visual), fields=frozenset({"text_layers", "visual_layers", "embed_dim"})),
    # a discrete VAE, no transformer: image -> grid of codebook tokens -> image (DALL-E stage 1)
    FamilySpec("dvae", "discrete VAE", "models.encoders.dvae:DVAEEncoder",
               split=lambda cfg: Layers(0, 0, 0, 0), depth=lambda n: 0, sections=frozenset({"dvae"})),
    # one causal decoder over [text tokens; dVAE image tokens] (DALL-E stage 2)
    FamilySpec("dalle", "causal decoder", "models.encoders.dalle:DalleDecoder",
               split=lambda cfg: Layers(cfg.num_layers, 0, 0, 0), depth=lambda n: n.joint,
               sections=frozenset({"dvae", "dalle"})),
)})

# Every optional block field some family or visual input reads.
OPTIONAL_FIELDS = frozenset().union(*(f.fields for f in FAMILIES.values()), *VISUAL_FIELDS.values())

__all__ = ["FAMILIES", "OPTIONAL_FIELDS", "VISUAL_FIELDS", "Family", "FamilySpec", "LayerFields", "Layers",
           "RegionSource", "VisualKind"]
