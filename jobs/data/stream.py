"""Each rank's deterministic sample stream, and its exact position.

Why not Ray Train's `streaming_split`: it hands blocks to whichever rank asks first, so which rank
sees which sample differs from run to run, and a killed run cannot resume "exactly where it
stopped". Here every rank builds its own Ray Data pipeline (still CPU tasks, still streaming) over
a fixed part of the data:

- epoch e orders the shards by a permutation seeded with (data.shuffle_seed, e); rank r takes
  shards r, r+W, r+2W, ... of that order (or, with fewer shards than ranks, every shard and every
  W-th sample of it);
- within a shard, samples come in a permutation seeded with (seed, e, shard) (reader.iter_rows);
- the position after a batch is (epoch, shard_pos, offset) of its last sample + 1, because Ray Data
  preserves order here; a resumed rank rebuilds its pipeline from that shard and offset.

Ranks take equal steps: before every step the ranks agree (all-reduce MIN) that each has a full
step of batches; when one runs out, the epoch ends for all and the others' remainders are dropped.

A mixture of datasets (`MixtureStream`) draws each batch from one source, chosen with probability
proportional to the source's weight by a generator seeded with (seed, rank, batch index), so the
choice sequence needs no saved state; each source cycles through its own epochs.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from jobs import watchdog
from jobs.collectives import all_have
from jobs.data.pipeline import PipelineSpec, build_dataset


@dataclass
class DataPosition:
    """Where a rank is in its stream: the next sample is `offset` in shard `shard_pos` of `epoch`."""

    epoch: int = 0
    shard_pos: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def rank_shards(shards: list[str], epoch: int, rank: int, world: int, seed: int | None) -> tuple[list[str], bool]:
    """(this rank's shards in order, stride?) for an epoch. Stride = every rank reads every shard."""
    order = list(shards)
    if seed is not None:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    if len(order) < world:
        return order, True
    return order[rank::world], False


class RankStream:
    """A rank's batches across epochs, with its exact position after each one."""

    def __init__(self, shards: list[str], spec: PipelineSpec, *, batch_size: int, rank: int, world: int,
                 seed: int | None, position: DataPosition | None = None, ledger: Any = None,
                 prefetch_batches: int = 2, read_tasks: int = 0, limit: int | None = None,
                 ray_remote_args: dict[str, Any] | None = None, pin_memory: bool = False) -> None:
        self.shards, self.spec = shards, spec
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.position = position or DataPosition()
        self.ledger, self.prefetch, self.read_tasks, self.limit = ledger, prefetch_batches, read_tasks, limit
        self.ray_remote_args = ray_remote_args
        # Host batches either way (device="cpu"): the position is read from them every batch, which
        # must not wait for the GPU. Pinned (in Ray Data's prefetch threads) when training on a GPU,
        # so that the train loop's copies are asynchronous.
        self.pin_memory = pin_memory
        self._early: tuple[Iterator[dict[str, torch.Tensor]], threading.Thread, dict[str, Any]] | None = None

    def start_early(self) -> None:
        """Start the current epoch's pipeline now, in a thread, and keep its first batch.

        For the seconds a worker spends on other set-up (importing and initialising DeepSpeed): the
        first batch is then ready when training starts instead of costing the pipeline's start-up
        on top. The position must be final (`load` before this); the next `epoch()` picks it up.
        """
        it = self._epoch_batches()
        box: dict[str, Any] = {}

        def pull() -> None:
            try:
                box["first"] = next(it, None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
                box["error"] = exc

        thread = threading.Thread(target=pull, name=f"mmpt-data-start-rank{self.rank}", daemon=True)
        thread.start()
        self._early = (it, thread, box)

    def _started_or_new(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._early is None:
            yield from self._epoch_batches()
            return
        it, thread, box = self._early
        self._early = None
        thread.join()
        if "error" in box:
            raise box["error"]
        if box["first"] is None:
            return
        yield box["first"]
        yield from it

    def _epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        pos = self.position
        mine, stride = rank_shards(self.shards, pos.epoch, self.rank, self.world, self.seed)
        items = [{"shard": s, "shard_pos": i, "start": pos.offset if i == pos.shard_pos else 0}
                 for i, s in enumerate(mine) if i >= pos.shard_pos]
        ds = build_dataset(items, self.spec, seed=self.seed, epoch=pos.epoch,
                           stride=(self.rank, self.world) if stride else None, ledger=self.ledger,
                           read_tasks=self.read_tasks, ray_remote_args=self.ray_remote_args)
        if self.limit is not None:
            ds = ds.limit(self.limit)
        yield from ds.iter_torch_batches(batch_size=self.batch_size, drop_last=True, device="cpu",
                                         prefetch_batches=self.prefetch, pin_memory=self.pin_memory)

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches until this rank's part of the current epoch is exhausted (position kept up to date)."""
        for batch in self._started_or_new():
            self.position = DataPosition(self.position.epoch, int(batch["shard_pos"][-1]),
                                         int(batch["offset"][-1]) + 1)
            yield batch

    def next_epoch(self) -> None:
        self.position = DataPosition(self.position.epoch + 1, 0, 0)

    @property
    def epoch_number(self) -> int:
        return self.position.epoch

    def describe(self) -> str:
        """What the next batch waits on, for a hang report: the shard being read, or the next one
        (the position cannot tell whether the current shard has rows left)."""
        pos = self.position
        mine, _ = rank_shards(self.shards, pos.epoch, self.rank, self.world, self.seed)
        if pos.shard_pos >= len(mine):
            return f"the data stream (epoch {pos.epoch}, past its last shard)"
        after = f" or the next shard {mine[pos.shard_pos + 1]}" if pos.shard_pos + 1 < len(mine) else ""
        return f"the data stream (epoch {pos.epoch}, reading {mine[pos.shard_pos]} from offset {pos.offset}{after})"

    def state(self) -> dict[str, Any]:
        return self.position.to_dict()

    def load(self, state: dict[str, Any]) -> None:
        if self._early is not None:
            raise RuntimeError("load() after start_early(): the started pipeline reads from the old position")
        self.position = DataPosition(**state)


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

    @property
    def epoch_number(self) -> int:
        """Full passes made over every source (the least-drawn source's epoch)."""
        return min(s.epoch_number for s in self.sources)

    def describe(self) -> str:
        i = self.choice(self.drawn)
        return f"mixture source {i}: {self.sources[i].describe()}"

    def state(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "sources": [s.state() for s in self.sources]}

    def load(self, state: dict[str, Any]) -> None:
        self.drawn = int(state["drawn"])
        for source, sub in zip(self.sources, state["sources"], strict=True):
            source.load(sub)


def synchronized_steps(stream: RankStream | MixtureStream, micro_batches: int,
                       device: torch.device | str) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Steps of `micro_batches` batches forever; every rank yields the same number per epoch.

    An epoch in which the ranks cannot agree on a single step raises: its next epoch would end
    the same way, forever (a rank's share of the data smaller than one step).
    """
    while True:
        it = stream.epoch()
        steps = 0
        while True:
            step = []
            for _ in range(micro_batches):
                # the first batch of an epoch waits for the pipeline's start-up as well
                with watchdog.waiting(stream.describe, watchdog.STARTUP_ALLOWANCE if steps == 0 else 1.0):
                    batch = next(it, None)
                if batch is None:
                    break
                step.append(batch)
            # at an epoch's start the other ranks may still be starting their pipelines
            with watchdog.waiting("the other ranks to agree on the next step (all-reduce)", watchdog.COLLECTIVE_ALLOWANCE
                                  * (watchdog.STARTUP_ALLOWANCE if steps == 0 else 1.0)):
                agreed = all_have(len(step) == micro_batches, device)
            if not agreed:
                break
            steps += 1
            yield step
        if steps == 0:
            raise EmptyEpoch(f"epoch {stream.epoch_number} gave the ranks no full step of {micro_batches} "
                             "batch(es): a rank's share of the data is smaller than train.batch_size × "
                             "train.grad_accum samples (or all of it is bad)")
        stream.next_epoch()


class EmptyEpoch(RuntimeError):
    """An epoch without a single step for every rank: the run can never progress."""


def synchronized_batches(stream: RankStream, device: torch.device | str,
                         max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """One pass (evaluation): batches while every rank still has one."""
    it = stream.epoch()
    n = 0
    while max_batches is None or n < max_batches:
        batch = next(it, None)
        if not all_have(batch is not None, device):
            return
        n += 1
        yield batch  # type: ignore[misc]
