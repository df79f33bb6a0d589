"""`mmpt run` end to end on 2 Ray Train workers: metrics, checkpoints, resume, S3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jobs.checkpoint import ds_files, part_dir, rank_path
from orchestrator.config import load_config
from orchestrator.run.runner import run
from tests.integration.conftest import QUICKSTART, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_metrics_checkpoints_and_summary_and_resumes(ray_session, shapes_data, tmp_path) -> None:
    cfg = load_config(QUICKSTART, tiny(shapes_data, tmp_path, name="e2e"))
    result = run(cfg)
    run_dir = tmp_path / "runs" / "e2e"
    assert result.run_dir == str(run_dir)

    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [2, 3, 4, 6]  # log_every 2, checkpoint at 3 and 6
    for r in records:
        for key in ("loss/total", "loss/mlm", "loss/itm", "loss/moe_aux", "samples_per_s",
                    "tokens_per_s", "step_time_s", "data_wait_share", "lr"):
            assert math.isfinite(r[key]), key
        assert 0.0 <= r["data_wait_share"] <= 1.0
        assert r["samples_per_s"] > 0
    assert records[-1]["samples_seen"] == 6 * 8 * 2

    ckpts = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert ckpts == ["checkpoint_0000003", "checkpoint_0000006"]
    last = run_dir / "checkpoint_0000006"
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 6
    # each rank's files under a prefix of its own (jobs/checkpoint.py: keys spread over prefixes)
    assert sorted(p.name for p in last.iterdir()) == sorted(["trainer_state.json", part_dir(0), part_dir(1)])
    assert [rank_path(last, r) for r in (0, 1)] == [last / part_dir(r) / f"rank{r}.pt" for r in (0, 1)]
    # ZeRO-2 optimizer shards of both ranks, and each rank's experts (4 experts over ep_size 2)
    ds = [p.name for p in ds_files(last)]
    assert sum("zero_pp_rank_" in n and n.endswith("optim_states.pt") for n in ds) == 2
    assert sum("expert_" in n and n.endswith("_model_states.pt") for n in ds) == 4 * 1  # 4 experts x 1 MoE layer

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6
    assert set(summary["final_losses"]) >= {"total", "mlm", "itm", "moe_aux"}
    ev = summary["eval"]
    assert ev["samples"] == 32
    for key in ("itm_acc", "i2t_r1", "t2i_r1", "mlm_acc", "chance_r1"):
        assert 0.0 <= ev[key] <= 1.0, key
    # MoE observability: per-layer expert load (4 experts, 1 MoE layer), drops, heatmap
    load = records[-1]["moe/layer0/load"]
    assert len(load) == 4 and abs(sum(load) - 1.0) < 1e-4
    assert 0.0 <= records[-1]["moe/dropped"] <= 1.0
    assert [row["layer"] for row in summary["moe"]["layers"]] == [0]
    assert (run_dir / "moe_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "config.yaml").read_text().startswith("name: e2e")
    assert (run_dir / "logs" / "ray.log").stat().st_size > 0
    # model-state bytes rank 0 holds, measured, beside the ZeRO paper's figure (jobs/memory.py)
    mem = summary["memory"]
    assert mem["zero_stage"] == 2 and mem["dp"] == 2 and mem["ep"] == 2 and mem["grads_watched"] == 1
    assert mem["total_bytes"] == mem["params_bytes"] + mem["grads_bytes"] + mem["optim_bytes"] > 0
    assert 0.8 < mem["total_bytes"] / mem["expected_bytes"] < 1.25
    assert records[0]["memory/total_bytes"] == mem["total_bytes"] and "memory/total_bytes" not in records[1]

    # the same config with more steps resumes from the latest checkpoint (step 6), nothing re-done
    more = load_config(QUICKSTART, tiny(shapes_data, tmp_path, name="e2e", **{"train.steps": 8}))
    result = run(more)
    assert [r["step"] for r in _metrics(run_dir)] == [2, 3, 4, 6, 8]
    assert result.metrics[0]["samples_seen"] == 8 * 8 * 2  # the count carried over from the checkpoint
    assert json.loads((run_dir / "checkpoint_0000008" / "trainer_state.json").read_text())["step"] == 8
    assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_0000006",
                                                                                    "checkpoint_0000008"]
    again = run(more)  # finished: shown again, nothing trained
    assert again.metrics == [] and again.summary["steps"] == 8
    assert len(_metrics(run_dir)) == 5


def test_run_reads_shards_and_writes_checkpoints_on_s3(ray_session, s3_server, tmp_path) -> None:
    from jobs.data.synth import write_synthetic
    from jobs.storage import StorageOptions, read_text

    bucket = s3_server.create_bucket("mmpt-it")
    data = f"s3://{bucket}/shapes"
    opts = StorageOptions(endpoint_url=s3_server.endpoint_url)
    write_synthetic(data, samples=128, shards=2, seed=3, image_size=32, eval_samples=32, options=opts)
    cfg = load_config(QUICKSTART, tiny(data, f"s3://{bucket}/out", name="s3run",
                                       **{"storage.endpoint_url": s3_server.endpoint_url, "train.steps": 3}))
    result = run(cfg)
    assert result.run_dir == f"s3://{bucket}/out/runs/s3run"
    lines = read_text(f"{result.run_dir}/metrics.jsonl", opts).splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 3]
    summary = json.loads(read_text(f"{result.run_dir}/summary.json", opts))
    assert summary["steps"] == 3 and summary["eval"]["samples"] == 32
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server.endpoint_url).list_objects_v2(
        Bucket=bucket, Prefix="out/runs/s3run/checkpoint_0000003/")["Contents"]]
    assert "out/runs/s3run/checkpoint_0000003/trainer_state.json" in keys
    assert sum("optim_states" in k for k in keys) == 2
