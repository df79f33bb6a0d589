"""Shards cut into units: indexes, each rank reading and decoding only its own units, equal steps
agreed once per epoch, the next epoch started ahead, exact resume inside a unit, a rank left short
by bad samples, and closing. Ray Data is replaced by the same task body run in-process."""

from __future__ import annotations

import io
import tarfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobs.data import index as shard_index
from jobs.data import reader
from jobs.data import steps as steps_module
from jobs.data.steps import synchronized_steps
from jobs.data.stream import DataPosition, EmptyEpoch, RankStream
from jobs.data.units import Unit, rank_units
from jobs.storage import StorageOptions
from tests.unit.streams import FakeDataset, sample_ids, stream_spec, write_shard

# -- indexes -----------------------------------------------------------------------------------------


def test_the_writers_index_matches_a_scan_and_ranges_hold_exactly_their_samples(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "a.tar", 7)
    written = shard_index.shard_index(shard, StorageOptions())
    with open(shard, "rb") as f:
        scanned = shard_index.scan_tar(f)
    assert written.samples == scanned.samples == 7 and written.offsets == scanned.offsets
    data = Path(shard).read_bytes()
    lo, hi = written.offsets[2], written.offsets[5]  # type: ignore[index]
    part = reader._read_tar(data[lo:hi], reader.ShardReport(shard))
    assert [r.key for r in part] == ["00002", "00003", "00004"]


def test_a_scan_counts_keys_as_the_reader_groups_them(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("a.jpg", "b.jpg", "a.txt", "c.jpg", "c.txt"):  # a's members apart: ungrouped
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"xyz"))
    ungrouped = shard_index.scan_tar(io.BytesIO(buf.getvalue()))
    assert ungrouped.samples == 3 and ungrouped.offsets is None
    shard = write_shard(tmp_path / "t.tar", 4)
    data = Path(shard).read_bytes()[:shard_index.shard_index(shard, StorageOptions()).offsets[3] + 700]  # type: ignore[index]
    cut = shard_index.scan_tar(io.BytesIO(data))
    report = reader.ShardReport(shard)
    kept = reader._read_tar(data, report)
    assert cut.truncated_key == "00003" and report.bad == {"00003": "truncated_tar"}  # the cut key is not counted
    assert cut.samples == len(kept) == 3 and cut.offsets is not None and len(cut.offsets) == 4


# -- which rank reads what ---------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [[300, 1100, 70], [5000], [40] * 11], ids=["fewer", "one", "more"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_units_partition_every_sample_once_per_epoch(counts: list[int], world: int) -> None:
    shards = [f"s{i}.tar" for i in range(len(counts))]
    size = dict(zip(shards, counts, strict=True))
    for epoch in (0, 1):
        seen: Counter[tuple[str, int]] = Counter()
        per_rank = []
        for rank in range(world):
            units = rank_units(shards, size.__getitem__, epoch, rank, world, seed=3, unit_samples=256)
            assert all(0 < u.samples <= 256 for u in units)
            seen.update((u.shard, i) for u in units for i in range(u.start, u.stop))
            per_rank.append(sum(u.samples for u in units))
        assert set(seen.values()) == {1} and len(seen) == sum(counts)
        if len(shards) < world:  # laid end to end: equal parts, +-1 sample
            assert max(per_rank) - min(per_rank) <= 1


