"""A model config resolved against its preset: the concrete blocks the encoders are built from.

Shapes: none (configuration only; no torch here).

`resolve(cfg)` fills every block field of `ModelConfig` left at `None` from the preset
(models/presets.py) and its family (models/families.py): layer counts per stack, feature sizes.
`mmpt models list`, the MoE layer checks and the parameter-count tests read the result too.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import ModelConfig
from models.families import FAMILIES, Family, Layers, RegionSource, VisualKind
from models.presets import get_preset

# Defaults of the optional block fields (ModelConfig docs them).
REGION_POOL = 4
CONV_STEM_WIDTH = 64
PIXEL_CHANNELS = 64
PIXEL_SAMPLE = 0.5


@dataclass(frozen=True)
class Blocks:
    """A config resolved against its preset: everything the encoder builders need.

    Layer counts: `joint` single-stream layers; `text`/`visual_layers` modality-only layers; `cross`
    co-attention or cross-modality blocks. FFNs are numbered by depth for MoE placement
    (`moe.layers`); `depth` is one past the deepest index.
    """

    family: Family
    visual: VisualKind
    region_source: RegionSource
    region_pool: int
    region_feature_size: int  # conv_stem width or precomputed F (crop_pool derives F from the pool)
    object_tags: bool
    pixel_channels: int
    pixel_sample: float
    joint: int
    text: int
    visual_layers: int
    cross: int
    embed_dim: int
    mask_pixels: bool = False  # masked regions zero their box's pixels before feature extraction

    @property
    def depth(self) -> int:
        """FFN depth indices the encoder uses (models/encoders/*: `ffn_index`)."""
        return FAMILIES[self.family].depth(Layers(self.joint, self.text, self.visual_layers, self.cross))


def resolve(cfg: ModelConfig) -> Blocks:
    """The concrete blocks of `cfg` (raises ValueError for an unknown preset)."""
    preset = get_preset(cfg.preset)
    visual = cfg.visual_input or preset.visual_inputs[0]
    source = cfg.region_source or preset.region_source
    # The preset's default applies where there are pixels to zero (not to precomputed features).
    mask_pixels = preset.mask_pixels and source != "precomputed" if cfg.mask_pixels is None else cfg.mask_pixels
    layers = FAMILIES[preset.family].split(cfg)
    return Blocks(
        family=preset.family,
        visual=visual,
        region_source=source,
        region_pool=cfg.region_pool or REGION_POOL,
        region_feature_size=cfg.region_feature_size or CONV_STEM_WIDTH,
        object_tags=preset.object_tags if cfg.object_tags is None else cfg.object_tags,
        pixel_channels=cfg.pixel_channels or PIXEL_CHANNELS,
        pixel_sample=cfg.pixel_sample or PIXEL_SAMPLE,
        joint=layers.joint,
        text=layers.text,
        visual_layers=layers.visual,
        cross=layers.cross,
        embed_dim=cfg.embed_dim or cfg.hidden_size,
        mask_pixels=visual == "region" and mask_pixels,
    )


__all__ = ["Blocks", "resolve"]
