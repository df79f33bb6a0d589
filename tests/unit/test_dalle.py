"""DALL-E's two stages on tiny models: the dVAE round trip and its schedules, the decoder's causal
mask, its 1:7 loss, seeded generation, MoE inside it, and the shapes-world judge of generated images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import build_pretrainer
from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.generative_config import DVAEConfig
from models.objectives.dvae import code_usage, kl_to_uniform
from tests.unit.conftest import build, tiny

TEXT = TextSpec(vocab_size=40, max_len=10)
IMAGE = ImageSpec(size=32)
B, K = 3, 16
DVAE = {"codebook_size": K, "downsample": 8, "channels": 8, "codebook_dim": 8, "anneal_steps": 10}


# the tiny generative stages: 2 decoder layers, no dropout, a 16-entry codebook over a 4x4 grid
SIZE = {"num_layers": 2, "dropout": 0.0, "dvae": DVAE}


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TEXT.vocab_size, (B, 8), generator=g)
    ids[:, 0], ids[:, 5], ids[:, 6:] = TEXT.cls_id, TEXT.sep_id, TEXT.pad_id
    return {"image": torch.rand(B, 3, IMAGE.size, IMAGE.size, generator=g) * 2 - 1, "input_ids": ids,
            "attention_mask": (ids != TEXT.pad_id).long()}


def dalle(moe: MoEConfig | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return build("dalle", None, moe, text=TEXT, image=IMAGE, **SIZE)


def test_dvae_round_trip_shapes() -> None:
    model = build("dvae", text=TEXT, image=IMAGE, **SIZE)
    vae, image = model.encoder.vae, batch()["image"]
    assert vae.encode(image).shape == (B, K, 4, 4)
    codes = vae.codes(image)
    assert codes.shape == (B, 16) and codes.dtype == torch.long and int(codes.max()) < K
    assert vae.decode_codes(codes).shape == image.shape
    out = model.encoder(batch())
    assert out["dvae_recon"].shape == image.shape and out["dvae_logits"].shape == (B, K, 4, 4)
    assert model.num_visual_tokens == 16


def test_codebook_usage_and_kl_to_the_uniform_prior() -> None:
    used, perplexity = code_usage(torch.arange(K).repeat(2, 1), K)
    assert used.item() == 1.0 and perplexity.item() == pytest.approx(K, rel=1e-5)
    used, perplexity = code_usage(torch.zeros(2, 8, dtype=torch.long), K)
    assert used.item() == 1 / K and perplexity.item() == pytest.approx(1.0)
    assert kl_to_uniform(torch.zeros(2, K, 3, 3)).item() == pytest.approx(0.0, abs=1e-6)
    peaked = torch.full((2, K, 3, 3), -1e4)
    peaked[:, 0] = 0
    assert kl_to_uniform(peaked).item() == pytest.approx(math.log(K), rel=1e-4)
    # the model's metric counts the distinct argmax codes of the batch
    model = build("dvae", text=TEXT, image=IMAGE, **SIZE).eval()
    out = model(batch())
    distinct = model.encoder.vae.codes(batch()["image"]).unique().numel()
    assert out["metrics"]["dvae_codes_used"].item() == pytest.approx(distinct / K)


def test_temperature_anneals_over_training_forwards_only() -> None:
    model = build("dvae", text=TEXT, image=IMAGE, **(SIZE | {"dvae": DVAE | {"kl_warmup_steps": 4}}))
    vae = model.encoder.vae
    assert vae.temperature(0).item() == pytest.approx(1.0)
    assert vae.temperature(5).item() == pytest.approx((1 + 1 / 16) / 2)  # cosine midpoint
    assert vae.temperature(10).item() == pytest.approx(1 / 16) and vae.temperature(99).item() == pytest.approx(1 / 16)
    assert vae.kl_weight(2).item() == pytest.approx(DVAEConfig().kl_weight / 2)
    taus = []
    for _ in range(3):
        out = model(batch())
        out["loss"].backward()
        taus.append(out["metrics"]["dvae_tau"].item())
    assert vae.updates.item() == 3 and taus[0] == 1.0 and taus[0] > taus[1] > taus[2]
    with torch.no_grad():
        model.eval()(batch())
    assert vae.updates.item() == 3  # evaluation does not advance the schedule
    assert model.state_dict()["encoder.vae.updates"].item() == 3  # checkpointed with the weights


def test_decoder_is_causal_no_token_sees_a_later_one() -> None:
    model = dalle().eval()
    enc = model.encoder
    b = batch()
    codes = torch.randint(0, K, (B, enc.num_image_tokens), generator=torch.Generator().manual_seed(1))
    base = enc({**b, "image_codes": codes})
    # a later image token (index 9 of 16): image predictions 0..9 (read tokens 0..8) stay, later ones move
    later = codes.clone()
    later[:, 9] = (later[:, 9] + 1) % K
    moved = enc({**b, "image_codes": later})
    torch.testing.assert_close(moved["image_logits"][:, :10], base["image_logits"][:, :10])
    torch.testing.assert_close(moved["text_logits"], base["text_logits"])
    assert not torch.allclose(moved["image_logits"][:, 10:], base["image_logits"][:, 10:])
    # a later text token (position 3): text predictions 0..2 stay; everything after it moves
    ids = b["input_ids"].clone()
    ids[:, 3] = (ids[:, 3] + 1 - 5) % (TEXT.vocab_size - 5) + 5
    moved = enc({**b, "input_ids": ids, "image_codes": codes})
    torch.testing.assert_close(moved["text_logits"][:, :3], base["text_logits"][:, :3])
    assert not torch.allclose(moved["text_logits"][:, 3:], base["text_logits"][:, 3:])
    assert not torch.allclose(moved["image_logits"], base["image_logits"])


def test_loss_weighs_text_and_image_one_to_seven() -> None:
    model = dalle()
    out = model(batch())
    m = out["metrics"]
    assert out["loss"].item() == pytest.approx(m["dalle_text_ce"].item() / 8 + 7 * m["dalle_image_ce"].item() / 8,
                                               rel=1e-5)
    enc_out = model.encoder(batch())
    assert enc_out["image_logits"].shape == (B, 16, K) and enc_out["text_logits"].shape == (B, TEXT.max_len - 1, 40)
    assert (enc_out["text_labels"][:, 5:] == -100).all()  # padding predicts nothing
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder.vae.parameters())  # the dVAE stays frozen
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_generation_is_a_function_of_the_seed() -> None:
    enc = dalle().encoder
    b = batch()

    def sample(seed: int, **kw: object) -> torch.Tensor:
        return enc.generate(b["input_ids"], b["attention_mask"], generator=torch.Generator().manual_seed(seed), **kw)

    first = sample(7, top_k=4)
    assert first.shape == (B, 16) and int(first.max()) < K
    assert torch.equal(first, sample(7, top_k=4))
    assert not torch.equal(first, sample(8, top_k=4))
    # top_k=1 is greedy: the seed no longer matters
    assert torch.equal(sample(1, top_k=1), sample(2, top_k=1))
    assert enc.decode(first).shape == (B, 3, IMAGE.size, IMAGE.size)
    with pytest.raises(ValueError, match="temperature=0"):
        sample(0, temperature=0)


def test_moe_layers_work_in_the_decoder() -> None:
    moe = MoEConfig(num_experts=4, layers="all", capacity_factor=4.0, min_capacity=0)
    model = dalle(moe)
    assert model.encoder.num_moe_layers == 2
    out = model(batch())
    assert out["moe_counts"].shape == (2, 4) and out["losses"]["moe_aux"] > 0
    # padding is not routed: the real caption tokens + the 15 image tokens the decoder reads, per sample
    real = int(batch()["attention_mask"].sum()) + B * 15
    assert out["moe_counts"][0].sum().item() == real
    out["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="model.dvae does not fit preset 'clip'"):
        ModelConfig(preset="clip", dvae={"codebook_size": 8})
    with pytest.raises(ValueError, match="downsample=6: .* power of 2"):
        DVAEConfig(downsample=6)
    with pytest.raises(ValueError, match="downsample=8 must divide data.image_size=36"):
        build("dvae", text=TEXT, image=ImageSpec(size=36), **SIZE)


def test_scene_judge_agrees_with_the_renderer() -> None:
    """Rendered scenes (64 px, JPEG, resized to 48 as the pipeline does) match their own captions and
    mostly not another scene's; random pixels match none."""
    import io

    from PIL import Image

    from jobs.data.synth import _encode_jpeg, make_sample
    from jobs.generative.scene_check import caption_objects, match_rates

    images, captions = [], []
    for i in range(60):
        image, caption, _ = make_sample(np.random.default_rng([0, 0, i]), 64)
        image = Image.open(io.BytesIO(_encode_jpeg(image))).convert("RGB").resize((48, 48), Image.Resampling.BICUBIC)
        images.append(np.asarray(image))
        captions.append(caption)
    assert caption_objects("a small red circle left of a large blue square") == {("red", "circle"), ("blue", "square")}
    assert match_rates(images, captions)["match"] >= 0.95
    assert match_rates(images, captions[1:] + captions[:1])["match"] <= 0.1
    noise = list(np.random.default_rng(0).integers(0, 256, (20, 48, 48, 3), dtype=np.uint8))
    assert match_rates(noise, captions[:20])["match"] == 0.0


