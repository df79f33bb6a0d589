"""Shards, a tokenizer and an in-process stand-in for Ray Data, for the data-stream unit tests
(test_units, test_regroup): the same read-task body (`pipeline._unit_batches`) run in this process."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from jobs.data import index as shard_index
from jobs.data import pipeline, stream
from jobs.data.formats import ShardWriter
from jobs.data.pipeline import PipelineSpec
from jobs.data.synth import _encode_jpeg, make_sample, write_synthetic
from jobs.storage import StorageOptions


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tok")
    write_synthetic(str(root), samples=8, shards=1, image_size=32, eval_samples=4)
    return str(root / "tokenizer.json")


def write_shard(path: Path, n: int, *, bad: tuple[int, ...] = (), prefix: str = "") -> str:
    rng = random.Random(len(str(path)))
    with ShardWriter(str(path)) as w:
        for i in range(n):
            image, caption, _ = make_sample(rng, 32)
            jpg = b"\xff\xd8 not a jpeg" if i in bad else _encode_jpeg(image)
            w.write(f"{prefix}{i:05d}", {"jpg": jpg, "txt": caption.encode()})
    return str(path)


def stream_spec(tokenizer: str) -> PipelineSpec:
    return PipelineSpec(tokenizer_uri=tokenizer, image_size=16, max_text_len=12, max_objects=0,
                        storage=StorageOptions())


class FakeDataset:
    """`build_dataset` without Ray: the same task body (`_unit_batches`) in this process."""

    opened: list[int] = []  # epochs whose iteration started, in order
    closed: list[int] = []

    def __init__(self, items: list[dict[str, Any]], spec: PipelineSpec, *, seed: int | None, epoch: int,
                 ledger: Any = None, **_: Any) -> None:
        self.items, self.spec, self.seed, self.epoch, self.ledger = items, spec, seed, epoch, ledger

    def iter_torch_batches(self, batch_size: int, **_: Any):  # noqa: ANN201 - iterator
        FakeDataset.opened.append(self.epoch)
        cols = {k: np.array([it[k] for it in self.items], dtype=object if k in ("shard", "truncated") else np.int64)
                for k in self.items[0]}
        pending: dict[str, np.ndarray] | None = None
        try:
            for out in pipeline._unit_batches(cols, self.spec, self.seed, self.epoch, self.ledger):
                pending = out if pending is None else {k: np.concatenate([pending[k], out[k]]) for k in out}
                while len(pending["input_ids"]) >= batch_size:
                    yield {k: torch.from_numpy(v[:batch_size]) for k, v in pending.items()}
                    pending = {k: v[batch_size:] for k, v in pending.items()}
        finally:
            FakeDataset.closed.append(self.epoch)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> type[FakeDataset]:
    monkeypatch.setattr(stream, "build_dataset", FakeDataset)
    FakeDataset.opened, FakeDataset.closed = [], []
    return FakeDataset


def sample_ids(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [int(i) for b in batches for i in b["sample_id"]]




@pytest.fixture(autouse=True)
def fresh_index_cache() -> None:
    shard_index.clear_cache()
