"""Every architecture preset trains through `mmpt run --set model.preset=NAME` on the shapes data:
2 steps on 2 Ray Train workers, with its paper's objectives that exist, MoE FFNs included.

A Ray Train run costs ~20-30 s here, so one run per distinct network: presets whose blocks resolve
identically and whose objectives need the same encoder parts (VisualBERT, Unicoder-VL, UNITER,
ImageBERT: single-stream over crop-pooled regions with a pooler; they differ only in their papers'
objectives) train once, as the first of them; the others load through the same config path,
build a network of exactly the same parameters, and take one forward + backward step with their
own objectives in process (the objectives themselves are trained through `mmpt run` by the
objectives' integration tests).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from models import OBJECTIVES, PRESETS, build_pretrainer
from models.config import ImageSpec, TextSpec
from models.presets import Blocks, resolve
from orchestrator.config import load_config
from orchestrator.runner import run
from tests.integration.conftest import QUICKSTART, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# (blocks, encoder outputs built) -> the config of the preset that trained them in this session
_TRAINED: dict[tuple[Blocks, frozenset[str]], Any] = {}


def _dense_model(cfg: Any) -> torch.nn.Module:
    text, image = TextSpec(vocab_size=64, max_len=cfg.data.max_text_len), ImageSpec(size=cfg.data.image_size)
    return build_pretrainer(cfg.model, cfg.moe.model_copy(update={"num_experts": 0}), cfg.active_objectives,
                            text, image)


def _batch(cfg: Any) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    B, T, S = 4, cfg.data.max_text_len, cfg.data.image_size
    ids = torch.randint(5, 64, (B, T), generator=g)
    ids[:, 0], ids[:, 9], ids[:, 10:] = 2, 3, 0
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8], [0.0, 0.0, 0.0, 0.0]]).expand(B, 3, 4)
    return {"image": torch.randn(B, 3, S, S, generator=g), "input_ids": ids,
            "attention_mask": (ids != 0).long(), "obj_boxes": boxes.clone(),
            "obj_labels": torch.tensor([0, 2, -1]).expand(B, 3).clone()}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_trains(ray_session, shapes_data, tmp_path, preset: str) -> None:  # noqa: ANN001
    objectives = PRESETS[preset].default_objectives(OBJECTIVES)
    overrides = tiny(shapes_data, tmp_path, name=f"preset-{preset}", **{
        "model.preset": preset, "objectives": "{" + ", ".join(f"{k}: {w}" for k, w in objectives.items()) + "}",
        "train.steps": 2, "train.log_every": 2, "train.checkpoint_every": 0, "data.eval": "[]"})
    cfg = load_config(QUICKSTART, overrides)
    model = _dense_model(cfg)
    key = (resolve(cfg.model), model.encoder.provides)  # same blocks, same parts built
    if key in _TRAINED:  # the same network already trained through mmpt run in this session
        twin = {n: p.shape for n, p in _dense_model(_TRAINED[key]).encoder.named_parameters()}
        assert {n: p.shape for n, p in model.encoder.named_parameters()} == twin
        out = model(_batch(cfg))
        out["loss"].backward()
        assert set(out["losses"]) == set(objectives) and torch.isfinite(out["loss"])
        return
    summary = run(cfg).summary
    assert summary["steps"] == 2
    losses = summary["final_losses"]
    # tiny() keeps quickstart's MoE (every other FFN); every family has an FFN at depth 1
    assert set(losses) == {*objectives, "moe_aux", "total"}
    assert all(math.isfinite(v) for v in losses.values()), losses
    _TRAINED[key] = cfg
