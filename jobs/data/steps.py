"""Equal steps on every rank: the epoch's steps agreed once, in one all-reduce (MIN), over the ranks'
streams (jobs.data.stream); evaluation passes go while every rank still has a batch."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist

from jobs import watchdog
from jobs.collectives import all_have, all_reduce_dict
from jobs.data.mixture import MixtureStream
from jobs.data.stream import EmptyEpoch, RankStream

log = logging.getLogger(__name__)


def _agree_min(value: int, device: torch.device | str) -> int:
    return int(all_reduce_dict({"v": value}, device, op=dist.ReduceOp.MIN)["v"])


def synchronized_steps(stream: RankStream | MixtureStream, micro_batches: int,
                       device: torch.device | str) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Steps of `micro_batches` batches forever; every rank yields the same number per epoch.

    One collective per epoch (the agreed steps), none per step. An epoch in which the ranks cannot
    agree on a single step raises: its next epoch would end the same way, forever (a rank's share
    of the data smaller than one step).
    """
    if isinstance(stream, MixtureStream):  # endless on every rank: no epochs to agree on
        it = stream.epoch()
        while True:
            with watchdog.waiting(stream.describe):
                step = [next(it) for _ in range(micro_batches)]
            yield step
    while True:
        with watchdog.waiting(stream.describe, watchdog.STARTUP_ALLOWANCE):
            have = stream.planned_batches() // micro_batches
        # at an epoch's start the other ranks may still be counting their shards
        with watchdog.waiting("the other ranks to agree on the epoch's steps (all-reduce)",
                              watchdog.COLLECTIVE_ALLOWANCE * watchdog.STARTUP_ALLOWANCE):
            agreed = _agree_min(have, device)
        if agreed == 0:
            raise EmptyEpoch(f"epoch {stream.epoch_number} gave the ranks no full step of {micro_batches} "
                             "batch(es): a rank's share of the data is smaller than train.batch_size × "
                             "train.grad_accum samples (or all of it is bad)")
        it, short = stream.epoch(ahead_after=(agreed - stream.steps_done) * micro_batches // 2), 0
        try:
            while stream.steps_done < agreed:
                step = []
                for _ in range(micro_batches):
                    first = stream.steps_done == 0 and not step
                    with watchdog.waiting(stream.describe, watchdog.STARTUP_ALLOWANCE if first else 1.0):
                        batch = next(it, None)
                        if batch is None:  # bad samples: this rank's part is short of the agreed steps
                            if not short:
                                log.warning("rank %d: bad samples left its part of epoch %d short of the %d agreed "
                                            "steps at step %d; repeating its first batches of the epoch",
                                            stream.rank, stream.epoch_number, agreed, stream.steps_done + 1)
                            short += 1
                            batch = stream.filler()
                    step.append(batch)
                stream.steps_done += 1
                yield step
        finally:
            it.close()  # type: ignore[attr-defined]
        if short:
            log.warning("rank %d: %d batch(es) of epoch %d repeated", stream.rank, short, stream.epoch_number)
        stream.next_epoch()


def synchronized_batches(stream: RankStream, device: torch.device | str,
                         max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """One pass (evaluation): batches while every rank still has one."""
    it = stream.epoch()
    n = 0
    try:
        while max_batches is None or n < max_batches:
            batch = next(it, None)
            if not all_have(batch is not None, device):
                return
            n += 1
            yield batch  # type: ignore[misc]
    finally:
        it.close()  # type: ignore[attr-defined]
