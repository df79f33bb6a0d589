"""Masked region modelling and segment masking on hand-built inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.config import TextSpec
from models.objectives import OBJECTIVES, masked_text_view
from models.objectives.base import CLEAN_FEATS, IGNORE_INDEX, NUM_VISUAL_TOKENS, VISUAL_MASK, ObjectiveContext
from models.objectives.masked import mask_spans
from models.objectives.region import (
    MaskedRegionClassification,
    MaskedRegionClassificationKL,
    MaskedRegionFeatureRegression,
    _region_layout,
    mask_regions,
    masked_regions_view,
    overlap_closure,
    soft_kl,
)
from tests.unit.conftest import IMAGE, TEXT, build, make_batch, tiny


def _ctx(hidden: int = 8, classes: int = 4, feats: int = 8) -> ObjectiveContext:
    return ObjectiveContext(hidden_size=hidden, text=TEXT, word_embeddings=nn.Embedding(TEXT.vocab_size, hidden),
                            object_classes=classes, visual_feature_size=feats)


def test_region_mask_rate_is_15_percent_over_many_draws() -> None:
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.zeros(400, 5, dtype=torch.long)}  # no boxes: grid tokens, all eligible
    masked = mask_regions(batch, 100, generator=g)
    assert masked.shape == (400, 100)
    assert abs(masked.float().mean().item() - 0.15) < 0.005


def test_every_sample_masks_at_least_one_object_region_never_the_whole_image() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.4, 0.4, 0.6, 0.6], [0.8, 0.8, 1.0, 1.0]]).expand(500, 3, 4)
    labels = torch.tensor([0, 1, -1]).expand(500, 3)
    batch = {"input_ids": torch.zeros(500, 5, dtype=torch.long), "obj_boxes": boxes, "obj_labels": labels}
    masked = mask_regions(batch, 4, generator=g)
    assert masked.any(1).all()
    assert not masked[:, 0].any()  # the whole-image region
    assert not masked[:, 3].any()  # a padding slot (label -1)


def test_overlap_rule_also_masks_the_overlapping_box() -> None:
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.05, 0.0, 0.55, 0.5], [0.6, 0.6, 0.9, 0.9]]])
    batch = {"obj_boxes": boxes, "obj_labels": torch.tensor([[0, 1, 2]])}
    layout = _region_layout(batch, 4)
    assert layout is not None
    boxes_BP4, real_BP = layout
    masked = torch.tensor([[False, True, False, False]])  # object 1 only
    closed = overlap_closure(masked, boxes_BP4, real_BP)
    # IoU(obj1, obj2) = 0.45 * 0.5 / (0.25 + 0.25 - 0.225) = 0.818 > 0.3; obj3 disjoint; whole image exempt
    assert closed.tolist() == [[False, True, True, False]]


def test_conditional_masking_never_masks_both_modalities() -> None:
    model = build("vilt", {"mlm": 1.0, "mrfr": 1.0})
    seen: list[tuple[bool, bool]] = []
    forward = model.encoder.forward

    def spy(inputs, *, visual_mask_BP=None, **kw):  # noqa: ANN001, ANN003, ANN202
        text_masked = bool((inputs["input_ids"] == TEXT.mask_id).any()) or "mlm_labels" in inputs
        seen.append((text_masked, visual_mask_BP is not None and bool(visual_mask_BP.any())))
        return forward(inputs, visual_mask_BP=visual_mask_BP, **kw)

    model.encoder.forward = spy  # type: ignore[method-assign]
    for seed in range(5):
        model(make_batch(seed=seed), torch.Generator().manual_seed(seed))
    assert len(seen) == 10
    assert all(not (t and v) for t, v in seen)
    assert sum(t for t, _ in seen) == 5 and sum(v for _, v in seen) == 5


def test_region_view_keeps_the_caption_and_the_mlm_view_keeps_the_image() -> None:
    batch = make_batch()
    region = masked_regions_view({**batch, NUM_VISUAL_TOKENS: torch.tensor(4)}, TEXT, torch.Generator().manual_seed(0))
    assert torch.equal(region["input_ids"], batch["input_ids"]) and region[VISUAL_MASK].shape == (4, 4)
    text = masked_text_view(batch, TEXT, torch.Generator().manual_seed(0))
    assert VISUAL_MASK not in text and torch.equal(text["image"], batch["image"])


def _region_outputs(feats: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"image_hidden": feats, "image_feats": feats * ~masked[..., None], CLEAN_FEATS: feats,
            "image_mask": torch.ones_like(masked), "image_masked": masked, "image_labels": labels}


def test_mrfr_of_perfect_reconstruction_is_zero_and_counts_only_masked_tokens() -> None:
    mrfr = MaskedRegionFeatureRegression(_ctx())
    mrfr.head = nn.Identity()  # type: ignore[assignment]  # hidden = prediction
    feats = torch.randn(2, 5, 8)
    masked = torch.tensor([[True, False, False, True, False], [False, True, False, False, False]])
    out = _region_outputs(feats, masked, torch.zeros(2, 5, dtype=torch.long))
    assert mrfr(out, {})[0]["mrfr"].item() == 0.0
    out["image_hidden"] = feats + 1.0  # off by 1 in each of F=8 features, on the 3 masked tokens
    assert mrfr(out, {})[0]["mrfr"].item() == pytest.approx(8.0)


def test_mrc_kl_of_identical_distributions_is_zero() -> None:
    p = torch.softmax(torch.randn(6, 4), -1)
    assert soft_kl(p.log(), p).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_kl(torch.zeros(6, 4), p).item() > 0
    head = MaskedRegionClassificationKL(_ctx(classes=4))
    labels = torch.tensor([0, 3])
    target = torch.full((2, 4), 0.1 / 3).scatter_(1, labels[:, None], 0.9)
    assert head.loss(target.log(), labels)[0]["mrc_kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_mrc_skips_regions_without_a_class() -> None:
    head = MaskedRegionClassification(_ctx(classes=4))
    feats = torch.randn(1, 3, 8)
    masked = torch.tensor([[True, True, False]])
    labels = torch.tensor([[2, -1, 1]])
    losses, metrics = head(_region_outputs(feats, masked, labels), {})
    logits = head.head(feats[0, :1])
    assert losses["mrc"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels[0, :1]).item(), rel=1e-5)


def test_mrfr_on_a_dual_encoder_is_a_config_error_naming_both() -> None:
    with pytest.raises(ValueError, match="objective 'mrfr' needs 'cross_modal', which preset 'clip' does not provide"):
        build("clip", {"mrfr": 1.0})


@pytest.mark.parametrize("name", ["mrfr", "mrc", "moc", "mrc_kl"])
def test_region_objectives_train_every_parameter(name: str) -> None:
    model = build("uniter", {"mlm": 1.0, name: 1.0})
    batch = make_batch()
    batch["obj_boxes"] = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9], [0.5, 0.0, 0.9, 0.4]]).expand(4, 3, 4)
    batch["obj_labels"] = torch.tensor([0, 1, 2]).expand(4, 3)
    out = model(batch, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert math.isfinite(out["losses"][name].item()) and out["losses"][name].item() > 0
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert name in OBJECTIVES


def test_span_masking_rate_and_contiguity() -> None:
    text = TextSpec(vocab_size=50, max_len=62)
    B, T = 300, 62
    ids = torch.randint(5, 50, (B, T))
    ids[:, 0], ids[:, -1] = text.cls_id, text.sep_id
    masked, labels = mask_spans(ids, torch.ones(B, T, dtype=torch.long), text, generator=torch.Generator().manual_seed(0))
    selected = labels != IGNORE_INDEX
    assert (selected.sum(1) == round(0.15 * 60)).all()  # exactly the budget, every sample
    assert not selected[:, 0].any() and not selected[:, -1].any()
    starts = selected & ~torch.cat([torch.zeros(B, 1, dtype=torch.bool), selected[:, :-1]], 1)
    mean_run = selected.sum().item() / starts.sum().item()
    assert mean_run > 2.0  # single-token BERT masking at 15 % gives ~1.2
    changed = selected & (masked != ids)
    assert 0.8 <= changed.sum().item() / selected.sum().item() <= 0.95  # 80 % [MASK] + most of the 10 % random
    assert torch.equal(labels[selected], ids[selected])


# --------------------------------------------------- VL-BERT pixel masking (model.mask_pixels)

def _region_input(preset: str, **overrides: object):  # noqa: ANN202
    from models.blocks import resolve
    from models.visual import build_visual

    cfg = tiny(preset=preset, **overrides)
    torch.manual_seed(0)
    _, visual = build_visual(cfg, resolve(cfg), IMAGE)
    return visual.eval()


def _scene() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # 16 x 16 pixels: box 1 covers columns 4-7, rows 4-11; box 2 columns 10-15, rows 0-7, two columns
    # clear of box 1 (RoIAlign's bilinear samples at a box's edge read the pixel just outside it)
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.75], [0.625, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]]).expand(2, 3, 4)
    return {"image": torch.randn(2, 3, 16, 16, generator=g), "input_ids": torch.zeros(2, 5, dtype=torch.long),
            "obj_boxes": boxes.clone(), "obj_labels": torch.tensor([[0, 1, -1], [2, 3, -1]])}


@pytest.mark.parametrize("preset, overrides", [("uniter", {"mask_pixels": True}), ("vl-bert", {})])
def test_mask_pixels_extracts_a_masked_region_from_zeroed_pixels(preset: str, overrides: dict[str, object]) -> None:
    visual = _region_input(preset, **overrides)
    assert visual.mask_pixels  # vl-bert: the preset's default (Su et al. 2020, §3.2)
    inputs = _scene()
    mask = torch.tensor([[False, True, False, False], [False, False, False, False]])  # region 1 of sample 0
    zeroed = inputs["image"].clone()
    zeroed[0, :, 4:12, 4:8] = 0.0
    with torch.no_grad():
        out = visual(inputs, mask)
        expected = visual({**inputs, "image": zeroed})
        clean = visual(inputs)
    assert torch.equal(out.masked_BP, mask)
    # every token's feature is the one the extractor computes from the image with the box's pixels zero
    assert torch.allclose(out.feats_BPF, expected.feats_BPF, atol=1e-6)
    # the masked region's feature is not zeroed after the fact (it is what zero pixels give)
    assert not torch.equal(out.feats_BPF[0, 1], clean.feats_BPF[0, 1])
    # regions that do not overlap the box are unchanged; the whole-image region saw the zeroed box
    assert torch.allclose(out.feats_BPF[0, 2], clean.feats_BPF[0, 2], atol=1e-6)
    assert torch.allclose(out.feats_BPF[1], clean.feats_BPF[1], atol=1e-6)
    assert not torch.allclose(out.feats_BPF[0, 0], clean.feats_BPF[0, 0])


def test_without_mask_pixels_only_the_masked_feature_is_zeroed() -> None:
    visual = _region_input("uniter")
    assert not visual.mask_pixels
    inputs = _scene()
    mask = torch.tensor([[False, True, False, False], [False, False, False, False]])
    with torch.no_grad():
        out, clean = visual(inputs, mask), visual(inputs)
    assert (out.feats_BPF[0, 1] == 0).all()
    keep = ~mask
    assert torch.equal(out.feats_BPF[keep], clean.feats_BPF[keep])


def test_zero_boxes_zeroes_exactly_the_pixels_whose_centre_is_inside_a_masked_box() -> None:
    from models.visual import zero_boxes

    image = torch.ones(1, 1, 8, 8)
    boxes = torch.tensor([[[0.0, 0.0, 0.25, 0.5], [0.5, 0.5, 1.0, 1.0], [0.3, 0.3, 0.6, 0.6]]])
    out = zero_boxes(image, boxes, torch.tensor([[True, False, True]]))
    expected = torch.ones(8, 8)
    expected[0:4, 0:2] = 0  # box 0: columns 0-1, rows 0-3
    expected[2:5, 2:5] = 0  # box 2: centres 2.5/8, 3.5/8, 4.5/8 lie in [0.3, 0.6)
    assert torch.equal(out[0, 0], expected)  # box 1 is not masked
