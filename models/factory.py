"""The factory every run, test and benchmark builds its model with: preset -> encoder + objectives.

Shapes: none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.blocks import Blocks, resolve
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.families import FAMILIES
from models.objectives import OBJECTIVES, ObjectiveContext
from models.presets import get_preset
from models.pretrainer import Pretrainer, check_requires
from models.weights import init_weights


def fitting_objectives(model: ModelConfig) -> list[str]:
    """Objectives (of those that exist) whose required outputs the preset's encoder can provide."""
    can = FAMILIES[resolve(model).family].encoder_class().CAN_PROVIDE
    return sorted(name for name, cls in OBJECTIVES.items() if cls.requires <= can)


def weight_problems(objectives: Mapping[str, float]) -> list[tuple[str, Any, str]]:
    """What is wrong with a run's `objectives` weights, as (field, value, what is allowed): names
    not in the registry, negative weights, none enabled. The one check of them (the run config's
    cross-check and `build_pretrainer` both call it)."""
    problems: list[tuple[str, Any, str]] = []
    for name, weight in objectives.items():
        if name not in OBJECTIVES:
            problems.append((f"objectives.{name}", weight, f"unknown objective; allowed: {', '.join(sorted(OBJECTIVES))}"))
        elif weight < 0:
            problems.append((f"objectives.{name}", weight, "weights must be >= 0 (0 switches an objective off)"))
    if not any(weight > 0 for weight in objectives.values()):
        problems.append(("objectives", dict(objectives), "no objective enabled; enable at least one with a weight > 0"))
    return problems


def objective_problems(model: ModelConfig, objectives: Mapping[str, float]) -> list[tuple[str, Any, str]]:
    """Enabled objectives the preset cannot serve, as (field, value, what is allowed); unknown
    objective names are left to the caller (they are a different mistake)."""
    blocks = resolve(model)
    family = FAMILIES[blocks.family]
    can = family.encoder_class().CAN_PROVIDE
    problems: list[tuple[str, Any, str]] = []
    for name, weight in objectives.items():
        cls = OBJECTIVES.get(name)
        if cls is None or weight <= 0:
            continue
        missing = sorted(cls.requires - can)
        if missing:
            problems.append((f"objectives.{name}", weight,
                             f"needs {', '.join(repr(m) for m in missing)}, which preset {model.preset!r} "
                             f"({family.title}) does not provide; objectives that fit it: "
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
    problems = weight_problems(requested)
    if problems:
        raise ValueError("; ".join(f"{field} = {value!r}: {allowed}" for field, value, allowed in problems))
    weights = {name: float(w) for name, w in requested.items() if w > 0}
    blocks = resolve(model)
    encoder_cls = FAMILIES[blocks.family].encoder_class()
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


__all__ = ["build_pretrainer", "fitting_objectives", "objective_problems", "visual_tokens", "weight_problems"]