def test_generation_probe_reports_rates_against_references() -> None:
    from jobs.generative.probe import generation_probe, reduce_probe

    model = dalle().eval()
    sums: dict[str, float] = {}

    def add(name: str, value: float | torch.Tensor) -> None:
        sums[name] = sums.get(name, 0.0) + float(value)

    made = generation_probe(model, batch(), lambda ids: ["a small red circle"] * ids.shape[0], add, limit=2, seed=0)
    assert made == 2 and sums["gen_samples"] == 2
    out: dict[str, float] = {}
    reduce_probe(sums, out)
    for prefix in ("gen", "random", "real", "recon", "shuffled"):
        assert 0.0 <= out[f"{prefix}_match_rate"] <= 1.0
    assert out["real_match_rate"] == 0.0  # random pixels show no red circle
    assert out["dvae_recon_mse"] > 0


def test_a_dvae_runs_evaluation_judges_its_reconstructions() -> None:
    """recon_match_rate: the dVAE's argmax reconstructions judged against the captions (here a dVAE
    whose tokens are the pixels, so the reconstructions are the rendered scenes themselves)."""
    from jobs.data.synth import make_sample
    from jobs.generative.probe import is_dvae, is_generative, reconstruction_probe, reduce_probe

    scenes = [make_sample(np.random.default_rng([1, i]), 48) for i in range(6)]
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im, _, _ in scenes])).permute(0, 3, 1, 2)
    captions = [c for _, c, _ in scenes]
    model = build("dvae", text=TEXT, image=ImageSpec(size=48), **SIZE).eval()
    assert is_dvae(model) and not is_generative(model) and not is_dvae(dalle())
    vae = model.encoder.vae
    vae.codes = lambda image: image  # type: ignore[method-assign]  # a lossless "codebook"
    vae.decode_codes = lambda codes: codes  # type: ignore[method-assign]
    batch = {"image": pixels.float() / 127.5 - 1, "input_ids": torch.zeros(6, 4, dtype=torch.long)}

    def judged(texts: list[str], limit: int) -> dict[str, float]:
        sums: dict[str, float] = {}

        def add(name: str, value: float | torch.Tensor) -> None:
            sums[name] = sums.get(name, 0.0) + float(value)

        assert reconstruction_probe(model, batch, lambda ids: texts[:ids.shape[0]], add, limit=limit) == min(limit, 6)
        out: dict[str, float] = {}
        reduce_probe(sums, out)
        return out

    right = judged(captions, limit=4)
    assert right["recon_samples"] == 4 and right["recon_match_rate"] == 1.0 and right["recon_color_match_rate"] == 1.0
    wrong = judged(captions[1:] + captions[:1], limit=10)
    assert wrong["recon_samples"] == 6 and wrong["recon_match_rate"] <= 1 / 6
    assert "gen_match_rate" not in wrong  # nothing generated in a dVAE run


