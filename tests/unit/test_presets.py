"""Every preset through the factory runs use: contract, gradients, stream mixing, parameter counts, errors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from models import OBJECTIVES, PRESETS, Pretrainer, build_pretrainer, count_parameters
from models.blocks import Blocks, resolve
from models.config import ModelConfig, MoEConfig
from models.families import FAMILIES
from models.objectives import VIEWS, Objective
from models.objectives.base import CAUSAL_TEXT, VISUAL_MASK, encoder_inputs
from tests.unit.conftest import IMAGE, TEXT, B, C, D, R, T, make_batch, tiny

CAPABILITIES = frozenset({"cross_modal", "causal_text"})
FLOAT_OUTPUTS = ("text_hidden", "image_hidden", "pooled", "image_feats", "text_embed", "image_embed", "logit_scale")


# The vision-language encoders share one output contract; DALL-E's two stages have their own
# (tests/unit/test_dalle.py) and join only the tests that every preset must pass.
VL_PRESETS = sorted(p for p in PRESETS if PRESETS[p].family not in ("dvae", "dalle"))


class _Probe(Objective):
    """Reads every output the encoder family can give, so the whole encoder must be built and reached."""

    name: ClassVar[str] = "probe"
    view: ClassVar[str] = "masked_text"
    requires: ClassVar[frozenset[str]] = frozenset()

    def forward(self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        loss = sum(outputs[k].float().pow(2).mean() for k in FLOAT_OUTPUTS if outputs.get(k) is not None)
        return {"probe": loss}, {}


def probe_model(preset: str, moe: MoEConfig | None = None, **overrides: object) -> Pretrainer:
    family = resolve(tiny(preset, **overrides)).family
    probe = type("Probe", (_Probe,), {"requires": FAMILIES[family].encoder_class().CAN_PROVIDE})
    OBJECTIVES["probe"] = probe
    try:
        torch.manual_seed(0)
        return build_pretrainer(tiny(preset, **overrides), moe or MoEConfig(), {"probe": 1.0}, TEXT, IMAGE)
    finally:
        del OBJECTIVES["probe"]


def visual_tokens(blocks: Blocks) -> int:
    return 1 + R if blocks.visual == "region" else (IMAGE.size // 8) ** 2


@pytest.mark.parametrize("preset", VL_PRESETS)
def test_outputs_match_the_contract(preset: str) -> None:
    model = probe_model(preset).eval()
    out = model.encoder(make_batch())
    blocks = resolve(tiny(preset))
    P, F = visual_tokens(blocks), model.encoder.visual_embeddings.feature_size
    assert set(out) >= model.encoder.provides - CAPABILITIES
    assert out["text_hidden"].shape == (B, T, D) and out["image_hidden"].shape == (B, P, D)
    assert out["image_feats"].shape == (B, P, F)
    assert out["image_labels"].dtype == torch.long and out["image_labels"].shape == (B, P)
    assert out["image_mask"].dtype == torch.bool and out["image_mask"].shape == (B, P)
    assert not out["image_masked"].any() and out["moe_aux"].item() == 0.0 and out["moe_counts"] is None
    if blocks.visual == "region":  # [whole image, objects]: classes and real-ness from the scene
        assert out["image_labels"][1].tolist() == [-1, 0, 2, -1]
        assert out["image_mask"][2].tolist() == [True, True, False, False]
    if "pooled" in model.encoder.provides:
        assert out["pooled"].shape == (B, D)
    if "text_embed" in model.encoder.provides:  # CLIP, and the single-stream unimodal passes
        assert out["text_embed"].shape == out["image_embed"].shape == (B, D)
        assert torch.allclose(out["image_embed"].norm(dim=-1), torch.ones(B), atol=1e-5)
        assert torch.allclose(out["text_embed"].norm(dim=-1), torch.ones(B), atol=1e-5)
        assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP's init


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("objectives", ["probe", "defaults"])
def test_forward_backward_reaches_every_parameter(preset: str, objectives: str) -> None:
    if objectives == "probe" and preset not in VL_PRESETS:
        pytest.skip("the probe reads the vision-language outputs")
    model = probe_model(preset) if objectives == "probe" else build_pretrainer(
        tiny(preset), MoEConfig(), None, TEXT, IMAGE)
    out = model(make_batch())
    assert torch.isfinite(out["loss"])
    if objectives == "defaults":
        assert set(out["losses"]) == set(PRESETS[preset].default_objectives(OBJECTIVES))
    out["loss"].backward()
    # every trainable parameter (DALL-E's frozen dVAE has none to reach)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()] == []


@pytest.mark.parametrize("preset", ["vilbert", "lxmert", "clip", "interbert"])
def test_every_ffn_can_be_moe_at_its_depth(preset: str) -> None:
    dense = probe_model(preset)
    ffns = sum(1 for m in dense.modules() if hasattr(m, "is_moe"))
    depth = resolve(tiny(preset)).depth
    moe = MoEConfig(num_experts=4, layers="all", capacity_factor=4.0, min_capacity=0)
    model = probe_model(preset, moe)
    assert model.encoder.num_moe_layers == ffns
    out = model(make_batch())
    assert out["moe_counts"].shape == (ffns, 4) and out["losses"]["moe_aux"] > 0
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # indices count FFN depth from the input: the deepest one is depth - 1
    assert probe_model(preset, MoEConfig(num_experts=4, layers=[depth - 1])).encoder.num_moe_layers >= 1
    assert probe_model(preset, MoEConfig(num_experts=4, layers=[depth])).encoder.num_moe_layers == 0


def _perturbed_image(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return batch | {"image": batch["image"] + torch.randn_like(batch["image"])}


@pytest.mark.parametrize("preset, text_only", [("vilbert", "text_layers"), ("lxmert", "text_layers")])
def test_co_attention_mixes_the_streams(preset: str, text_only: str) -> None:
    model = probe_model(preset).eval()
    seen: list[Tensor] = []
    getattr(model.encoder, text_only)[-1].register_forward_hook(lambda m, a, out: seen.append(out))
    batch = make_batch()
    a, b = model.encoder(batch), model.encoder(_perturbed_image(batch))
    assert not torch.allclose(a["text_hidden"], b["text_hidden"], atol=1e-4)  # the image reached the text
    assert torch.equal(seen[0], seen[1])  # the text-only layers never see it


def test_a_dual_encoder_never_mixes() -> None:
    model = probe_model("clip").eval()
    batch = make_batch()
    a, b = model.encoder(batch), model.encoder(_perturbed_image(batch))
    assert torch.equal(a["text_hidden"], b["text_hidden"]) and torch.equal(a["text_embed"], b["text_embed"])
    assert not torch.allclose(a["image_embed"], b["image_embed"], atol=1e-4)


@pytest.mark.parametrize("preset", ["uniter", "oscar", "vilbert", "lxmert", "interbert", "pixel-bert"])
def test_causal_text_leaks_nothing_from_later_words(preset: str) -> None:
    model = probe_model(preset).eval()
    batch = make_batch()
    later = batch | {"input_ids": batch["input_ids"].clone()}
    later["input_ids"][:, 4:] = 7  # change every word from position 4 on
    a = model.encoder(batch, causal_text=True)
    b = model.encoder(later, causal_text=True)
    assert torch.allclose(a["text_hidden"][:, :4], b["text_hidden"][:, :4], atol=1e-6)
    assert torch.allclose(a["image_hidden"], b["image_hidden"], atol=1e-6)  # the image never reads the text
    full = model.encoder(later)
    assert not torch.allclose(a["text_hidden"][:, :4], full["text_hidden"][:, :4], atol=1e-4)


def test_visual_mask_zeroes_features_and_is_reported() -> None:
    model = probe_model("uniter").eval()
    batch = make_batch()
    mask = torch.zeros(B, 1 + R, dtype=torch.bool)
    mask[:, 1] = True
    out = model.encoder(batch, visual_mask_BP=mask)
    assert out["image_feats"][:, 1].abs().sum() == 0 and out["image_feats"][:, 2].abs().sum() > 0
    assert torch.equal(out["image_masked"], mask)
    assert model.encoder.num_visual_tokens(batch) == 1 + R
    with pytest.raises(ValueError, match=r"visual_mask has shape \(4, 2\); this input has \[B, P\] = \[4, 4\]"):
        model.encoder(batch, visual_mask_BP=mask[:, :2])


def test_patch_labels_are_the_class_covering_the_patch_centre() -> None:
    out = probe_model("vilt").eval().encoder(make_batch())
    # 2x2 grid of 8-px patches; sample 0 has class 1 top-left and class 3 bottom-right
    assert out["image_labels"][0].tolist() == [1, -1, -1, 3]
    assert out["image_feats"].shape[-1] == C * 8 * 8


def test_pixel_bert_samples_grid_cells_only_in_training() -> None:
    model = probe_model("pixel-bert", patch_size=4, pixel_sample=0.25)  # 4x4 grid, keep 4 cells
    batch = make_batch()
    model.train()
    assert model.encoder(batch)["image_hidden"].shape == (B, 4, D)
    model.eval()
    assert model.encoder(batch)["image_hidden"].shape == (B, 16, D)
    assert model.num_visual_tokens == 4


def test_precomputed_region_features_are_read_from_the_batch() -> None:
    model = probe_model("uniter", region_source="precomputed", region_feature_size=10).eval()
    batch = make_batch()
    with pytest.raises(ValueError, match="needs the batch column 'region_boxes'"):
        model.encoder(batch)
    feats = torch.randn(B, R, 10)
    out = model.encoder(batch | {"region_feats": feats, "region_boxes": batch["obj_boxes"],
                                 "region_labels": batch["obj_labels"] + 10})
    real = (batch["obj_labels"] >= 0)[..., None].float()
    mean = (feats * real).sum(1) / real.sum(1)  # the [IMG] token: mean of the real regions (ViLBERT)
    assert torch.allclose(out["image_feats"][:, 0], mean, atol=1e-6)
    assert out["image_labels"][0].tolist() == [-1, 11, 13, 9]


def test_itm_view_moves_boxes_with_the_image() -> None:
    batch = make_batch()
    batch["image"] = torch.arange(B, dtype=torch.float).view(B, 1, 1, 1).expand(B, C, 16, 16).clone()
    view = VIEWS["itm_pairs"](batch, TEXT, torch.Generator().manual_seed(0))
    source = view["image"][:, 0, 0, 0].long()
    assert (source != torch.arange(B)).any()
    assert torch.equal(view["obj_boxes"], batch["obj_boxes"][source])
    assert torch.equal(view["obj_labels"], batch["obj_labels"][source])


def test_caption_view_predicts_the_next_token_causally() -> None:
    batch = make_batch()
    view = VIEWS["caption"](batch, TEXT)
    assert CAUSAL_TEXT in view and VISUAL_MASK not in view
    assert view["caption_labels"][2, :7].tolist() == batch["input_ids"][2, 1:8].tolist()[:6] + [-100]
    assert view["caption_labels"][0, -1] == -100
    assert set(encoder_inputs(batch)) == {"image", "input_ids", "attention_mask", "obj_boxes", "obj_labels"}


def test_itc_of_aligned_embeddings_is_near_zero_and_of_shuffled_ones_large() -> None:
    itc = OBJECTIVES["itc"](None)  # type: ignore[arg-type]
    e = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    aligned, _ = itc({"text_embed": e, "image_embed": e, "logit_scale": torch.tensor(100.0)}, {})
    shuffled, metrics = itc({"text_embed": e.roll(1, 0), "image_embed": e, "logit_scale": torch.tensor(100.0)}, {})
    assert aligned["itc"] < 0.05 and shuffled["itc"] > 5 and metrics["itc_acc"] == 0.0


# ---------------------------------------------------------------- parameter counts in closed form

def _lin(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def _layer(d: int, f: int) -> int:  # LN + self-attention + LN + FFN
    return 2 * d + _lin(d, 3 * d) + _lin(d, d) + 2 * d + _lin(d, f) + _lin(f, d)


def _cross(d: int) -> int:  # query LN + context LN + cross-attention (q, kv, out)
    return 4 * d + _lin(d, d) + _lin(d, 2 * d) + _lin(d, d)


def _ffn_sub(d: int, f: int) -> int:
    return 2 * d + _lin(d, f) + _lin(f, d)


def _visual(cfg: ModelConfig, b: Blocks) -> int:
    d, p = cfg.hidden_size, cfg.patch_size
    cells = (IMAGE.size // p) ** 2
    if b.visual == "patch":
        return _lin(C * p * p, d) + cells * d + d
    if b.visual == "pixel":
        w, n = b.pixel_channels, p.bit_length() - 1
        return _lin(C * 9, w) + (n - 1) * _lin(w * 9, w) + _lin(w, d) + cells * d + d
    w = b.region_feature_size
    stem = {"crop_pool": 0, "precomputed": 0, "conv_stem": _lin(C * 9, w // 2) + _lin(w // 2 * 9, w)}[b.region_source]
    feats = C * b.region_pool**2 if b.region_source == "crop_pool" else w
    return stem + _lin(feats, d) + _lin(5, d) + 2 * d + d


def closed_form(cfg: ModelConfig, image_out: bool, pooled: bool, contrastive: bool) -> int:
    """Encoder parameters from the config alone (independent of the modules)."""
    b, d, V = resolve(cfg), cfg.hidden_size, TEXT.vocab_size
    f = int(d * cfg.mlp_ratio)
    n = V * d + TEXT.max_len * d + d + 2 * d + _visual(cfg, b)  # text embeddings + visual input
    if b.family == "single":
        n += b.joint * _layer(d, f) + 2 * d + (cfg.object_classes * d + 3 * d if b.object_tags else 0)
    elif b.family == "interaction":  # the image stream serves image states and the image embedding
        n += (b.joint + b.text) * _layer(d, f) + 2 * d
        n += b.visual_layers * _layer(d, f) + 2 * d if image_out or contrastive else 0
    elif b.family == "coattention":
        block_side = _cross(d) + _ffn_sub(d, f) + _layer(d, f)
        n += b.text * _layer(d, f) + b.cross * block_side + (b.cross - (0 if image_out else 1)) * block_side
        n += 2 * d + (2 * d if image_out else 0)
    elif b.family == "cross":
        n += (b.text + b.visual_layers) * _layer(d, f) + b.cross * (_cross(d) + _layer(d, f))
        n += (b.cross - (0 if image_out else 1)) * _layer(d, f) + 2 * d + (2 * d if image_out else 0)
    else:  # dual: text tower + ln_final; [CLS] + its position + ln_pre + image tower + ln_post
        n += b.text * _layer(d, f) + 2 * d + (d + d + 2 * d + b.visual_layers * _layer(d, f) + 2 * d)
    if contrastive:  # text_proj, image_proj (no bias), logit_scale_log
        n += 2 * d * b.embed_dim + 1
    if pooled:
        n += _lin(d, d) * (2 if b.family == "coattention" else 1)
    return n


_HEADS = {"mlm": lambda d: _lin(d, d) + 2 * d + TEXT.vocab_size, "itm": lambda d: _lin(d, 2),
          "caption": lambda d: _lin(d, d) + 2 * d + TEXT.vocab_size, "itc": lambda d: 0}


def _contrastive_family(cfg: ModelConfig) -> bool:
    """Families that can provide the contrastive outputs (the probe then builds them)."""
    return resolve(cfg).family in ("single", "interaction", "dual")


@pytest.mark.parametrize("preset", VL_PRESETS)
def test_parameter_count_matches_the_closed_form(preset: str) -> None:
    dual = resolve(tiny(preset)).family == "dual"
    assert count_parameters(probe_model(preset).encoder) == closed_form(tiny(preset), True, not dual,
                                                                        _contrastive_family(tiny(preset)))
    # the heads with a closed form here (region/alignment heads are counted in test_objectives_*)
    defaults = {o: w for o, w in PRESETS[preset].default_objectives(OBJECTIVES).items() if o in _HEADS}
    model = build_pretrainer(tiny(preset), MoEConfig(), defaults, TEXT, IMAGE)
    # ViLBERT's pooled reads the image stream; LXMERT's and InterBERT's do not (their last image side is left out)
    image_out = preset == "vilbert" or dual
    expected = closed_form(tiny(preset), image_out, "itm" in defaults, dual) + sum(_HEADS[o](D) for o in defaults)
    assert count_parameters(model) == expected


@pytest.mark.parametrize("overrides", [
    {"preset": "uniter", "region_source": "conv_stem", "region_pool": 2, "region_feature_size": 12},
    {"preset": "lxmert", "text_layers": 2, "visual_layers": 3, "cross_layers": 2},
    {"preset": "vilbert", "text_layers": 0, "cross_layers": 3},
    {"preset": "clip", "visual_input": "pixel", "embed_dim": 8, "text_layers": 1, "pixel_channels": 6},
    {"preset": "oscar", "object_classes": 7},
    {"preset": "vilt", "embed_dim": 8},
    {"preset": "interbert", "embed_dim": 6, "visual_layers": 2},
])
def test_parameter_count_follows_block_overrides(overrides: dict[str, object]) -> None:
    cfg = tiny(**overrides)  # type: ignore[arg-type]
    dual = resolve(cfg).family == "dual"
    assert count_parameters(probe_model(**overrides).encoder) == closed_form(  # type: ignore[arg-type]
        cfg, True, not dual, _contrastive_family(cfg))


# ---------------------------------------------------------------- clear errors

def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'unitr'; known presets: \['clip', .*'vl-bert'\]"):
        build_pretrainer(tiny("unitr"), MoEConfig(), None, TEXT, IMAGE)


@pytest.mark.parametrize("overrides, message", [
    ({"preset": "vilt", "visual_input": "region"},
     "visual_input='region' does not fit preset 'vilt' (Kim et al. 2021); allowed: patch"),
    ({"preset": "uniter", "cross_layers": 2},
     "cross_layers=2 does not fit preset 'uniter' (single encoder, region input); block fields it takes: "
     "embed_dim, mask_pixels, object_tags, region_feature_size, region_pool, region_source"),
    ({"preset": "vilbert", "object_tags": True}, "object_tags=True does not fit preset 'vilbert'"),
    ({"preset": "vilt", "region_pool": 3}, "region_pool=3 does not fit preset 'vilt' (single encoder, patch input)"),
    ({"preset": "uniter", "region_source": "precomputed"}, "region_source='precomputed' needs region_feature_size"),
    ({"preset": "pixel-bert", "patch_size": 6}, "patch_size=6 with pixel input: the pixel CNN downsamples by stride-2 convolutions, so patch_size must be a power of 2 >= 2"),
    ({"preset": "clip", "text_layers": 0}, "a dual encoder needs both towers"),
    ({"preset": "vilt", "mask_pixels": True}, "mask_pixels=True does not fit preset 'vilt' (single encoder, patch input)"),
    ({"preset": "uniter", "region_source": "precomputed", "region_feature_size": 8, "mask_pixels": True},
     "mask_pixels=True needs region features computed from pixels (region_source crop_pool or conv_stem)"),
])
def test_blocks_that_do_not_fit_are_config_errors(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny(**overrides)  # type: ignore[arg-type]


def test_mask_pixels_is_vl_berts_default_where_there_are_pixels() -> None:
    assert resolve(tiny("vl-bert")).mask_pixels  # Su et al. 2020, §3.2
    assert not resolve(tiny("uniter")).mask_pixels and resolve(tiny("uniter", mask_pixels=True)).mask_pixels
    assert not resolve(tiny("vl-bert", mask_pixels=False)).mask_pixels
    # precomputed features have no pixels: the preset's default steps aside (setting it is an error)
    assert not resolve(tiny("vl-bert", region_source="precomputed", region_feature_size=8)).mask_pixels
    assert not resolve(tiny("vilt")).mask_pixels


@pytest.mark.parametrize("preset, objective, missing", [
    ("clip", "itm", "'pooled'"), ("clip", "caption", "'cross_modal'"), ("vilbert", "itc", "'image_embed'"),
    ("lxmert", "itc", "'image_embed'")])
def test_objectives_a_preset_cannot_serve_are_named(preset: str, objective: str, missing: str) -> None:
    from models.factory import objective_problems

    ((field, weight, allowed),) = objective_problems(tiny(preset), {objective: 1.0, "mlm": 0.0})
    assert (field, weight) == (f"objectives.{objective}", 1.0)
    assert allowed.startswith(f"needs {missing}") and f"which preset {preset!r}" in allowed
    with pytest.raises(ValueError, match=f"objective {objective!r} needs .*which preset {preset!r} does not provide; "
                                         "objectives that fit it: "):
        build_pretrainer(tiny(preset), MoEConfig(), {objective: 1.0}, TEXT, IMAGE)


def test_quickstart_with_clip_is_a_config_error_naming_the_fitting_objectives() -> None:
    from orchestrator.config import ConfigError, load_config
    from tests.integration.conftest import QUICKSTART

    with pytest.raises(ConfigError) as exc:
        load_config(QUICKSTART, ["model.preset=clip"])
    assert exc.value.problems == ["objectives.itm = 1.0: needs 'pooled', which preset 'clip' (dual encoder) does "
                                  "not provide; objectives that fit it: itc, mlm, mlm_wwm, msm"]
    assert load_config(QUICKSTART, ["model.preset=clip", "objectives={itc: 1.0}"]).active_objectives == {"itc": 1.0}


def test_precomputed_regions_are_parsed_from_sample_metadata() -> None:
    import json

    from jobs.data.regions import precomputed_regions

    meta = json.dumps({"features": [[1.0, 2.0], [3.0, 4.0]], "boxes": [[0, 0, 50, 100], [50, 0, 100, 50]],
                       "labels": [7, 9], "image_w": 100, "image_h": 100})
    feats, boxes, labels = precomputed_regions(meta, 3)
    assert feats.tolist() == [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]
    assert boxes.tolist() == [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]]
    assert labels.tolist() == [7, 9, -1]
    assert precomputed_regions(json.dumps({"scene": {}}), 3) is None


@pytest.mark.parametrize("preset", ["uniter", "vl-bert", "pixel-bert", "vilbert", "clip"])
def test_bf16_forward_backward(preset: str) -> None:
    """DeepSpeed's bf16 mode casts the model and the image; boxes and labels stay as they are."""
    model = probe_model(preset).to(torch.bfloat16)
    batch = make_batch()
    batch["image"] = batch["image"].to(torch.bfloat16)
    out = model(batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_models_list_and_show_on_the_command_line() -> None:
    from typer.testing import CliRunner

    from orchestrator.cli.main import app

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list", "--set", "model.hidden_size=32", "--set", "model.num_layers=2",
                                 "--set", "model.num_heads=2"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    rows = {line.split("│")[1].strip(): line for line in listed.output.splitlines() if line.count("│") >= 5}
    assert set(PRESETS) <= set(rows)
    assert "co-attention" in rows["vilbert"] and "region + tags" in rows["oscar"] and "itc" in rows["clip"]
    shown = runner.invoke(app, ["models", "show", "vl-bert"])
    assert shown.exit_code == 0 and "conv_stem" in shown.output
    unknown = runner.invoke(app, ["models", "show", "unitr"])
    assert unknown.exit_code == 2 and "unknown preset 'unitr'; known presets: clip, " in unknown.output


def test_moe_layer_indices_are_checked_against_the_ffn_depth() -> None:
    from orchestrator.config import ConfigError, load_config
    from tests.integration.conftest import QUICKSTART

    base = ["model.preset=vilbert", "model.num_layers=2"]  # 1 text layer + 1 co-attention block: depths 0-2
    assert load_config(QUICKSTART, [*base, "moe.layers=[2]"]).moe.layers == [2]
    with pytest.raises(ConfigError, match=r"moe.layers = \[3\]"):
        load_config(QUICKSTART, [*base, "moe.layers=[3]"])
