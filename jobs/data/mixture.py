"""A mixture of datasets: each batch drawn from one source, chosen with probability proportional to
the source's weight by a generator seeded with (seed, rank, batch index), so the choice sequence
needs no saved state; each source (a jobs.data.stream.RankStream) cycles through its own epochs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from jobs.data.stream import RankStream


class MixtureStream:
    """Batches from several RankStreams, each batch from one source picked by weight."""

    def __init__(self, sources: list[RankStream], weights: list[float], *, seed: int | None, rank: int) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError("a mixture needs one weight per source")
        self.sources, self.weights = sources, weights
        self.seed, self.rank = seed, rank
        self.drawn = 0  # batches drawn so far: indexes the choice sequence

    def choice(self, index: int) -> int:
        rng = random.Random(f"mix:{self.seed}:{self.rank}:{index}")
        return rng.choices(range(len(self.sources)), weights=self.weights)[0]

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless: a source that runs out starts its next epoch."""
        live: dict[int, Iterator[dict[str, torch.Tensor]]] = {}
        while True:
            i = self.choice(self.drawn)
            batch = next(live[i], None) if i in live else None
            if batch is None:
                if i in live:
                    self.sources[i].next_epoch()
                live[i] = self.sources[i].epoch()
                batch = next(live[i], None)
                if batch is None:
                    raise RuntimeError(f"mixture source {i} yields no full batch: too few samples for this rank")
            self.drawn += 1
            yield batch

    def next_epoch(self) -> None:  # the mixture itself has no epochs
        pass

    def close(self) -> None:
        for source in self.sources:
            source.close()

    @property
    def epoch_number(self) -> int:
        """Full passes made over every source (the least-drawn source's epoch)."""
        return min(s.epoch_number for s in self.sources)

    def describe(self) -> str:
        i = self.choice(self.drawn)
        return f"mixture source {i}: {self.sources[i].describe()}"

    def state(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "sources": [s.state() for s in self.sources]}

    def regroup(self, positions: list[dict[str, Any]], micro_batches: int = 1) -> None:
        """Resume from another number of ranks' states: each source regrouped from the old ranks'
        positions in it (RankStream.regroup), the draw sequence on from the most any old rank drew."""
        self.drawn = max(int(p["drawn"]) for p in positions)
        for i, source in enumerate(self.sources):
            source.regroup([p["sources"][i] for p in positions], micro_batches)

    def load(self, state: dict[str, Any]) -> None:
        self.drawn = int(state["drawn"])
        for source, sub in zip(self.sources, state["sources"], strict=True):
            source.load(sub)
