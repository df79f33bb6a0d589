"""The registries are explicit and complete: every family declared once, every view that draws a
visual mask listed (nothing is registered as a side effect of importing a module)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import get_args

import torch

from models import OBJECTIVES, PRESETS
from models.encoders.base import Encoder
from models.families import FAMILIES, OPTIONAL_FIELDS, Family
from models.objectives import VIEWS, VISUAL_MASK_VIEWS
from models.objectives.base import NUM_VISUAL_TOKENS, VISUAL_MASK
from tests.unit.conftest import TEXT, make_batch

# num_layers=6 split by each family's paper: (joint, text, visual, cross) and the FFN depth
SPLITS = {"single": ((6, 0, 0, 0), 6), "interaction": ((4, 2, 2, 0), 6), "coattention": ((0, 3, 0, 3), 9),
          "cross": ((0, 4, 2, 2), 6), "dual": ((0, 6, 6, 0), 6), "dvae": ((0, 0, 0, 0), 0), "dalle": ((6, 0, 0, 0), 6)}


def test_every_family_is_declared_once_with_its_encoder_split_and_depth() -> None:
    assert sorted(FAMILIES) == sorted(get_args(Family)) == sorted(SPLITS)
    assert {p.family for p in PRESETS.values()} == set(FAMILIES)  # every family has a preset, no preset lacks one
    depths = SimpleNamespace(num_layers=6, text_layers=None, visual_layers=None, cross_layers=None)
    for name, family in FAMILIES.items():
        cls = family.encoder_class()
        assert issubclass(cls, Encoder) and cls.CAN_PROVIDE, name
        assert family.fields <= OPTIONAL_FIELDS
        layers = family.split(depths)
        assert (tuple(layers), family.depth(layers)) == SPLITS[name], name


def test_the_visual_mask_views_are_exactly_the_views_that_draw_one() -> None:
    batch = {**make_batch(), NUM_VISUAL_TOKENS: torch.tensor(4)}
    drawing = {name for name, view in VIEWS.items() if VISUAL_MASK in view(batch, TEXT, torch.Generator().manual_seed(0))}
    assert drawing == VISUAL_MASK_VIEWS == {"masked_regions"}
    assert {cls.view for cls in OBJECTIVES.values()} <= set(VIEWS)
