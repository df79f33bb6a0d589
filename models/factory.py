"""The factory every run, test and benchmark builds its model with: preset -> encoder + objectives.

Shapes: none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.encoders import ENCODERS
from models.objectives import OBJECTIVES, ObjectiveContext
from models.presets import FAMILY_NAMES, Blocks, get_preset, resolve
from models.pretrainer import Pretrainer, check_requires
from models.weights import init_weights


def fitting_objectives(model: ModelConfig) -> list[str]:
    """Objectives (of those that exist) whose required outputs the preset's encoder can provide."""
    can = ENCODERS[resolve(model).family].CAN_PROVIDE
    return sorted(name for name, cls in OBJECTIVES.items() if cls.requires <= can)


def objective_problems(model: ModelConfig, objectives: Mapping[str, float]) -> list[tuple[str, Any, str]]:
    """Enabled objectives the preset cannot serve, as (field, value, what is allowed); unknown
    objective names are left to the caller (they are a different mistake)."""
    blocks = resolve(model)
    can = ENCODERS[blocks.family].CAN_PROVIDE
    problems: list[tuple[str, Any, str]] = []
    for name, weight in objectives.items():
        cls = OBJECTIVES.get(name)
        if cls is None or weight <= 0:
            continue
        missing = sorted(cls.requires - can)
        if missing:
            problems.append((f"objectives.{name}", weight,
                             f"needs {', '.join(repr(m) for m in missing)}, which preset {model.preset!r} "
                             f"({FAMILY_NAMES[blocks.family]}) does not provide; objectives that fit it: "
                             f"{', '.join(fitting_objectives(model))}"))
    return problems


def visual_tokens(model: ModelConfig, blocks: Blocks, image: ImageSpec) -> int:
    """Visual tokens per sample in training (patches, sampled grid cells, or regions + whole image)."""
    if blocks.visual == "region":
        return 1 + image.max_objects
    cells = (image.size // model.patch_size) ** 2
    return max(1, round(blocks.pixel_sample * cells)) if blocks.visual == "pixel" else cells


def build_pretrainer(
    model: ModelConfig,
    moe: MoEConfig,
    objectives: Mapping[str, float] | None,
    text: TextSpec,
    image: ImageSpec,
) -> Pretrainer:
    """The model of a run: `model.preset`'s encoder + the weighted objectives, BERT-initialised.

    `objectives` maps objective name -> loss weight; None takes the preset's defaults (its paper's
    objectives that exist). A weight of 0 disables that objective (its head is not built), so a
    sweep can switch objectives off with an override; negative weights are errors.
    """
    preset = get_preset(model.preset)
    if objectives is None:
        requested = preset.default_objectives(OBJECTIVES)
        if not requested:
            raise ValueError(f"none of preset {preset.name!r}'s objectives ({', '.join(preset.objectives)}) "
                             f"exists yet; list objectives explicitly (known: {sorted(OBJECTIVES)})")
    else:
        requested = dict(objectives)
    for name, weight in requested.items():
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; known objectives: {sorted(OBJECTIVES)}")
        if weight < 0:
            raise ValueError(f"objective {name!r} has weight {weight}; weights must be >= 0")
    weights = {name: float(w) for name, w in requested.items() if w > 0}
    if not weights:
        raise ValueError(
            f"no objective enabled (weights: {requested}); enable at least one with a weight > 0"
        )
    blocks = resolve(model)
    encoder_cls = ENCODERS[blocks.family]
    classes = {name: OBJECTIVES[name] for name in weights}
    try:
        check_requires(classes, encoder_cls.CAN_PROVIDE, preset.name)
    except ValueError as exc:
        raise ValueError(f"{exc}; objectives that fit it: {', '.join(fitting_objectives(model))}") from None

    needs = frozenset().union(*(cls.requires for cls in classes.values()))
    encoder = encoder_cls(model, blocks, moe, text, image, needs)
    feature_size = encoder.visual_embeddings.feature_size if encoder._visual_name is not None else 0
    # The dVAE has no text embeddings (getattr's default: its property raises AttributeError).
    ctx = ObjectiveContext(hidden_size=model.hidden_size, text=text, word_embeddings=getattr(encoder, "word_embeddings", None),
                           object_classes=model.object_classes, visual_feature_size=feature_size)
    pretrainer = Pretrainer(
        encoder,
        # An objective configured by the model section (model.dalle's loss weights) has `from_config`.
        {name: cls.from_config(ctx, model) if hasattr(cls, "from_config") else cls(ctx) for name, cls in classes.items()},
        weights,
        text,
        preset=preset.name,
        # the generative families know their image tokens (the dVAE grid); others count patches/regions
        visual_tokens=getattr(encoder, "num_image_tokens", None) or getattr(encoder, "tokens_per_sample", None)
        or visual_tokens(model, blocks, image),
    )
    init_weights(pretrainer)
    return pretrainer


__all__ = ["build_pretrainer", "fitting_objectives", "objective_problems", "visual_tokens"]
