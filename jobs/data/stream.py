"""Each rank's deterministic sample stream, and its exact position.

Why not Ray Train's `streaming_split`: it hands blocks to whichever rank asks first, so which rank
sees which sample differs from run to run, and a killed run cannot resume "exactly where it
stopped". Here every rank builds its own Ray Data pipeline (still CPU tasks, still streaming) over
a fixed part of the data: its units (shard, start, stop) of the epoch (jobs.data.units), each read
by one task that fetches and decodes only those samples. The position after a batch is
(epoch, unit, offset) of its last sample + 1, because Ray Data preserves order here; a resumed
rank rebuilds its pipeline from that unit and offset.

Ranks take equal steps: at an epoch's start the ranks agree, in one all-reduce (MIN), on the
epoch's steps: what the rank with the fewest samples (by the shards' indexes) fills; the others'
remainders are dropped. Bad samples are found only when read, so a rank can come up short of the
agreed steps: it then fills the missing batches with its own first batches of the epoch again
(a warning says how many; `repeated_batches` counts them). It never waits for the others and never
takes a step more or less than they do. A position also holds the steps taken in its epoch, so a
resumed epoch ends at the same step as the interrupted one would have.

The next epoch depends only on (seed, epoch, rank, world): its pipeline is built and started while
the current one is half read (`data.next_epoch_ahead`), so its first batch is ready at the boundary.

Resumed on another number of ranks (`regroup`), the interrupted epoch goes on with what every old
rank had left of it, dealt to the new ranks (jobs.data.units.deal); that epoch's plan and step count
then travel in the position (`plan`, `batches`), so a checkpoint within it resumes exactly too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch

from jobs.data.index import ShardIndex, shard_index
from jobs.data.mixture import MixtureStream
from jobs.data.pipeline import PipelineSpec, build_dataset, unit_item
from jobs.data.reader import ShardReport
from jobs.data.units import Unit, deal, rank_shards, rank_units, remaining

log = logging.getLogger(__name__)
__all__ = ["DataPosition", "EmptyEpoch", "MixtureStream", "RankStream"]

Batches = Iterator[dict[str, torch.Tensor]]
_POLL_S = 0.1  # waits poll, so that the watchdog's exception lands in the training thread
_COUNTING_THREADS = 8  # shards counted at once (I/O: a streaming pass each when they have no index)


def _some(shards: list[str], most: int = 4) -> str:
    return (", ".join(shards[:most]) + (f" and {len(shards) - most} more" if len(shards) > most else "")) or "none"


@dataclass
class DataPosition:
    """Where a rank is: the next sample is `offset` in unit `unit` of `epoch`, after `steps` steps of it."""

    epoch: int = 0
    unit: int = 0
    offset: int = 0
    steps: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> DataPosition:
        if "shard_pos" in state:  # before units: shard positions of another order; not exact any more
            log.warning("data position %s is of an older format: continuing at the start of epoch %d",
                        state, int(state["epoch"]) + 1)
            return cls(int(state["epoch"]) + 1)
        return cls(**{k: int(state[k]) for k in ("epoch", "unit", "offset", "steps")})


class _Started:
    """A pipeline started in a thread, its first batch kept: (iterator, thread, box)."""

    def __init__(self, it: Batches, name: str) -> None:
        self.it, self.box = it, {}
        self.thread = threading.Thread(target=self._pull, name=name, daemon=True)
        self.thread.start()

    def _pull(self) -> None:
        try:
            self.box["first"] = next(self.it, None)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            self.box["error"] = exc

    def batches(self) -> Batches:
        try:
            while self.thread.is_alive():
                self.thread.join(_POLL_S)
            if "error" in self.box:
                raise self.box["error"]
            if self.box["first"] is None:
                return
            yield self.box["first"]
            yield from self.it
        finally:
            self.it.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.thread.join(_POLL_S)
        if not self.thread.is_alive():  # else the thread still runs the generator: it ends with the process
            self.it.close()  # type: ignore[attr-defined]


class RankStream:
    """A rank's batches across epochs, with its exact position after each one."""

    def __init__(self, shards: list[str], spec: PipelineSpec, *, batch_size: int, rank: int, world: int,
                 seed: int | None, position: DataPosition | None = None, ledger: Any = None,
                 prefetch_batches: int = 2, read_tasks: int = 0, limit: int | None = None,
                 ray_remote_args: dict[str, Any] | None = None, pin_memory: bool = False,
                 unit_samples: int = 512, next_epoch_ahead: bool = False) -> None:
        self.shards, self.spec = shards, spec
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.position = position or DataPosition()
        self.ledger, self.prefetch, self.read_tasks, self.limit = ledger, prefetch_batches, read_tasks, limit
        self.ray_remote_args = ray_remote_args
        # Host batches either way (device="cpu"): the position is read from them every batch, which
        # must not wait for the GPU. Pinned (in Ray Data's prefetch threads) when training on a GPU,
        # so that the train loop's copies are asynchronous.
        self.pin_memory = pin_memory
        self.unit_samples, self.ahead = unit_samples, next_epoch_ahead
        self.repeated_batches = 0  # batches repeated to fill a rank's part short of the agreed steps
        self._plans: dict[int, list[Unit]] = {}
        self._regrouped: dict[int, int] = {}  # epoch -> its planned batches, for an epoch dealt by `regroup`
        self._indexes: dict[str, ShardIndex] = {}
        self._lock = threading.Lock()
        self._started: dict[tuple[int, int, int], _Started] = {}
        self._fill: Batches | None = None

    # -- the plan: this rank's units of an epoch ------------------------------------------------------

    def _index(self, shard: str) -> ShardIndex:
        if shard not in self._indexes:
            index = shard_index(shard, self.spec.storage, self.spec.image_column, self.spec.caption_column)
            if index.problem is not None and self.ledger is not None:
                reason, detail = index.problem
                self.ledger.add.remote(ShardReport(shard, bad={"<shard>": reason}, detail=detail))
            self._indexes[shard] = index
        return self._indexes[shard]

    def units(self, epoch: int) -> list[Unit]:
        """This rank's units of `epoch` (its shards' indexes read or counted on first use, several at
        a time; thread-safe)."""
        with self._lock:
            if epoch not in self._plans:
                self._plans[epoch] = self._default_plan(epoch, self.rank, self.world)
                for old in [e for e in self._plans if e < epoch - 1]:
                    del self._plans[old]
            return self._plans[epoch]

    def planned_batches(self) -> int:
        """Full batches in this rank's part of the current epoch, by the indexes (bad samples not known yet)."""
        if self.position.epoch in self._regrouped:
            return self._regrouped[self.position.epoch]
        units = self._wait_for(lambda: self.units(self.position.epoch))
        return sum(u.samples for u in units) // self.batch_size

    def regroup(self, positions: list[dict[str, Any]], micro_batches: int = 1) -> None:
        """Resume from the positions of another number of ranks (`positions[r]`: old rank r's).

        The epoch they were in goes on: what each old rank had left of it, laid end to end in old-rank
        order, dealt to this world's ranks in equal parts (jobs.data.units.deal); this rank reads its
        part, and the epoch has the steps already taken plus those its part fills. Old ranks in
        different epochs (a mixture's sources, drawn at different rates) cannot be pooled: the data
        then continues at the start of the epoch after the latest of them.
        """
        old = [DataPosition.from_dict(p) for p in positions]
        if len({p.epoch for p in old}) != 1 or len({p.steps for p in old}) != 1:
            latest = max(p.epoch for p in old)
            log.warning("data positions of %d ranks are in different epochs (%s): continuing at the start of "
                        "epoch %d", len(old), sorted({p.epoch for p in old}), latest + 1)
            self.position = DataPosition(latest + 1)
            return
        epoch, done = old[0].epoch, old[0].steps

        def part() -> list[Unit]:
            plans = [self._plan_in(positions[r], epoch, r, len(old)) for r in range(len(old))]
            rest = [u for r, units in enumerate(plans) for u in remaining(units, old[r].unit, old[r].offset)]
            return deal(rest, self.world)[self.rank]

        mine = self._wait_for(part)
        with self._lock:
            self._plans[epoch] = mine
        self._regrouped[epoch] = done * micro_batches + sum(u.samples for u in mine) // self.batch_size
        self.position = DataPosition(epoch, 0, 0, done)
        log.info("rank %d of %d: epoch %d regrouped from %d ranks: %d samples in %d piece(s), %d batches",
                 self.rank, self.world, epoch, len(old), sum(u.samples for u in mine), len(mine),
                 self._regrouped[epoch])

    def _plan_in(self, position: dict[str, Any], epoch: int, rank: int, world: int) -> list[Unit]:
        """The units of `epoch` that the rank of a saved `position` read: its dealt plan, or the default."""
        if "plan" in position:
            return [Unit(*u) for u in position["plan"]]
        return self._default_plan(epoch, rank, world)

    def _default_plan(self, epoch: int, rank: int, world: int) -> list[Unit]:
        """Rank `rank` of `world`'s units of `epoch` (jobs.data.units), the indexes of its shards read
        or counted first, several at a time."""
        mine = [s for s in rank_shards(self.shards, epoch, rank, world, self.seed)[0] if s not in self._indexes]
        if len(mine) > 1:
            with ThreadPoolExecutor(_COUNTING_THREADS, thread_name_prefix="mmpt-data-index") as pool:
                list(pool.map(self._index, mine))
        return rank_units(self.shards, lambda s: self._index(s).samples, epoch, rank, world, self.seed,
                          self.unit_samples)

    def _wait_for(self, compute: Any) -> Any:
        """`compute()` in a thread, waited for in polls (interruptible by the watchdog)."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["out"] = compute()
            except BaseException as exc:  # noqa: BLE001 - re-raised here
                box["error"] = exc

        thread = threading.Thread(target=run, name=f"mmpt-data-plan-rank{self.rank}", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(_POLL_S)
        if "error" in box:
            raise box["error"]
        return box["out"]

    # -- pipelines --------------------------------------------------------------------------------------

    def _open(self, pos: DataPosition) -> Batches:
        units = self.units(pos.epoch)
        items = [unit_item(u, self._index(u.shard), i, pos.offset if i == pos.unit else 0)
                 for i, u in enumerate(units) if i >= pos.unit]
        if not items:
            return
        ds = build_dataset(items, self.spec, seed=self.seed, epoch=pos.epoch, ledger=self.ledger,
                           read_tasks=self.read_tasks, ray_remote_args=self.ray_remote_args)
        if self.limit is not None:
            ds = ds.limit(self.limit)
        yield from ds.iter_torch_batches(batch_size=self.batch_size, drop_last=True, device="cpu",
                                         prefetch_batches=self.prefetch, pin_memory=self.pin_memory)

    def _start(self, pos: DataPosition) -> None:
        key = (pos.epoch, pos.unit, pos.offset)
        if key not in self._started:
            self._started[key] = _Started(self._open(pos), f"mmpt-data-e{pos.epoch}-rank{self.rank}")

    def start_early(self) -> None:
        """Start the current epoch's pipeline now, in a thread, and keep its first batch.

        For the seconds a worker spends on other set-up (importing and initialising DeepSpeed): the
        first batch is then ready when training starts instead of costing the pipeline's start-up
        on top. The position must be final (`load` before this); the next `epoch()` picks it up.
        """
        self._start(self.position)

    def epoch(self, ahead_after: int | None = None) -> Batches:
        """Batches until this rank's part of the current epoch is exhausted (position kept up to date).

        After `ahead_after` batches (default: when half of the rank's planned batches are read) the
        next epoch's pipeline starts (`next_epoch_ahead`), so that it is ready at the boundary.
        """
        pos = self.position
        started = self._started.pop((pos.epoch, pos.unit, pos.offset), None)
        batches = started.batches() if started is not None else self._open(pos)
        if ahead_after is None:
            units = self.units(pos.epoch)
            before = (sum(u.samples for u in units[:pos.unit]) + pos.offset) // self.batch_size
            ahead_after = sum(u.samples for u in units) // self.batch_size // 2 - before
        ahead_after = max(1, ahead_after) if self.ahead else None
        try:
            for n, batch in enumerate(batches, 1):
                self.position = DataPosition(pos.epoch, int(batch["unit_pos"][-1]), int(batch["offset"][-1]) + 1,
                                             self.position.steps)
                if n == ahead_after:
                    self._start(DataPosition(pos.epoch + 1))
                yield batch
        finally:
            batches.close()  # type: ignore[attr-defined]

    def filler(self) -> dict[str, torch.Tensor]:
        """A batch to fill a step this rank's part came up short of: its first batches again, in turn."""
        for _ in range(2):
            if self._fill is None:
                self._fill = self._open(DataPosition(self.position.epoch))
            batch = next(self._fill, None)
            if batch is not None:
                self.repeated_batches += 1
                return batch
            self._fill = None
        raise EmptyEpoch(f"rank {self.rank} has no good sample in epoch {self.position.epoch}: its whole part "
                         "of the data is bad")

    def next_epoch(self) -> None:
        if self._fill is not None:
            self._fill.close()  # type: ignore[attr-defined]
            self._fill = None
        self.position = DataPosition(self.position.epoch + 1)

    def close(self) -> None:
        """Stop the pipelines started ahead or for filling (the current epoch's ends with its iterator)."""
        for started in self._started.values():
            started.close()
        self._started.clear()
        if self._fill is not None:
            self._fill.close()  # type: ignore[attr-defined]
            self._fill = None

    @property
    def epoch_number(self) -> int:
        return self.position.epoch

    @property
    def steps_done(self) -> int:
        return self.position.steps

    @steps_done.setter
    def steps_done(self, steps: int) -> None:
        self.position.steps = steps

    def describe(self) -> str:
        """What the next batch waits on, for a hang report: the unit being read and the next one (the
        position cannot tell whether the current unit has rows left), or the shards being counted."""
        pos = self.position
        units = self._plans.get(pos.epoch)
        if units is None:
            mine = rank_shards(self.shards, pos.epoch, self.rank, self.world, self.seed)[0]
            waiting = [s for s in mine if s not in self._indexes]
            counted = [s for s in mine if s in self._indexes]
            return (f"the data stream (epoch {pos.epoch}, reading the sample counts of its shards: waiting for "
                    f"{_some(waiting)}; counted {_some(counted)})")
        if pos.unit >= len(units):
            return f"the data stream (epoch {pos.epoch}, past its last unit)"
        after = f" or the next unit {units[pos.unit + 1]}" if pos.unit + 1 < len(units) else ""
        return f"the data stream (epoch {pos.epoch}, reading {units[pos.unit]} from offset {pos.offset}{after})"

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = self.position.to_dict()
        if (epoch := self.position.epoch) in self._regrouped:  # a dealt epoch: its plan is not derivable
            out |= {"plan": [u.to_list() for u in self._plans[epoch]], "batches": self._regrouped[epoch]}
        return out

    def load(self, state: dict[str, Any]) -> None:
        if self._started:
            raise RuntimeError("load() after start_early(): the started pipeline reads from the old position")
        self.position = DataPosition.from_dict(state)
        if "plan" in state:
            with self._lock:
                self._plans[self.position.epoch] = [Unit(*u) for u in state["plan"]]
            self._regrouped[self.position.epoch] = int(state["batches"])


class EmptyEpoch(RuntimeError):
    """An epoch without a single step for every rank: the run can never progress."""
