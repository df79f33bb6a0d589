"""ITC on the single-stream presets: unimodal passes through the shared transformer, run only when wanted."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.config import MoEConfig
from models.encoders.base import CONTRASTIVE
from models.factory import fitting_objectives, objective_problems
from models.objectives import OBJECTIVES, ImageTextContrastive
from tests.unit.conftest import IMAGE, B, T, build, make_batch, tiny

MLM_ITM_ITC = {"mlm": 1.0, "itm": 1.0, "itc": 1.0}
CONTRASTIVE_PARAMS = ("encoder.text_proj.weight", "encoder.image_proj.weight", "encoder.logit_scale_log")


def count_calls(module: nn.Module) -> list[int]:
    """Sequence lengths of the inputs `module` is called with, appended as it runs."""
    seen: list[int] = []
    module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("preset", ["vilt", "uniter", "oscar", "pixel-bert", "interbert"])
def test_mlm_itm_itc_trains_every_parameter(preset: str) -> None:
    model = build(preset, MLM_ITM_ITC)
    enc = model.encoder
    assert CONTRASTIVE <= enc.provides
    assert enc.logit_scale_log.item() == pytest.approx(math.log(1 / 0.07))  # CLIP's init survives init_weights
    out = model(make_batch())
    assert set(out["losses"]) == {"mlm", "itm", "itc"} and "itc_acc" in out["metrics"]
    assert all(torch.isfinite(v) for v in out["losses"].values())
    out["loss"].backward()
    params = dict(model.named_parameters())
    for name in CONTRASTIVE_PARAMS:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert [n for n, p in params.items() if p.grad is None] == []
    assert [n for n, p in params.items() if not torch.isfinite(p.grad).all()] == []


def test_itc_alone_reaches_the_shared_transformer() -> None:
    model = build("vilt", {"itc": 1.0})
    assert model.encoder.pooler is None and "pooled" not in model.encoder.provides
    model(make_batch())["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["encoder.layers.0.attn.qkv.weight"].abs().sum() > 0
    assert grads["encoder.patch_embeddings.proj.weight"].abs().sum() > 0
    assert grads["encoder.text_embeddings.word.weight"].abs().sum() > 0


@pytest.mark.parametrize("preset", ["vilt", "uniter", "oscar", "pixel-bert", "interbert"])
def test_each_embedding_depends_on_its_own_modality_only(preset: str) -> None:
    enc = build(preset, MLM_ITM_ITC).encoder.eval()
    batch = make_batch()
    other_image = batch | {"image": batch["image"] + torch.randn_like(batch["image"])}
    other_text = batch | {"input_ids": batch["input_ids"].clone()}
    other_text["input_ids"][:, 1:5] = 7  # every caption has >= 6 real tokens
    a, b, c = enc(batch), enc(other_image), enc(other_text)
    assert torch.equal(a["text_embed"], b["text_embed"])  # the image never reaches the text embedding
    assert not torch.allclose(a["image_embed"], b["image_embed"], atol=1e-4)
    assert torch.equal(a["image_embed"], c["image_embed"])  # nor the caption the image embedding
    assert not torch.allclose(a["text_embed"], c["text_embed"], atol=1e-4)
    # ... while the joint pass mixes them, as before
    assert not torch.equal(a["text_hidden"], b["text_hidden"])


def test_oscar_tags_go_with_the_image() -> None:
    enc = build("oscar", MLM_ITM_ITC).encoder.eval()
    batch = make_batch()
    relabelled = batch | {"obj_labels": batch["obj_labels"].roll(1, dims=0)}
    a, b = enc(batch), enc(relabelled)
    assert torch.equal(a["text_embed"], b["text_embed"])
    assert not torch.allclose(a["image_embed"], b["image_embed"], atol=1e-4)


def test_text_embedding_ignores_padding() -> None:
    enc = build("vilt", MLM_ITM_ITC).encoder.eval()
    batch = make_batch()
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 9)  # padding slots hold other ids
    assert torch.allclose(enc(batch)["text_embed"], enc(batch | {"input_ids": ids})["text_embed"], atol=1e-6)


@pytest.mark.parametrize("preset", ["vilt", "interbert"])
def test_without_itc_nothing_contrastive_is_built_or_run(preset: str) -> None:
    model = build(preset, {"mlm": 1.0, "itm": 1.0})
    enc = model.encoder
    assert not enc.contrastive and not (CONTRASTIVE & enc.provides)
    assert not [n for n, _ in model.named_parameters() if "proj" in n.split(".")[1] or "logit_scale" in n]
    assert enc.passes(None) == (True, False, False)
    if preset == "interbert":  # no objective reads image states or embeddings: no image stream
        assert len(enc.image_layers) == 0 and enc.image_norm is None
    seen = count_calls(enc.layers[0])
    model(make_batch())
    P = (IMAGE.size // 8) ** 2
    assert seen == [T + P, T + P]  # the joint pass of the masked-text view and of the ITM view, nothing else


def test_views_run_only_the_passes_their_objectives_read() -> None:
    model = build("vilt", MLM_ITM_ITC)
    assert model.wants == {"masked_text": OBJECTIVES["mlm"].requires, "itm_pairs": OBJECTIVES["itm"].requires,
                           "clean": ImageTextContrastive.requires}
    seen = count_calls(model.encoder.layers[0])
    model(make_batch())
    P = (IMAGE.size // 8) ** 2
    # mlm: joint; itm: joint; itc: text alone, image alone (no joint pass)
    assert seen == [T + P, T + P, T, P]


@pytest.mark.parametrize("want, calls, present, absent", [
    (None, ["joint", "text", "image"], {"text_hidden", "pooled", "text_embed", "image_embed"}, set()),
    (ImageTextContrastive.requires, ["text", "image"], {"text_embed", "image_embed", "logit_scale", "image_feats"},
     {"text_hidden", "image_hidden", "pooled"}),
    (frozenset({"text_embed"}), ["text"], {"text_embed"}, {"image_embed", "text_hidden"}),
    (frozenset({"pooled"}), ["joint"], {"pooled", "text_hidden"}, {"text_embed", "image_embed"}),
    (frozenset({"text_hidden", "image_embed"}), ["joint", "image"], {"text_hidden", "image_embed"}, {"text_embed"}),
    (frozenset(), ["joint"], {"text_hidden"}, {"text_embed"}),
])
def test_want_picks_the_passes(want: frozenset[str] | None, calls: list[str], present: set[str],
                               absent: set[str]) -> None:
    enc = build("vilt", MLM_ITM_ITC).encoder.eval()
    seen = count_calls(enc.layers[0])
    out = enc(make_batch(), want=want)
    P = (IMAGE.size // 8) ** 2
    assert seen == [{"joint": T + P, "text": T, "image": P}[c] for c in calls]
    assert present <= set(out) and not (absent & set(out))
    assert {"moe_aux", "moe_counts"} <= set(out)


def test_itm_logits_skips_the_unimodal_passes() -> None:
    model = build("vilt", MLM_ITM_ITC).eval()
    seen = count_calls(model.encoder.layers[0])
    batch = make_batch()
    scores = model.itm_logits(batch["image"], batch["input_ids"], batch["attention_mask"])
    assert scores.shape == (B,) and len(seen) == 1


def test_moe_counts_add_the_unimodal_passes_per_layer() -> None:
    moe = MoEConfig(num_experts=4, layers="all", capacity_factor=4.0, min_capacity=0)
    batch = make_batch()
    text, P = int(batch["attention_mask"].sum()), (IMAGE.size // 8) ** 2
    model = build("vilt", {"itc": 1.0}, moe)
    out = model(batch)
    L = model.encoder.num_moe_layers
    assert L == 3 and out["moe_counts"].shape == (L, 4)
    assert out["moe_counts"].sum(1).tolist() == [text + B * P] * L  # text alone + image alone, each layer
    assert out["losses"]["moe_aux"] > 0
    out = build("vilt", {"mlm": 1.0, "itc": 1.0}, moe)(batch)
    assert out["moe_counts"].sum(1).tolist() == [2 * (text + B * P)] * L  # + the joint pass of the MLM view


def test_interbert_moe_rows_stay_one_per_layer() -> None:
    moe = MoEConfig(num_experts=4, layers="all", capacity_factor=4.0, min_capacity=0)
    batch = make_batch()
    text = int(batch["attention_mask"].sum())
    regions = B + int((batch["obj_labels"] >= 0).sum())  # real region tokens: whole image + the objects
    model = build("interbert", {"mlm": 1.0, "itc": 1.0}, moe)
    enc = model.encoder
    assert enc.tags is None and (len(enc.layers), len(enc.text_layers), len(enc.image_layers)) == (2, 1, 1)
    out = model(batch)
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # rows in module order: interaction layers, text stream, image stream. MLM: joint pass (text stream only);
    # ITC: text alone (interaction + text stream), image alone (interaction + image stream)
    assert out["moe_counts"].sum(1).tolist() == [2 * (text + regions)] * 2 + [2 * text, regions]


def test_embed_dim_sizes_the_projections() -> None:
    enc = build("vilt", MLM_ITM_ITC, embed_dim=8).encoder.eval()
    out = enc(make_batch())
    assert out["text_embed"].shape == out["image_embed"].shape == (B, 8)
    assert torch.allclose(out["text_embed"].norm(dim=-1), torch.ones(B), atol=1e-5)


def test_single_stream_presets_accept_itc() -> None:
    for preset in ("vilt", "uniter", "visualbert", "oscar", "pixel-bert", "unimo", "interbert"):
        assert objective_problems(tiny(preset), MLM_ITM_ITC) == [], preset
        assert "itc" in fitting_objectives(tiny(preset))
    assert objective_problems(tiny("vilbert"), {"itc": 1.0})  # co-attention: still no contrastive outputs


def test_quickstart_on_vilt_validates_with_mlm_itm_itc() -> None:
    from orchestrator.config import load_config
    from tests.integration.conftest import QUICKSTART

    cfg = load_config(QUICKSTART, ["model.preset=vilt", "objectives={mlm: 1.0, itm: 1.0, itc: 1.0}"])
    assert cfg.active_objectives == MLM_ITM_ITC
    cfg = load_config(QUICKSTART, ["model.preset=vilt", "model.embed_dim=64", "objectives={mlm: 1.0, itc: 1.0}"])
    assert cfg.model.embed_dim == 64


def test_evaluate_reports_itc_and_itm_retrieval_for_vilt() -> None:
    from jobs.evaluate import evaluate

    model = build("vilt", MLM_ITM_ITC)
    batches = [{**make_batch(seed=s), "image": (torch.rand(B, 3, 16, 16) * 255).to(torch.uint8)} for s in range(2)]
    ev = evaluate(model, batches)
    assert ev["itc_candidates"] == 8 and 0.0 <= ev["itc_i2t_r1"] <= 1.0
    assert 0.0 <= ev["i2t_r1"] <= 1.0 and "itc_acc" in ev and "itm_acc" in ev

