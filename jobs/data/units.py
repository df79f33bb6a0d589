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

Resuming on another number of ranks (`regroup`): what the old ranks had left of the interrupted
epoch, (unit, offset) onwards on each, is laid end to end in old-rank order and dealt to the new
ranks in equal contiguous parts, cutting a unit where a part ends (a piece: positions [begin, end)
of the unit's permuted order). No sample of the epoch is read twice, none is skipped but the
remainders that do not fill a step (as at any epoch's end).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Unit:
    shard: str
    start: int  # first sample (index in the shard's key order)
    stop: int  # one past the last
    # A piece of the unit (a regrouped remainder): positions [begin, end) of its permuted order
    begin: int = 0
    end: int | None = None  # None: the unit's last position

    @property
    def size(self) -> int:
        """Samples of the whole unit (what its permuted order runs over)."""
        return self.stop - self.start

    @property
    def last(self) -> int:
        return self.size if self.end is None else self.end

    @property
    def samples(self) -> int:
        """Samples this plan reads of the unit: all of them, or its piece's."""
        return self.last - self.begin

    def piece(self, begin: int, end: int | None = None) -> Unit:
        end = self.last if end is None else end
        return Unit(self.shard, self.start, self.stop, begin, None if end == self.size else end)

    def to_list(self) -> list[Any]:
        return [self.shard, self.start, self.stop, self.begin, self.end]

    def __str__(self) -> str:
        whole = self.begin == 0 and self.end is None
        return f"{self.shard} [{self.start}:{self.stop}]" + ("" if whole else f" positions {self.begin}:{self.last}")


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


def remaining(units: list[Unit], unit: int, offset: int) -> list[Unit]:
    """What is left of a plan at position (unit, offset): the rest of that unit, then the units after."""
    if unit >= len(units):
        return []
    rest = [units[unit].piece(max(units[unit].begin, offset))] + units[unit + 1:]
    return [u for u in rest if u.samples > 0]


def deal(pieces: list[Unit], world: int) -> list[list[Unit]]:
    """`pieces` (laid end to end) cut into `world` contiguous parts of equal samples (±1); rank r's is [r]."""
    total = sum(u.samples for u in pieces)
    bounds = [r * total // world for r in range(world + 1)]
    parts: list[list[Unit]] = [[] for _ in range(world)]
    base = 0
    for u in pieces:
        for r in range(world):
            a, b = max(bounds[r], base), min(bounds[r + 1], base + u.samples)
            if a < b:
                parts[r].append(u.piece(u.begin + a - base, u.begin + b - base))
        base += u.samples
    return parts