def test_frozen_dvae_loads_the_dvae_runs_weights(tmp_path) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    from jobs.generative.frozen_dvae import dvae_tensors, load_frozen_dvae

    torch.manual_seed(3)
    stage1 = build("dvae", text=TEXT, image=IMAGE, **SIZE)
    path = tmp_path / "dvae.safetensors"
    save_file(dvae_tensors(stage1.state_dict()), str(path))
    model = dalle()
    cfg = tiny("dalle", dalle={"dvae_weights": str(path)}, **SIZE)
    assert load_frozen_dvae(model, cfg) == len(dvae_tensors(stage1.state_dict()))
    torch.testing.assert_close(model.encoder.vae.codebook_Ke, stage1.encoder.vae.codebook_Ke)
    assert not any(p.requires_grad for p in model.encoder.vae.parameters())
    with pytest.raises(ValueError, match="model.dalle.dvae_weights is not set"):
        load_frozen_dvae(model, tiny("dalle", **SIZE))


def test_clip_scores_rank_images_by_cosine() -> None:
    from jobs.config import RunConfig
    from jobs.data.tokenizer import text_spec, train_tokenizer
    from orchestrator.trained.generate import LoadedRun, clip_scores

    tok = train_tokenizer(["a small red circle", "a large blue square"] * 20, vocab_size=64)
    cfg = RunConfig.model_validate({"data": {"image_size": 16, "max_text_len": 8},
                                    "model": {"preset": "clip", "hidden_size": 16, "num_layers": 1, "num_heads": 2},
                                    "moe": {"num_experts": 0}, "objectives": {"itc": 1.0}})
    text = text_spec(tok, 8)
    model = build_pretrainer(cfg.model, cfg.moe, cfg.active_objectives, text, ImageSpec(size=16)).eval()
    clip = LoadedRun(cfg=cfg, model=model, tokenizer=tok, text=text)
    images = torch.rand(4, 3, 32, 32) * 2 - 1  # resized to the CLIP run's 16 px
    scores = clip_scores(clip, images, "a small red circle")
    assert len(scores) == 4 and all(-1.0 <= s <= 1.0 for s in scores)
    same = clip_scores(clip, images[[2, 2]], "a small red circle")
    assert same[0] == pytest.approx(scores[2], abs=1e-5)


def test_the_run_summary_shows_the_generation_figures_beside_random_tokens() -> None:
    import io

    from rich.console import Console

    from orchestrator.run.progress import summary_tables

    ev = {"samples": 64, "loss": 1.84, "gen_match_rate": 0.0625, "random_match_rate": 0.0,
          "gen_color_match_rate": 0.546875, "random_color_match_rate": 0.03125, "recon_match_rate": 0.40625,
          "real_match_rate": 0.953125, "dvae_recon_mse": 0.0166}
    out = io.StringIO()
    console = Console(file=out, width=100)
    for table in summary_tables({"final_losses": {"total": 1.7}, "eval": ev}):
        console.print(table)
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in out.getvalue().splitlines() if line.count("│") == 4}
    assert rows["gen_match_rate"] == ["0.0625", "0"] and rows["gen_color_match_rate"] == ["0.5469", "0.03125"]
    assert rows["recon_match_rate"] == ["0.4062", ""] and rows["real_match_rate"] == ["0.9531", ""]
    assert "dvae_recon_mse" in rows and "shuffled_match_rate" not in rows  # only what the run measured