def test_fewer_shards_than_ranks_decode_each_sample_once_in_all(tmp_path: Path, tokenizer: str,
                                                                no_ray: type[FakeDataset],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    shards = [write_shard(tmp_path / "a.tar", 48, prefix="a"), write_shard(tmp_path / "b.tar", 40, prefix="b")]
    decoded = Counter[str]()
    real = reader.decode_image

    def counting(data: bytes, size: int) -> np.ndarray:
        decoded[threading.current_thread().name] += 1
        return real(data, size)

    monkeypatch.setattr(reader, "decode_image", counting)
    ids: list[int] = []
    for rank in range(4):
        s = RankStream(shards, stream_spec(tokenizer), batch_size=2, rank=rank, world=4, seed=1, unit_samples=16,
                       next_epoch_ahead=False)
        ids += sample_ids(list(s.epoch()))
    assert sum(decoded.values()) == 88  # O(data): not 4 ranks x 88
    assert len(ids) == len(set(ids)) == 88


# -- the stream --------------------------------------------------------------------------------------


def _two_ranks(tmp_path: Path, tokenizer: str, **kw: Any) -> list[RankStream]:
    shards = [write_shard(tmp_path / f"{i}.tar", n, prefix=f"{i}x") for i, n in enumerate((30, 22, 26, 12))]
    return [RankStream(shards, stream_spec(tokenizer), batch_size=4, rank=r, world=2, seed=5, unit_samples=8, **kw)
            for r in range(2)]


def _agree_over(monkeypatch: pytest.MonkeyPatch, ranks: list[RankStream], micro: int) -> None:
    """The epoch's all-reduce MIN, computed from every rank's plan (the ranks run one after another here)."""
    monkeypatch.setattr(steps_module, "_agree_min", lambda have, device: min(s.planned_batches() // micro for s in ranks))


def test_every_rank_takes_the_agreed_steps_and_the_next_epoch_starts_ahead(tmp_path: Path, tokenizer: str,
                                                                          no_ray: type[FakeDataset],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ranks = _two_ranks(tmp_path, tokenizer, next_epoch_ahead=True)
    _agree_over(monkeypatch, ranks, 2)
    plans = [s.planned_batches() for s in ranks]
    assert plans == [12, 10]  # epoch 0: shards {22, 26} and {30, 12} samples (by the seeded order), batches of 4
    for s in ranks:
        steps = synchronized_steps(s, 2, "cpu")
        taken = [next(steps) for _ in range(5)]  # epoch 0 holds 10 // 2 = 5 steps on both ranks
        assert s.epoch_number == 0 and s.steps_done == 5 and all(len(t) == 2 for t in taken)
        ahead = s._started[(1, 0, 0)]  # started half-way through epoch 0's agreed steps
        ahead.thread.join(10)
        assert no_ray.opened[-2:] == [0, 1] and ahead.box["first"] is not None  # its first batch is ready
        next(steps)
        assert s.epoch_number == 1 and s.steps_done == 1
        steps.close()
        s.close()
    assert no_ray.opened.count(1) == 2  # the epoch started ahead was the one used
    assert sorted(no_ray.closed) == sorted(no_ray.opened)  # every pipeline closed


def test_resume_inside_a_unit_continues_exactly(tmp_path: Path, tokenizer: str, no_ray: type[FakeDataset]) -> None:
    whole, = _two_ranks(tmp_path, tokenizer, next_epoch_ahead=False)[:1]
    expected = sample_ids(list(whole.epoch()))
    first, = _two_ranks(tmp_path, tokenizer, next_epoch_ahead=False)[:1]
    it = first.epoch()
    head = [next(it) for _ in range(3)]  # 12 samples: inside a unit (units of 8 and shorter shard ends)
    state = first.state()
    it.close()
    assert 0 < state["offset"] < first.units(0)[state["unit"]].samples
    again, = _two_ranks(tmp_path, tokenizer, next_epoch_ahead=False)[:1]
    again.load(state)
    assert sample_ids(head) + sample_ids(list(again.epoch())) == expected


def test_bad_samples_leave_a_rank_short_and_it_fills_instead_of_hanging(tmp_path: Path, tokenizer: str,
                                                                       no_ray: type[FakeDataset],
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    spec = stream_spec(tokenizer)
    clean = write_shard(tmp_path / "clean.tar", 16, prefix="c")
    dirty = write_shard(tmp_path / "dirty.tar", 16, bad=tuple(range(10)), prefix="d")  # 6 good, by the index 16
    ranks = [RankStream([clean, dirty], spec, batch_size=2, rank=r, world=2, seed=None, unit_samples=8,
                        next_epoch_ahead=True)
             for r in range(2)]
    _agree_over(monkeypatch, ranks, 1)
    per_rank = []
    for s in ranks:
        steps = synchronized_steps(s, 1, "cpu")
        per_rank.append([next(steps) for _ in range(8)])  # the agreed 8 steps of epoch 0
        assert s.steps_done == 8
        steps.close()
    assert ranks[0].repeated_batches == 0 and ranks[1].repeated_batches == 5  # 3 good batches, 5 repeated
    batches = [b for step in per_rank[1] for b in step]
    assert sample_ids(batches[3:6]) == sample_ids(batches[:3]) and len(set(sample_ids(batches))) == 6
    assert "rank 1: bad samples left its part of epoch 0 short of the 8 agreed steps at step 4" in caplog.text
    all_bad = RankStream([write_shard(tmp_path / "bad.tar", 4, bad=(0, 1, 2, 3))], spec, batch_size=2, rank=0, world=1,
                         seed=None)
    with pytest.raises(EmptyEpoch, match="rank 0 has no good sample in epoch 0"):
        next(synchronized_steps(all_bad, 1, "cpu"))


def test_an_older_position_moves_on_to_the_next_epoch_and_describe_names_the_unit(tmp_path: Path, tokenizer: str,
                                                                                  no_ray: type[FakeDataset]) -> None:
    s = _two_ranks(tmp_path, tokenizer)[0]
    s.load({"epoch": 2, "shard_pos": 1, "offset": 9})
    assert s.position == DataPosition(3, 0, 0, 0)
    assert "reading the sample counts of its shards" in s.describe()
    units = s.units(3)
    assert s.describe() == (f"the data stream (epoch 3, reading {units[0]} from offset 0 or the next unit "
                            f"{units[1]})")
    assert isinstance(units[0], Unit) and str(units[0]).endswith(f"[{units[0].start}:{units[0].stop}]")


def test_a_parquet_unit_reads_only_its_row_groups_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(buf, format="JPEG")
    n = 10
    table = pa.table({"jpg": [buf.getvalue()] * n, "caption": [f"caption {i}" if i != 5 else "" for i in range(n)]})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path, row_group_size=3)
    index = shard_index.shard_index(str(path), StorageOptions())
    assert index.samples == n and index.offsets is None
    reports: list[reader.ShardReport] = []
    rows = list(reader.iter_unit_rows(str(path), reader.ReadSpec(image_size=16), 4, 8, on_report=reports.append))
    assert [r["key"] for r in rows] == ["000000004", "000000006", "000000007"]  # 5's caption is empty
    assert reports[-1].unit == "4:8" and reports[-1].good == 3 and reports[-1].bad == {"000000005": "empty_caption"}
