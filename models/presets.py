"""Architecture presets named after their papers, and the factory every run and test builds with.

Shapes: none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.encoders import Encoder, SingleStreamEncoder
from models.objectives import OBJECTIVES, ObjectiveContext
from models.pretrainer import Pretrainer, check_requires
from models.weights import count_parameters, init_weights

# (model, moe, text, image, outputs the enabled objectives need) -> encoder. The needs let a preset
# leave out parts no objective reads (e.g. the pooler), which would otherwise get no gradient.
EncoderBuilder = Callable[[ModelConfig, MoEConfig, TextSpec, ImageSpec, frozenset[str]], Encoder]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    build_encoder: EncoderBuilder
    provides: frozenset[str]  # every output the encoder can give, for the `requires` check
    default_objectives: Mapping[str, float] = field(default_factory=dict)


def _vilt(
    model: ModelConfig, moe: MoEConfig, text: TextSpec, image: ImageSpec, needs: frozenset[str]
) -> Encoder:
    return SingleStreamEncoder(model, moe, text, image, pooler="pooled" in needs)


PRESETS: dict[str, Preset] = {
    "vilt": Preset(
        name="vilt",
        description="ViLT (Kim et al. 2021): single-stream transformer over text tokens + linear image patches",
        build_encoder=_vilt,
        provides=SingleStreamEncoder.CAN_PROVIDE,
        default_objectives=MappingProxyType({"mlm": 1.0, "itm": 1.0}),
    ),
}


def build_pretrainer(
    model: ModelConfig,
    moe: MoEConfig,
    objectives: Mapping[str, float] | None,
    text: TextSpec,
    image: ImageSpec,
) -> Pretrainer:
    """The model of a run: `model.preset`'s encoder + the weighted objectives, BERT-initialised.

    `objectives` maps objective name -> loss weight; None takes the preset's defaults. A weight of
    0 disables that objective (its head is not built), so a sweep can switch objectives off with an
    override; negative weights are errors.
    """
    preset = PRESETS.get(model.preset)
    if preset is None:
        raise ValueError(f"unknown preset {model.preset!r}; known presets: {sorted(PRESETS)}")
    requested = dict(preset.default_objectives if objectives is None else objectives)
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
    classes = {name: OBJECTIVES[name] for name in weights}
    check_requires(classes, preset.provides, preset.name)

    needs = frozenset().union(*(cls.requires for cls in classes.values()))
    encoder = preset.build_encoder(model, moe, text, image, needs)
    ctx = ObjectiveContext(hidden_size=model.hidden_size, text=text, word_embeddings=encoder.word_embeddings)
    pretrainer = Pretrainer(
        encoder,
        {name: cls(ctx) for name, cls in classes.items()},
        weights,
        text,
        preset=preset.name,
    )
    init_weights(pretrainer)
    return pretrainer


__all__ = ["PRESETS", "Preset", "build_pretrainer", "count_parameters"]
