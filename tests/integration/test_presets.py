"""Every architecture preset trains through `mmpt run --set model.preset=NAME` on the shapes data:
2 steps on 2 Ray Train workers, with its paper's objectives that exist, MoE FFNs included; and every
pretraining objective trains through the same runs and is evaluated on the held-out split.

Objectives ride along with the presets (a run costs ~30 s here; a run per objective would take
minutes): `OBJECTIVE_CASES` adds a group of objectives to a preset that provides their inputs,
and that preset's run also evaluates and checks the group's held-out metrics.

A Ray Train run costs ~20-30 s here, so one run per distinct network: presets whose blocks resolve
identically and whose objectives need the same encoder parts (VisualBERT, Unicoder-VL, UNITER,
ImageBERT: single-stream over crop-pooled regions with a pooler; they differ only in their papers'
objectives) train once, as the first of them in PRESETS order (`_trained_twin`, decided from the
configs alone, so a case does the same whichever cases run and in what order); the others load
through the same config path, build a network of exactly the same parameters as that twin's, and
take one forward + backward step with their own objectives in process (the objectives themselves
are trained through `mmpt run` by the objectives' integration tests).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from models import OBJECTIVES, PRESETS, build_pretrainer
from models.blocks import Blocks, resolve
from models.config import ImageSpec, TextSpec
from orchestrator.config import load_config
from orchestrator.run.runner import run
from tests.integration.conftest import QUICKSTART, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# preset -> (objectives it trains besides its own, eval keys the run must produce besides loss)
OBJECTIVE_CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vilt": (("mlm", "itm", "wpa"), ("mlm_acc", "mlm_token_acc", "mlm_grounded_acc", "mlm_blind_acc",
                                     "mlm_blind_grounded_acc", "mlm_grounding_gain", "itm_acc", "i2t_r1",
                                     "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r10", "wpa_gap")),
    "uniter": (("mrfr", "mrc_kl", "moc", "wra"), ("mrfr_masked", "mrc_kl_acc", "moc_acc", "wra_gap")),
    "interbert": (("msm",), ("msm_acc",)),
    # VL-BERT zeroes a masked RoI's pixels (mask_pixels, the preset's default) for mrc; mlm_wwm and
    # sgp need the tokenizer's "##" pieces and scene words, which the driver fills (plan_data)
    "vl-bert": (("mrc", "mlm_wwm", "sgp", "itm_hard"), ("mrc_acc", "mlm_wwm_acc", "sgp_obj_acc", "sgp_attr_acc",
                                                       "sgp_rel_acc", "itm_hard_acc")),
    "clip": (("itc",), ("itc_acc", "itc_i2t_r1", "itc_i2t_r10", "itc_t2i_r1", "itc_candidates")),
    "unimo": (("caption",), ("caption_acc",)),
}

# preset -> training options its run also exercises through mmpt run (no extra run for them)
OPTION_CASES: dict[str, dict[str, object]] = {
    # dense ZeRO-3 (parameters partitioned; MoE layers cannot be) with every layer recomputed in
    # backward and one adversarial ascent step on the embeddings per micro-batch
    "oscar": {"moe.num_experts": 0, "deepspeed.zero_stage": 3, "train.activation_checkpointing": True,
              "train.adversarial.steps": 1, "train.adversarial.norm_bound": 0.1},
}


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


# The generative stages' objectives train in tests/integration/test_dalle.py (the dVAE, then DALL-E on it).
TRAINED_IN_TEST_DALLE = ("dvae", "dalle")


def test_every_objective_has_a_case() -> None:
    cases = [o for objectives, _ in OBJECTIVE_CASES.values() for o in objectives]
    assert sorted(cases + list(TRAINED_IN_TEST_DALLE)) == sorted(OBJECTIVES)


TRAINED_PRESETS = [p for p in PRESETS if PRESETS[p].family not in ("dvae", "dalle")]


def _config(preset: str, data: Any, storage: Any) -> tuple[Any, dict[str, float], tuple[str, ...]]:
    """(run config, objectives, eval keys the run must produce) of `preset`'s case."""
    extra, eval_keys = OBJECTIVE_CASES.get(preset, ((), ()))
    objectives = PRESETS[preset].default_objectives(OBJECTIVES) | dict.fromkeys(extra, 1.0)
    overrides = tiny(data, storage, name=f"preset-{preset}", **{
        "model.preset": preset, "objectives": "{" + ", ".join(f"{k}: {w}" for k, w in objectives.items()) + "}",
        "train.steps": 2, "train.log_every": 1, "train.checkpoint_every": 0,
        **({"eval.max_samples": 16, "eval.batch_size": 8} if eval_keys else {"data.eval": "[]"}),
        **OPTION_CASES.get(preset, {})})
    return load_config(QUICKSTART, overrides), objectives, eval_keys


