"""Megatron tensor parallelism through `mmpt run` (#15): tp 2 on 2 workers, and tp 2 x dp 2 on 4,
train and resume from their checkpoints; the run's memory table says tp and dp (the bytes of the
split against `mmpt plan`: test_memory.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.run.runner import run
from tests.integration.conftest import QUICKSTART, tiny

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("workers", "tp"), [(2, 2), (4, 2)], ids=["tp2", "tp2xdp2"])
def test_a_tensor_parallel_run_trains_and_resumes(ray_session, shapes_data, tmp_path, workers: int,  # noqa: ANN001
                                                  tp: int) -> None:
    # dense (tensor parallelism replicates experts; test_memory covers MoE), 2 heads split 1 per rank;
    # 4 workers on the tests' 4 Ray CPUs leave room for the data tasks at half a CPU each
    common = {"parallel.tp_size": tp, "scaling.num_workers": workers, "scaling.cpus_per_worker": 0.5,
              "moe.num_experts": 0, "deepspeed.zero_stage": 1, "train.log_every": 1, "train.checkpoint_every": 2,
              "data.eval": "[]"}
    name = f"tp{tp}-w{workers}"
    first = run(load_config(QUICKSTART, tiny(shapes_data, tmp_path, name=name, **common, **{"train.steps": 4})))
    assert first.summary["steps"] == 4
    memory = first.summary["memory"]  # rank 0's model states: its replicated parameters and its shards
    assert (memory["tp"], memory["dp"], memory["zero_stage"]) == (tp, workers // tp, 1), memory
    assert memory["params_bytes"] == pytest.approx(4 * memory["num_params"], rel=0.01)  # fp32
    resumed = run(load_config(QUICKSTART, tiny(shapes_data, tmp_path, name=name, **common, **{"train.steps": 6})))
    assert resumed.summary["steps"] == 6
    assert _steps(tmp_path / "runs" / name) == [1, 2, 3, 4, 5, 6]  # resumed at step 5, after checkpoint 4
    assert all(math.isfinite(v) for v in resumed.summary["final_losses"].values())
