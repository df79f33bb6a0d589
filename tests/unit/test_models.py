"""The pretraining model as runs build it: output contract, losses, gradients, errors."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
from torch import nn

from models import OBJECTIVES, PRESETS, count_parameters
from models.config import MoEConfig
from models.objectives import Objective
from tests.unit.conftest import IMAGE, TEXT, B, D, T, build, make_batch, moe_cfg

P = (IMAGE.size // 8) ** 2
# The ViLT these tests count layers of: 2 layers (every_other MoE = one MoE FFN), BERT's MLP ratio.
SIZE = {"num_layers": 2, "mlp_ratio": 4.0}


@pytest.mark.parametrize("moe", [MoEConfig(), moe_cfg()], ids=["dense", "moe"])
def test_output_contract(moe: MoEConfig) -> None:
    model = build(objectives={"mlm": 1.0, "itm": 1.0}, moe=moe, **SIZE)
    out = model(make_batch())
    assert set(out) == {"loss", "losses", "metrics", "moe_counts"}
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert set(out["metrics"]) == {"mlm_acc", "itm_acc"}
    if moe.enabled:
        assert set(out["losses"]) == {"mlm", "itm", "moe_aux"}
        # 2 layers, every_other -> one MoE layer (index 1)
        assert out["moe_counts"].shape == (1, 4)
        assert out["moe_counts"].dtype == torch.long
    else:
        assert set(out["losses"]) == {"mlm", "itm"}
        assert out["moe_counts"] is None


@pytest.mark.parametrize(
    "moe", [MoEConfig(), moe_cfg(layers="all", capacity_factor=4.0)], ids=["dense", "moe"]
)
def test_encoder_outputs_shapes(moe: MoEConfig) -> None:
    model = build(moe=moe, **SIZE)
    batch = make_batch()
    out = model.encoder(batch)
    assert out["text_hidden"].shape == (B, T, D)
    assert out["image_hidden"].shape == (B, P, D)
    assert out["pooled"].shape == (B, D)
    assert out["moe_aux"].shape == ()
    if moe.enabled:
        assert out["moe_counts"].shape == (2, 4)
        # capacity factor = E: an expert could take every token, so none is dropped
        real = int(batch["attention_mask"].sum()) + B * P
        assert out["moe_counts"].sum(dim=1).tolist() == [real, real]
        assert out["moe_aux"] > 0
    else:
        assert out["moe_counts"] is None
        assert out["moe_aux"].item() == 0.0


def test_total_is_weighted_sum_of_losses() -> None:
    moe = moe_cfg(aux_loss_weight=0.3)
    model = build(objectives={"mlm": 0.5, "itm": 2.0}, moe=moe, **SIZE).eval()
    out = model(make_batch())
    losses = out["losses"]
    expected = 0.5 * losses["mlm"] + 2.0 * losses["itm"] + losses["moe_aux"]  # moe_aux comes weighted
    assert torch.allclose(out["loss"].detach(), expected, atol=1e-5)


@pytest.mark.parametrize(
    "moe, objectives",
    [(MoEConfig(), None), (moe_cfg(), None), (MoEConfig(), {"mlm": 1.0}), (moe_cfg(), {"itm": 1.0})],
    ids=["dense", "moe", "mlm-only", "moe-itm-only"],
)
def test_every_parameter_gets_a_finite_gradient(moe: MoEConfig, objectives: dict[str, float] | None) -> None:
    model = build(objectives=objectives, moe=moe, **SIZE)
    model(make_batch())["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert bad == []


def test_mlm_only_model_has_no_pooler_and_no_itm() -> None:
    model = build(objectives={"mlm": 1.0, "itm": 0.0}, **SIZE)
    assert model.encoder.pooler is None
    assert set(model.objectives) == {"mlm"}
    batch = make_batch()
    with pytest.raises(ValueError, match="no 'itm' objective"):
        model.itm_logits(batch["image"], batch["input_ids"], batch["attention_mask"])


def test_itm_logits_is_match_minus_mismatch_logit() -> None:
    model = build(**SIZE).eval()
    batch = make_batch()
    scores = model.itm_logits(batch["image"], batch["input_ids"], batch["attention_mask"])
    assert scores.shape == (B,)
    out = model.encoder(batch)
    logits = model.objectives["itm"].logits(out)
    assert torch.allclose(scores, logits[:, 1] - logits[:, 0])


def test_mlm_decoder_is_tied_to_word_embeddings() -> None:
    model = build(**SIZE)
    assert model.objectives["mlm"].head.decoder.weight is model.encoder.word_embeddings.weight
    # pad row stays zero after init; the tied weight is counted once
    assert model.encoder.word_embeddings.weight[TEXT.pad_id].abs().sum() == 0
    assert count_parameters(model) == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_experts_start_different() -> None:
    model = build(moe=moe_cfg(), **SIZE)
    experts = model.encoder.layers[1].ffn.moe.deepspeed_moe.experts
    assert not torch.equal(experts.fc1_weight[0], experts.fc1_weight[1])


def test_given_generator_makes_the_step_reproducible() -> None:
    model = build(**SIZE).eval()
    batch = make_batch()
    a = model(batch, generator=torch.Generator().manual_seed(3))["loss"]
    b = model(batch, generator=torch.Generator().manual_seed(3))["loss"]
    assert torch.equal(a, b)


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown preset 'nope'.*vilt"):
        build(preset="nope", **SIZE)


def test_unknown_objective_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="objectives.xyz = 1.0: unknown objective; allowed: caption, dalle, dvae, itc, itm, itm_hard, mlm, mlm_wwm, moc, mrc"):
        build(objectives={"xyz": 1.0}, **SIZE)


def test_no_enabled_objective_is_an_error() -> None:
    with pytest.raises(ValueError, match="no objective enabled"):
        build(objectives={"mlm": 0.0}, **SIZE)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        build(objectives={"mlm": -1.0}, **SIZE)


def test_objective_needing_missing_output_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    class NeedsRegions(Objective):
        name: ClassVar[str] = "needs_regions"
        view: ClassVar[str] = "masked_text"
        requires: ClassVar[frozenset[str]] = frozenset({"region_hidden"})

    monkeypatch.setitem(OBJECTIVES, "needs_regions", NeedsRegions)
    with pytest.raises(
        ValueError, match="objective 'needs_regions' needs 'region_hidden', which preset 'vilt'"
    ):
        build(objectives={"needs_regions": 1.0}, **SIZE)


def test_presets_registry_and_defaults() -> None:
    assert PRESETS["vilt"].default_objectives(OBJECTIVES) == {"mlm": 1.0, "itm": 1.0, "wpa": 1.0}
    model = build(**SIZE)
    assert model.weights == {"mlm": 1.0, "itm": 1.0, "wpa": 1.0}
    assert isinstance(model, nn.Module) and math.isfinite(count_parameters(model))
