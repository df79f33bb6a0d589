"""Resume on another number of workers (#20 item 2): 2 workers -> 1 -> 2 within one epoch, with
MoE layers (moe.ep_size 1: every worker holds the 4 experts; another ep_size than the checkpoint's
is refused in one line, tests/unit/test_checkpoint_world.py). Within the epoch no sample is seen
twice and none is lost (`data.record_samples`: the union of the three runs' ids is the epoch's ids, once
each), the steps go on where they stopped, and each run resumes the previous one's parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.checkpoint import ds_files
from orchestrator.config import load_config
from orchestrator.run.runner import run
from tests.integration.conftest import QUICKSTART, tiny
from tests.integration.exact import samples_per_step

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = 256  # shapes_data: 256 training samples in 4 shards of 64; batches of 8 per worker


def _ids_by_step(run_dir: Path) -> dict[int, list[int]]:
    """step -> the ids of every rank at that step (the last record of a step redone after a restart)."""
    out: dict[int, list[int]] = {}
    for per_rank in samples_per_step(run_dir).values():
        for step, ids in per_rank.items():
            out.setdefault(step, []).extend(ids)
    return out


def test_two_workers_to_one_and_back_keep_the_epoch_whole(ray_session, shapes_data, tmp_path) -> None:  # noqa: ANN001
    common = {"train.log_every": 2, "train.checkpoint_every": 4, "data.record_samples": True, "data.eval": "[]",
              "deepspeed.zero_stage": 0}

    run_dir = tmp_path / "runs" / "resized"

    def resumed(steps: int, workers: int) -> dict:
        cfg = load_config(QUICKSTART, tiny(shapes_data, tmp_path, name="resized", **common, **{
            "train.steps": steps, "scaling.num_workers": workers, "moe.ep_size": 1}))
        summary = run(cfg).summary
        # the experts went along: 4 per MoE layer in the checkpoint, whichever number of ranks wrote it
        names = [p.name for p in ds_files(run_dir / f"checkpoint_{steps:07d}") if "expert_" in p.name
                 and p.name.endswith("model_states.pt")]
        assert {n.split("expert_")[1].split("_")[0] for n in names} == {"0", "1", "2", "3"}, (steps, names)
        return summary

    # 2 workers, 4 steps: 64 samples of the epoch's 256 (each rank's part holds 16 steps)
    assert resumed(4, 2)["steps"] == 4
    # 1 worker: the epoch goes on with the 192 samples both ranks had left (24 steps); 4 of them here
    assert resumed(8, 1)["steps"] == 8
    # back to 2 workers: the 160 the one rank had left of its dealt part, 80 each: 10 steps, to step 18
    summary = resumed(18, 2)
    assert summary["steps"] == 18
    ids = _ids_by_step(run_dir)
    assert sorted(ids) == list(range(1, 19))
    assert [len(ids[s]) for s in sorted(ids)] == [16] * 4 + [8] * 4 + [16] * 10  # 2, 1, then 2 ranks of 8
    seen = [i for s in sorted(ids) for i in ids[s]]
    assert len(seen) == len(set(seen)) == TRAIN  # the whole epoch, no sample twice
    epochs = [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(epochs) == {0}
    # each run resumed the one before: its first report is the step after that one's last checkpoint
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16, 18]
