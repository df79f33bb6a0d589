"""Typed configuration of a model: the `model` and `moe` sections of a run config.

These are plain pydantic models (no torch, no Ray) so the run config in `jobs/` composes them and
the model factories in `models/` read them: one schema serves both.

A preset (`model.preset`, see models/presets.py) is a named choice of blocks of one encoder family
(models/families.py). Every block field
below that is `None` takes the preset's value; a field set explicitly overrides it, and a field
that the preset's architecture has no use for is an error (a setting must always do something).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from models.families import FAMILIES, OPTIONAL_FIELDS, VISUAL_FIELDS, RegionSource, VisualKind
from models.generative_config import DalleConfig, DVAEConfig
from models.moe.config import MoEConfig
from models.presets import PRESETS
from models.schema import Strict

__all__ = ["AdversarialConfig", "ImageSpec", "ModelConfig", "MoEConfig", "PretrainedInit", "TextSpec"]


class PretrainedInit(Strict):
    """`model.init`: unimodal Hugging Face checkpoints the encoder starts from (jobs/pretrained/)."""

    text: str | None = Field(None, description="BERT-style checkpoint folder (local or s3://): text embeddings, "
                             "the text tower's layers, pooler and MLM head")
    vision: str | None = Field(None, description="ViT-style checkpoint folder (local or s3://): patch embeddings, "
                               "class token, the image tower's layers (patch visual input)")

    @property
    def enabled(self) -> bool:
        return bool(self.text or self.vision)


class ModelConfig(Strict):
    """The encoder: which preset, its size, and any block overridden."""

    preset: str = Field("vilt", description="architecture preset name (see `mmpt models list`)")
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1, description="depth of the text path; multi-stack families split it "
                            "(see text_layers, visual_layers, cross_layers)")
    num_heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    patch_size: int = Field(8, ge=1, description="image patch side in pixels; also the pixel CNN's stride")
    visual_input: VisualKind | None = Field(None, description="patch, region or pixel; null = the preset's")
    # region input
    region_source: RegionSource | None = Field(
        None, description="region features: crop_pool, conv_stem or precomputed; null = the preset's")
    region_pool: int | None = Field(None, ge=1, le=32, description="RoIAlign output side (default 4)")
    region_feature_size: int | None = Field(
        None, ge=1, description="conv_stem width (default 64), or the size of precomputed features (required)")
    mask_pixels: bool | None = Field(
        None, description="masked regions zero the image pixels inside their box before feature extraction "
        "(VL-BERT's masked RoI classification), instead of zeroing the extracted feature; region inputs "
        "computed from pixels only (crop_pool, conv_stem); null = the preset's")
    object_tags: bool | None = Field(None, description="Oscar object-tag tokens from the object labels; null = the preset's")
    object_classes: int = Field(4, ge=1, description="object label classes; unset: the run takes the data's "
                                "(its object vocabulary; 1600 for BUTD/Visual Genome detector labels)")
    # pixel input
    pixel_channels: int | None = Field(None, ge=1, description="pixel CNN width = visual feature size (default 64)")
    pixel_sample: float | None = Field(None, gt=0, le=1, description="share of CNN grid cells kept in training "
                                       "(Pixel-BERT's random pixel sampling; default 0.5)")
    # multi-stack families
    text_layers: int | None = Field(None, ge=0, description="text-only layers (co-attention prefix, LXMERT "
                                    "language encoder, InterBERT text stream, CLIP text tower)")
    visual_layers: int | None = Field(None, ge=0, description="vision-only layers (LXMERT object encoder, "
                                      "InterBERT image stream, CLIP image tower)")
    cross_layers: int | None = Field(None, ge=1, description="co-attention (ViLBERT) or cross-modality (LXMERT) layers")
    embed_dim: int | None = Field(None, ge=1, description="joint embedding size of the contrastive outputs "
                                  "(itc: CLIP's towers, single-stream unimodal passes); null = hidden_size")
    init: PretrainedInit = Field(default_factory=PretrainedInit, description="start from pretrained "
                                 "unimodal weights: {text: BERT folder, vision: ViT folder}; default: random init")
    dvae: DVAEConfig = Field(default_factory=DVAEConfig, description="the discrete VAE (presets dvae, dalle)")
    dalle: DalleConfig = Field(default_factory=DalleConfig, description="the DALL-E transformer stage (preset dalle)")

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def problems(self) -> list[str]:
        """What does not fit, one sentence per problem naming the field, the value and what is allowed."""
        out: list[str] = []
        if self.hidden_size % self.num_heads != 0:
            out.append(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        preset = PRESETS.get(self.preset)
        if preset is None:  # reported by the run config's cross-check / the model factory, listing names
            return out
        visual = self.visual_input or preset.visual_inputs[0]
        if visual not in preset.visual_inputs:
            out.append(f"visual_input={visual!r} does not fit preset {self.preset!r} ({preset.paper}); "
                       f"allowed: {', '.join(preset.visual_inputs)}")
            visual = preset.visual_inputs[0]
        family = FAMILIES[preset.family]
        used = family.fields | VISUAL_FIELDS[visual]
        for name in sorted(OPTIONAL_FIELDS - used):
            value = getattr(self, name)
            if value is not None:
                out.append(f"{name}={value!r} does not fit preset {self.preset!r} ({preset.family} encoder, "
                           f"{visual} input); block fields it takes: {', '.join(sorted(used)) or 'none'}")
        if visual == "region" and (self.region_source or preset.region_source) == "precomputed" \
                and self.region_feature_size is None:
            out.append("region_source='precomputed' needs region_feature_size (the size F of the shards' "
                       "region features, e.g. 2048 for BUTD Faster R-CNN features)")
        if visual == "region" and self.mask_pixels and (self.region_source or preset.region_source) == "precomputed":
            out.append("mask_pixels=True needs region features computed from pixels (region_source crop_pool or "
                       "conv_stem); precomputed features have no pixels to zero")
        if visual == "pixel" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            out.append(f"patch_size={self.patch_size} with pixel input: the pixel CNN downsamples by stride-2 "
                       "convolutions, so patch_size must be a power of 2 >= 2")
        if self.init.vision and visual != "patch":
            out.append(f"init.vision={self.init.vision!r} needs patch visual input (a ViT starts the patch "
                       f"embeddings); preset {self.preset!r} takes {visual} input")
        for section, default in (("dvae", DVAEConfig()), ("dalle", DalleConfig())):
            if section not in family.sections and getattr(self, section) != default:
                takers = ", ".join(f.name for f in FAMILIES.values() if section in f.sections)
                out.append(f"model.{section} does not fit preset {self.preset!r} ({preset.family} encoder); "
                           f"it configures presets {takers}")
        if preset.family == "dual" and 0 in (self.text_layers, self.visual_layers):
            out.append("text_layers/visual_layers=0: a dual encoder needs both towers; allowed: >= 1")
        return out


@dataclass(frozen=True)
class TextSpec:
    """What the model needs to know about the tokenizer.

    The id tuples are optional (empty = unknown) and read by the objectives that need them:
    `continuation_ids` are WordPiece's "##" pieces, which continue the word before them (whole-word
    masking, `mlm_wwm`); the `scene_*_ids` are the word pieces of scene-graph nodes (ERNIE-ViL's
    scene-graph prediction, `sgp`): objects, their attributes, the relations between them.
    jobs/data/tokenizer.py `text_spec` fills them from the run's tokenizer.
    """

    vocab_size: int
    max_len: int
    pad_id: int = 0
    unk_id: int = 1
    cls_id: int = 2
    sep_id: int = 3
    mask_id: int = 4
    continuation_ids: tuple[int, ...] = ()
    scene_object_ids: tuple[int, ...] = ()
    scene_attribute_ids: tuple[int, ...] = ()
    scene_relation_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Sorted int tuples whatever came in (a spec that travelled as JSON holds lists).
        for name in ("continuation_ids", "scene_object_ids", "scene_attribute_ids", "scene_relation_ids"):
            object.__setattr__(self, name, tuple(sorted({int(i) for i in getattr(self, name)})))

    @property
    def scene_ids(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(object, attribute, relation) word-piece ids, in that order."""
        return self.scene_object_ids, self.scene_attribute_ids, self.scene_relation_ids


@dataclass(frozen=True)
class ImageSpec:
    """What the model needs to know about the images the pipeline delivers.

    `max_objects` (data.max_objects) only sizes estimates such as `Pretrainer.num_visual_tokens`:
    region encoders take however many boxes a batch holds.
    """

    size: int
    channels: int = 3
    max_objects: int = 3


Modality = Literal["text", "image"]


class AdversarialConfig(Strict):
    """`train.adversarial`: off unless `steps` > 0."""

    steps: int = Field(0, ge=0, description="K ascent steps per micro-batch; 0 = no adversarial training")
    step_size: float = Field(1e-3, gt=0, description="ascent step on the normalised gradient (FreeLB adv-lr)")
    norm_bound: float = Field(0.0, ge=0, description="max L2 norm of δ per sample and modality; 0 = unbounded")
    init_mag: float = Field(0.0, ge=0, description="L2 norm bound of δ's random start; 0 = start at zero")
    weight: float = Field(1.0, gt=0, description="weight of the adversarial loss next to the clean loss")
    modalities: list[Modality] = Field(default_factory=lambda: ["text", "image"],
                                       min_length=1, description="which embeddings are perturbed")

    @property
    def enabled(self) -> bool:
        return self.steps > 0
