"""Integration fixtures: ONE local Ray instance for the whole session (a Ray Train run costs ~30 s
of start-up here; a Ray instance per test would double that), tiny shapes-world shards, and the
overrides that shrink the quickstart config to a few seconds of training."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "configs" / "quickstart.yaml"

# Ray Train knobs for a test session of ~30 short runs, set before any Ray process starts so every
# driver, controller and Ray head spawned by the tests inherits them: the controller polls its
# workers every 0.5 s instead of 2 s (each run notices its start, its reports and its end sooner),
# and neither the spot-preemption watcher actor nor Ray Train's Prometheus metrics are started.
# Together ~6 s less per run (measured with a bare 2-worker TorchTrainer: 18 s -> 12 s).
TEST_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                      "RAY_TRAIN_METRICS_ENABLED": "0"}
for _key, _value in TEST_RAY_TRAIN_ENV.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def ray_session(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:  # noqa: ANN001 - fixture
    """Local Ray, started after the S3 fixture so workers inherit its endpoint and fake keys, and
    with the test-side fault hook in every worker process (tests/faults.py: armed per test)."""
    import logging

    import ray

    from tests import faults

    os.environ[faults.ENV] = str(tmp_path_factory.mktemp("faults") / "armed.json")
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
             # the hook's module is the repository's tests/ (not installed): on the workers' path
             runtime_env={"worker_process_setup_hook": faults.HOOK, "env_vars": {"PYTHONPATH": os.pathsep.join(
                 p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from jobs.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("shapes")
    write_synthetic(str(out), samples=256, shards=4, seed=1, image_size=32, eval_samples=64)
    return out


def tiny(data: str | Path, storage: str | Path, **extra: object) -> list[str]:
    """Overrides that turn quickstart into a seconds-long run on the given data and storage."""
    base = {
        "data.train": f"{data}/train", "data.eval": f"{data}/eval", "data.image_size": 32,
        "data.max_text_len": 24, "storage.path": str(storage),
        "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2,
        "train.steps": 6, "train.batch_size": 8, "train.log_every": 2, "train.checkpoint_every": 3,
        "train.warmup_steps": 2, "eval.max_samples": 32, "eval.batch_size": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def uninterrupted_run(ray_session, shapes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """The run directory of one uninterrupted run of tests/integration/exact.COMPARED: the reference
    every fault-injection test (killed worker, torn checkpoint, lost Ray head) ends equal to. One
    run for all of them (the runs are deterministic: the same on the session's Ray as on another)."""
    from orchestrator.config import load_config
    from orchestrator.run.runner import run
    from tests.integration.exact import COMPARED, STEPS

    store = tmp_path_factory.mktemp("uninterrupted")
    result = run(load_config(QUICKSTART, tiny(shapes_data, store, name="straight", **COMPARED)))
    assert result.summary["steps"] == STEPS
    return store / "runs" / "straight"
