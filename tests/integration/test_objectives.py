"""Every pretraining objective trains alone through `orchestrator.runner.run` on the shapes data
(2 steps on 2 Ray Train workers, then the held-out evaluation) on a preset that provides its inputs."""

from __future__ import annotations

import math

import pytest

from models import OBJECTIVES
from orchestrator.config import load_config
from orchestrator.runner import run
from tests.integration.conftest import QUICKSTART, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# One run per preset, each training a group of objectives together (a run costs ~30 s here; one run
# per objective would take ~6 min): preset -> (objectives, eval keys the run must produce besides loss).
CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
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


def test_every_objective_has_a_case() -> None:
    assert sorted(o for objectives, _ in CASES.values() for o in objectives) == sorted(OBJECTIVES)


@pytest.mark.parametrize("preset", list(CASES))
def test_objectives_train_and_are_evaluated(ray_session, shapes_data, tmp_path, preset: str) -> None:  # noqa: ANN001
    objectives, eval_keys = CASES[preset]
    overrides = tiny(shapes_data, tmp_path, name=f"objectives-{preset}", **{
        "model.preset": preset, "objectives": "{" + ", ".join(f"{o}: 1.0" for o in objectives) + "}",
        "train.steps": 2, "train.log_every": 1, "train.checkpoint_every": 0,
        "eval.max_samples": 16, "eval.batch_size": 8})
    result = run(load_config(QUICKSTART, overrides))
    rows = result.metrics
    for name in objectives:
        assert [r["step"] for r in rows if f"loss/{name}" in r] == [1, 2], name
        assert all(math.isfinite(r[f"loss/{name}"]) for r in rows if f"loss/{name}" in r), name
    final = rows[-1]
    for key in ("loss", *eval_keys):
        assert math.isfinite(final[f"eval/{key}"]), key
        assert math.isfinite(result.summary["eval"][key]), key
