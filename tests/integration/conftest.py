"""Integration fixtures: ONE local Ray instance for the whole session (a Ray Train run costs ~30 s
of start-up here; a Ray instance per test would double that), tiny shapes-world shards, and the
overrides that shrink the quickstart config to a few seconds of training."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "configs" / "quickstart.yaml"


@pytest.fixture(scope="session")
def ray_session(s3_server) -> Iterator[None]:  # noqa: ANN001 - fixture
    """Local Ray, started after the S3 fixture so workers inherit its endpoint and fake keys."""
    import logging

    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
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
