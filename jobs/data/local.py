"""The pipeline's batches in this process, without Ray: the same read, decode, tokenize and columns
as the Ray Data tasks (jobs/data/pipeline.py), stacked into torch batches of `batch_size` rows.

For a machine that has no Ray (the GPU check runs where only PyTorch is installed), for benchmarks
that must not count Ray's machinery, and for debugging a shard. Not for training at scale: one
process reads every shard in turn.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from jobs.data.index import shard_index
from jobs.data.pipeline import PipelineSpec, _unit_batches, unit_item
from jobs.data.units import Unit


def local_items(shards: list[str], spec: PipelineSpec) -> dict[str, np.ndarray]:
    """Every shard as one unit, in order, as the columns a read task gets."""
    rows = []
    for pos, shard in enumerate(shards):
        index = shard_index(shard, spec.storage, spec.image_column, spec.caption_column)
        rows.append(unit_item(Unit(shard, 0, index.samples), index, pos))
    return {k: np.array([r[k] for r in rows], dtype=object if k in ("shard", "truncated") else np.int64)
            for k in ("shard", "unit_pos", "start", "stop", "begin", "end", "lo", "hi", "truncated")}


def local_batches(shards: list[str], spec: PipelineSpec, batch_size: int, *, seed: int | None = 0,
                  epoch: int = 0, pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Full batches over `shards` in order (the remainder is dropped, as the train streams do)."""
    pending: list[dict[str, np.ndarray]] = []
    rows = 0
    for cols in _unit_batches(local_items(shards, spec), spec, seed, epoch, ledger=None):
        pending.append(cols)
        rows += len(cols["input_ids"])
        while rows >= batch_size:
            merged = {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}
            batch = {k: torch.from_numpy(v[:batch_size]) for k, v in merged.items()}
            yield {k: v.pin_memory() for k, v in batch.items()} if pin_memory else batch
            pending = [{k: v[batch_size:] for k, v in merged.items()}]
            rows -= batch_size
