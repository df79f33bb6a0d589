"""A run on COCO-layout shards (made here by `mmpt data prepare --layout coco` from a PIL-drawn
fixture): it trains every objective the data supports, refuses the others in one line before
anything starts, and reports retrieval over all five captions of each held-out image."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.data.datasets.layouts import Inputs, prepare
from models.factory import fitting_objectives
from orchestrator.cli.main import app
from orchestrator.config import load_config
from orchestrator.run.runner import run
from tests import dataset_layouts as layouts
from tests.integration.conftest import QUICKSTART, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVAL_IMAGES = 4  # x 5 captions = the whole held-out split, one eval batch of 10 per worker


def test_coco_layout_run_trains_what_the_data_supports(ray_session, tmp_path: Path) -> None:  # noqa: ANN001
    src = layouts.coco(tmp_path / "coco", images=12)
    data = tmp_path / "shards"
    res = prepare("coco", Inputs(images=str(src["images"]), captions=str(src["captions"]),
                                 instances=str(src["instances"])), str(data), eval_images=EVAL_IMAGES, vocab_size=200)
    assert res.samples == 60 and len(res.eval_shards) == 1

    def overrides(objectives: list[str], **extra: object) -> list[str]:
        return tiny(data, tmp_path, name="coco", **{
            "model.preset": "uniter", "objectives": "{" + ", ".join(f"{o}: 1.0" for o in objectives) + "}",
            "train.steps": 2, "train.log_every": 1, "train.checkpoint_every": 0,
            "eval.max_samples": 5 * EVAL_IMAGES, "eval.batch_size": 10, **extra})

    fitting = fitting_objectives(load_config(QUICKSTART, overrides(["mlm"])).model)
    # every objective the preset can serve: the data (COCO: captions, boxes, 80 categories; no scene
    # graph) refuses SGP, in one line naming the objective and the missing field, with exit 2
    refused = CliRunner().invoke(app, ["run", str(QUICKSTART), *(a for o in overrides(fitting) for a in ("--set", o))])
    assert refused.exit_code == 2, refused.output
    lines = [ln for ln in refused.output.splitlines() if ln.strip()]
    assert lines == [f"error: objectives.sgp = 1.0: needs scene_graph: scene-graph words (the dataset card's "
                     "scene_words, from the scene json's objects, attributes and relations), which the data lacks "
                     f"(dataset card {data}/dataset.json)"]
    supported = [o for o in fitting if o != "sgp"]
    assert {"mlm", "itm", "itc", "mrc", "mrc_kl", "moc", "mrfr", "wra"} <= set(supported)

    result = run(load_config(QUICKSTART, overrides(supported)))
    summary = result.summary
    assert summary["steps"] == 2
    losses = summary["final_losses"]
    assert set(supported) <= set(losses) and all(math.isfinite(v) for v in losses.values()), losses
    # the labels came from COCO's categories (run config resolved from the card), not the shapes world
    assert "object_classes: 4" in (Path(result.run_dir) / "config.yaml").read_text()
    ev = summary["eval"]
    assert ev["samples"] == 5 * EVAL_IMAGES
    # full-set ITC retrieval: 4 distinct images, each ranking all 20 captions, its five all counting
    assert ev["itc_images"] == EVAL_IMAGES and ev["itc_candidates"] == 5 * EVAL_IMAGES
    assert ev["captions_per_image"] == 5.0
    assert ev["itc_chance_r1"] == pytest.approx(5 / 20)  # chance with five right captions in 20
    for key in ("itc_i2t_r1", "itc_i2t_r5", "itc_t2i_r1", "i2t_r1", "t2i_r1", "itm_acc", "mlm_grounded_acc"):
        assert 0.0 <= ev[key] <= 1.0, key
    assert ev["mlm_grounded_tokens"] > 0  # COCO's category names are the grounded words
