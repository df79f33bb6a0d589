"""A run over shards with bad samples and no tokenizer: bad samples skipped and counted by reason
in summary.json; a tokenizer trained for the run; past the error budget, a clear failure naming
the worst shards."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from jobs.data.formats import ShardWriter
from jobs.data.synth import _encode_jpeg, make_sample
from orchestrator.config import load_config
from orchestrator.run.runner import RunFailed, run
from tests.integration.conftest import QUICKSTART, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOOD_PER_SHARD = 40


@pytest.fixture(scope="module")
def dirty_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dirty")
    rng = random.Random(0)
    for shard in range(2):
        with ShardWriter(str(root / "train" / f"{shard:05d}.tar")) as w:
            for i in range(GOOD_PER_SHARD):
                image, caption, _ = make_sample(rng, 32)
                w.write(f"{shard}{i:04d}", {"jpg": _encode_jpeg(image), "txt": caption.encode()})
            w.write(f"{shard}9001", {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"a corrupt image"})
            w.write(f"{shard}9002", {"jpg": _encode_jpeg(make_sample(rng, 32)[0])})  # no caption
            w.write(f"{shard}9003", {"jpg": _encode_jpeg(make_sample(rng, 32)[0]), "txt": b"  "})
    return root


def _overrides(data: Path, storage: Path, **extra: object) -> list[str]:
    return tiny(data, storage, **{"data.eval": "null", "data.vocab_size": 200, "train.steps": 2,
                                  "train.log_every": 1, "train.checkpoint_every": 0, **extra})


def test_bad_samples_are_counted_by_reason_and_a_tokenizer_is_trained(ray_session, dirty_data, tmp_path) -> None:
    cfg = load_config(QUICKSTART, _overrides(dirty_data, tmp_path, name="dirty", **{"data.max_bad_fraction": 0.2}))
    result = run(cfg)
    run_dir = tmp_path / "runs" / "dirty"
    assert (run_dir / "tokenizer.json").exists()  # the shards came without one
    data = json.loads((run_dir / "summary.json").read_text())["data"]
    assert data["bad_samples"] == {"corrupt_image": 2, "missing_caption": 2, "empty_caption": 2}
    assert data["bad_total"] == 6 and data["samples_checked"] == 2 * (GOOD_PER_SHARD + 3)
    assert {w["shard"].rsplit("/", 1)[-1] for w in data["worst_shards"]} == {"00000.tar", "00001.tar"}
    assert result.metrics[-1]["data/bad/missing_caption"] == 2.0


def test_past_the_error_budget_the_run_stops_naming_the_worst_shards(ray_session, dirty_data, tmp_path) -> None:
    cfg = load_config(QUICKSTART, _overrides(dirty_data, tmp_path, name="budget", **{"data.max_bad_fraction": 0.01}))
    with pytest.raises(RunFailed) as info:
        run(cfg)
    msg = str(info.value)
    assert "data.max_bad_fraction=0.01" in msg and "worst shards: " in msg and "0000" in msg
    assert "missing_caption" in msg


def test_a_rank_that_bad_samples_leave_short_fills_its_steps_and_the_run_goes_on(ray_session, dirty_data,
                                                                                tmp_path) -> None:
    # 43 samples per shard by its index: 6 batches of 7, but 40 good ones fill only 5; every rank
    # takes the agreed 6 steps of epoch 0 (its 6th repeats a batch), then epoch 1 begins
    cfg = load_config(QUICKSTART, _overrides(dirty_data, tmp_path, name="short", **{
        "data.max_bad_fraction": 0.2, "train.batch_size": 7, "train.steps": 8, "train.log_every": 4}))
    result = run(cfg)
    assert result.summary["steps"] == 8 and [r["epoch"] for r in result.metrics] == [0, 1]
    log = (tmp_path / "runs" / "short" / "logs" / "ray.log").read_text()
    # both ranks are short; Ray's log deduplication may fold the second line into the first
    assert "bad samples left its part of epoch 0 short of the 6 agreed steps at step 6" in log
