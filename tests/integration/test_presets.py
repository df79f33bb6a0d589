"""Every architecture preset trains through `mmpt run --set model.preset=NAME` on the shapes data:
2 steps on 2 Ray Train workers, with its paper's objectives that exist, MoE FFNs included."""

from __future__ import annotations

import math

import pytest

from models import OBJECTIVES, PRESETS
from orchestrator.config import load_config
from orchestrator.runner import run
from tests.integration.conftest import QUICKSTART, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains(ray_session, shapes_data, tmp_path, preset: str) -> None:  # noqa: ANN001
    objectives = PRESETS[preset].default_objectives(OBJECTIVES)
    overrides = tiny(shapes_data, tmp_path, name=f"preset-{preset}", **{
        "model.preset": preset, "objectives": "{" + ", ".join(f"{k}: {w}" for k, w in objectives.items()) + "}",
        "train.steps": 2, "train.log_every": 1, "train.checkpoint_every": 0, "data.eval": "[]"})
    summary = run(load_config(QUICKSTART, overrides)).summary
    assert summary["steps"] == 2
    losses = summary["final_losses"]
    # tiny() keeps quickstart's MoE (every other FFN); every family has an FFN at depth 1
    assert set(losses) == {*objectives, "moe_aux", "total"}
    assert all(math.isfinite(v) for v in losses.values()), losses
