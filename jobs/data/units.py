"""Which samples each rank reads in an epoch: shards cut into units (shard, start, stop).

A unit is at most `data.unit_samples` consecutive samples of one shard (by the shard's index,
jobs.data.index), and one Ray Data task: a 10k-sample shard is twenty tasks, not one, so the last
shard of an epoch does not leave the other read slots idle, and a rank that owns a part of a shard
fetches (a byte range, when the index has offsets) and decodes only that part.

- At least as many shards as ranks: epoch e orders the shards by a permutation seeded with
  (seed, e); rank r owns shards r, r+W, r+2W, ... of that order (`rank_shards`), cut into units.
  A rank needs the counts of its own shards only.
- Fewer shards than ranks: the shards, in that order, are laid end to end and rank r owns the
  samples [r·N/W, (r+1)·N/W) of the N in all (cut into units at shard boundaries and at
  `unit_samples`): every rank reads and decodes 1/W of the data, not all of it.

A rank's units are read in an order permuted by (seed, e, r), each unit's samples in an order
permuted by (seed, e, shard, start) (reader.iter_unit_rows). Nothing depends on anything but
(seed, epoch, rank, world) and the counts, so the next epoch's units are known in advance.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    shard: str
    start: int  # first sample (index in the shard's key order)
    stop: int  # one past the last

    @property
    def samples(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"{self.shard} [{self.start}:{self.stop}]"


def rank_shards(shards: list[str], epoch: int, rank: int, world: int, seed: int | None) -> tuple[list[str], bool]:
    """(the shards this rank's units come from, in epoch order; shared?). Shared = fewer shards than
    ranks: every rank reads its own sample range of the shards laid end to end."""
    order = list(shards)
    if seed is not None:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    if len(order) < world:
        return order, True
    return order[rank::world], False


def _cut(shard: str, start: int, stop: int, unit_samples: int) -> list[Unit]:
    return [Unit(shard, a, min(a + unit_samples, stop)) for a in range(start, stop, unit_samples)]


def rank_units(shards: list[str], count: Callable[[str], int], epoch: int, rank: int, world: int,
               seed: int | None, unit_samples: int) -> list[Unit]:
    """This rank's units of `epoch`, in reading order. `count(shard)` is the shard's sample count;
    it is asked only for the shards this rank may read."""
    mine, shared = rank_shards(shards, epoch, rank, world, seed)
    units: list[Unit] = []
    if not shared:
        for shard in mine:
            units += _cut(shard, 0, count(shard), unit_samples)
    else:
        counts = [count(s) for s in mine]
        total = sum(counts)
        lo, hi = rank * total // world, (rank + 1) * total // world
        base = 0
        for shard, n in zip(mine, counts, strict=True):
            a, b = max(lo, base), min(hi, base + n)
            if a < b:
                units += _cut(shard, a - base, b - base, unit_samples)
            base += n
    if seed is not None:
        random.Random(f"{seed}:{epoch}:{rank}").shuffle(units)
    return units
