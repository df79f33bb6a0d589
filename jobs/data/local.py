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

from jobs.data.pipeline import PipelineSpec, _shard_batches


def local_batches(shards: list[str], spec: PipelineSpec, batch_size: int, *, seed: int | None = 0,
                  epoch: int = 0, pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Full batches over `shards` in order (the remainder is dropped, as the train streams do)."""
    items = {"shard": np.array(shards, dtype=object), "shard_pos": np.arange(len(shards)),
             "start": np.zeros(len(shards), dtype=np.int64)}
    pending: list[dict[str, np.ndarray]] = []
    rows = 0
    for cols in _shard_batches(items, spec, seed, epoch, stride=None, ledger=None):
        pending.append(cols)
        rows += len(cols["input_ids"])
        while rows >= batch_size:
            merged = {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}
            batch = {k: torch.from_numpy(v[:batch_size]) for k, v in merged.items()}
            yield {k: v.pin_memory() for k, v in batch.items()} if pin_memory else batch
            pending = [{k: v[batch_size:] for k, v in merged.items()}]
            rows -= batch_size
