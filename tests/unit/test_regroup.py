"""Resuming an epoch on another number of ranks (#20 item 2): what the old ranks had left of it is
dealt to the new ones (jobs.data.units.remaining / deal, RankStream.regroup), so within the epoch no
sample is read twice and none is lost but the remainders that fill no batch; a checkpoint inside a
dealt epoch resumes exactly. Ray Data is replaced by the same task body in-process (tests/unit/streams.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from jobs.data.stream import RankStream
from jobs.data.units import Unit, deal, rank_units, remaining
from tests.unit.streams import FakeDataset, sample_ids, stream_spec, write_shard


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_the_rest_of_an_epoch_is_dealt_once_and_evenly(world: int) -> None:
    shards = [f"s{i}.tar" for i in range(4)]
    size = dict(zip(shards, (30, 22, 26, 12), strict=True))
    old = [rank_units(shards, size.__getitem__, 0, r, 2, seed=5, unit_samples=8) for r in range(2)]
    # old rank 0 stopped 3 samples into its second unit, old rank 1 inside its first
    rest = remaining(old[0], 1, 3) + remaining(old[1], 0, 5)
    assert rest[0] == Unit(old[0][1].shard, old[0][1].start, old[0][1].stop, begin=3)
    assert sum(u.samples for u in rest) == sum(u.samples for part in old for u in part) - old[0][0].samples - 3 - 5
    parts = deal(rest, world)
    sizes = [sum(u.samples for u in p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(u.samples for u in rest)
    # every (unit, position) of the rest in exactly one part
    covered = Counter((u.shard, u.start, i) for p in parts for u in p for i in range(u.begin, u.last))
    wanted = Counter((u.shard, u.start, i) for u in rest for i in range(u.begin, u.last))
    assert covered == wanted and set(covered.values()) == {1}
    assert remaining(old[0], len(old[0]), 0) == []  # past its last unit: nothing left


def _streams(shards: list[str], tokenizer: str, world: int, batch: int = 4) -> list[RankStream]:
    return [RankStream(shards, stream_spec(tokenizer), batch_size=batch, rank=r, world=world, seed=5, unit_samples=8)
            for r in range(world)]


@pytest.mark.parametrize(("old_world", "new_world"), [(2, 1), (1, 2), (2, 3)])
def test_an_epoch_interrupted_on_n_ranks_goes_on_over_m_with_no_sample_twice(
        tmp_path: Path, tokenizer: str, no_ray: type[FakeDataset], old_world: int, new_world: int) -> None:
    shards = [write_shard(tmp_path / f"{i}.tar", n, prefix=f"{i}x") for i, n in enumerate((32, 24, 24, 16))]  # 96
    before: list[int] = []
    states = []
    for s in _streams(shards, tokenizer, old_world):
        it = s.epoch()
        before += sample_ids([next(it) for _ in range(3)])  # 12 samples a rank: inside a unit of 8
        s.steps_done = 3
        states.append(s.state())
        it.close()
    after: list[int] = []
    for s in _streams(shards, tokenizer, new_world):
        s.regroup(states, micro_batches=1)
        assert s.position.epoch == 0 and s.steps_done == 3
        assert s.planned_batches() == 3 + sum(u.samples for u in s.units(0)) // 4
        after += sample_ids(list(s.epoch()))
    assert not set(before) & set(after) and len(after) == len(set(after))
    left = 96 - len(before)
    assert left - len(after) < new_world * 4  # only the parts' remainders that fill no batch of 4
    if left % (new_world * 4) == 0:
        assert len(set(before) | set(after)) == 96  # every sample of the epoch, once


def test_a_checkpoint_inside_a_dealt_epoch_resumes_exactly(tmp_path: Path, tokenizer: str,
                                                           no_ray: type[FakeDataset]) -> None:
    shards = [write_shard(tmp_path / f"{i}.tar", n, prefix=f"{i}x") for i, n in enumerate((32, 24, 24, 16))]
    states = []
    for s in _streams(shards, tokenizer, 2):
        it = s.epoch()
        [next(it) for _ in range(2)]
        states.append(s.state())
        it.close()
    whole = _streams(shards, tokenizer, 3)[1]
    whole.regroup(states)
    expected = sample_ids(list(whole.epoch()))
    first = _streams(shards, tokenizer, 3)[1]
    first.regroup(states)
    it = first.epoch()
    head = [next(it) for _ in range(3)]
    saved = first.state()
    it.close()
    assert saved["batches"] == first.planned_batches() and len(saved["plan"]) == len(first.units(0))
    again = _streams(shards, tokenizer, 3)[1]
    again.load(saved)  # the same world again: the dealt plan comes back from the position
    assert again.planned_batches() == saved["batches"]
    assert sample_ids(head) + sample_ids(list(again.epoch())) == expected
    again.next_epoch()
    assert "plan" not in again.state()  # the epoch after is the default plan of the new world


def test_old_ranks_in_different_epochs_continue_at_the_next_epoch(tmp_path: Path, tokenizer: str,
                                                                  no_ray: type[FakeDataset],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    shards = [write_shard(tmp_path / f"{i}.tar", 16, prefix=f"{i}x") for i in range(2)]
    s = _streams(shards, tokenizer, 1)[0]
    s.regroup([{"epoch": 1, "unit": 0, "offset": 3, "steps": 0}, {"epoch": 2, "unit": 1, "offset": 0, "steps": 0}])
    assert s.state() == {"epoch": 3, "unit": 0, "offset": 0, "steps": 0}
    assert "in different epochs ([1, 2]): continuing at the start of epoch 3" in caplog.text
