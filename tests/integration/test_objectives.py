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

# objective -> (preset, eval keys it must produce besides eval/loss)
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mlm": ("vilt", ("mlm_acc", "mlm_token_acc", "mlm_grounded_acc", "mlm_blind_grounded_acc", "mlm_grounding_gain")),
    "msm": ("interbert", ("msm_acc",)),
    "itm": ("vilt", ("itm_acc", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r10")),
    "itc": ("clip", ("itc_acc", "itc_i2t_r1", "itc_i2t_r10", "itc_t2i_r1", "itc_candidates")),
    "caption": ("unimo", ("caption_acc",)),
    "mrfr": ("uniter", ("mrfr_masked",)),
    "mrc": ("vl-bert", ("mrc_acc",)),
    "moc": ("imagebert", ("moc_acc",)),
    "mrc_kl": ("uniter", ("mrc_kl_acc",)),
    "wra": ("uniter", ("wra_gap",)),
    "wpa": ("vilt", ("wpa_gap",)),
}


def test_every_objective_has_a_case() -> None:
    assert set(CASES) == set(OBJECTIVES)


@pytest.mark.parametrize("name", list(CASES))
def test_objective_trains_and_is_evaluated(ray_session, shapes_data, tmp_path, name: str) -> None:  # noqa: ANN001
    preset, eval_keys = CASES[name]
    overrides = tiny(shapes_data, tmp_path, name=f"objective-{name}", **{
        "model.preset": preset, "objectives": f"{{{name}: 1.0}}",
        "train.steps": 2, "train.log_every": 1, "train.checkpoint_every": 0,
        "eval.max_samples": 16, "eval.batch_size": 8})
    result = run(load_config(QUICKSTART, overrides))
    rows = result.metrics
    assert [r["step"] for r in rows if f"loss/{name}" in r] == [1, 2]
    assert all(math.isfinite(r[f"loss/{name}"]) for r in rows if f"loss/{name}" in r)
    final = rows[-1]
    for key in ("loss", *eval_keys):
        assert math.isfinite(final[f"eval/{key}"]), key
        assert math.isfinite(result.summary["eval"][key]), key