def _always_trains(preset: str) -> bool:
    """Cases that check held-out metrics or training options go through mmpt run themselves."""
    return preset in OBJECTIVE_CASES and bool(OBJECTIVE_CASES[preset][1]) or preset in OPTION_CASES


def _network(cfg: Any) -> tuple[Blocks, frozenset[str]]:
    """What makes two presets' runs the same network: the resolved blocks and the encoder parts built."""
    return resolve(cfg.model), _dense_model(cfg).encoder.provides


def _trained_twin(preset: str, data: Any, storage: Any) -> str | None:
    """The earlier preset whose own case trains `preset`'s network through mmpt run; None when `preset`
    is the first with its network (or always trains), and so trains it itself."""
    if _always_trains(preset):
        return None
    key = _network(_config(preset, data, storage)[0])
    for other in TRAINED_PRESETS[: TRAINED_PRESETS.index(preset)]:
        if not _always_trains(other) and _network(_config(other, data, storage)[0]) == key:
            return other
    return None


def _check_eval(ev: dict[str, float], cfg: Any) -> None:
    """Held-out figures that are rates are rates, recall grows with r, and the counts are the split's."""
    assert ev["samples"] == cfg.eval.max_samples and ev["loss"] > 0, ev
    for k, v in ev.items():
        if k.endswith("_acc") or "_r1" in k or "_r5" in k or "_r10" in k:
            assert 0.0 <= v <= 1.0, (k, v)
    for prefix in ("i2t", "t2i", "itc_i2t", "itc_t2i"):
        if f"{prefix}_r1" in ev:
            assert ev[f"{prefix}_r1"] <= ev[f"{prefix}_r5"] <= ev[f"{prefix}_r10"], prefix
            assert ev[f"{prefix}_r1"] >= 0.0
    if "candidates" in ev:  # ITM retrieval ranks within each eval batch
        assert ev["candidates"] == cfg.eval.batch_size and ev["chance_r1"] >= 1 / cfg.eval.batch_size - 1e-9
    if "itc_candidates" in ev:  # ITC retrieval ranks the whole split
        assert ev["itc_candidates"] == ev["samples"] and ev["itc_images"] * ev["captions_per_image"] == pytest.approx(
            ev["itc_candidates"])
    if "mlm_grounded_acc" in ev:
        assert ev["mlm_grounding_gain"] == pytest.approx(ev["mlm_grounded_acc"] - ev["mlm_blind_grounded_acc"])
        assert 0 < ev["mlm_grounded_tokens"] <= ev["samples"] * cfg.data.max_text_len


# DALL-E's two stages train in order (the second reads the first's checkpoint): test_dalle.py.
@pytest.mark.parametrize("preset", TRAINED_PRESETS)
def test_every_preset_trains(ray_session, shapes_data, tmp_path, preset: str) -> None:  # noqa: ANN001
    cfg, objectives, eval_keys = _config(preset, shapes_data, tmp_path)
    twin = _trained_twin(preset, shapes_data, tmp_path)
    if twin is not None:  # the same network trains through mmpt run in `twin`'s case
        model = _dense_model(cfg)
        twin_params = {n: p.shape for n, p in _dense_model(_config(twin, shapes_data, tmp_path)[0]).encoder.named_parameters()}
        assert {n: p.shape for n, p in model.encoder.named_parameters()} == twin_params
        out = model(_batch(cfg))
        out["loss"].backward()
        assert set(out["losses"]) == set(objectives) and torch.isfinite(out["loss"])
        assert all(v.item() > 0 for v in out["losses"].values()), out["losses"]  # untrained: no term is solved
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
        return
    result = run(cfg)
    summary, rows = result.summary, result.metrics
    assert summary["steps"] == 2
    losses = summary["final_losses"]
    # tiny() keeps quickstart's MoE (every other FFN); every family has an FFN at depth 1
    options = OPTION_CASES.get(preset, {})
    expected = {*objectives, "total"} | ({"moe_aux"} if options.get("moe.num_experts", 1) else set())
    assert set(losses) == expected | ({"adv"} if options.get("train.adversarial.steps") else set())
    assert all(math.isfinite(v) for v in losses.values()), losses
    if options.get("train.adversarial.steps"):
        assert all(0 < r["train/adv_delta_norm"] <= 0.1 + 1e-6 for r in rows)  # within the norm bound
    if "deepspeed.zero_stage" in options:
        assert summary["memory"]["zero_stage"] == options["deepspeed.zero_stage"]
    for name in objectives:  # every term at every step
        assert [r["step"] for r in rows if f"loss/{name}" in r] == [1, 2], name
    if eval_keys:
        ev = {k.removeprefix("eval/"): v for k, v in rows[-1].items() if k.startswith("eval/")}
        assert set(eval_keys) <= set(ev), set(eval_keys) - set(ev)
        assert all(math.isfinite(ev[k]) for k in eval_keys), ev
        assert summary["eval"] == ev  # the summary reports the last evaluation
        _check_eval(ev, cfg)
