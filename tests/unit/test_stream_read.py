"""One streaming tar parser (formats.iter_tar_groups) under every reader (#19 item 4): a unit of a
shard without byte offsets (a compressed tar) is streamed to its end and no further, a transient
I/O error mid-stream reopens and goes on, an ungrouped tar is regrouped whole, and whole-shard
passes stream."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from jobs.data import reader
from jobs.data.formats import TruncatedTar, iter_tar_groups
from jobs.data.reader import ReadSpec, ShardReport, iter_unit_rows, read_shard
from tests.unit.test_reader import sample, write_tar

SPEC = ReadSpec(image_size=16)


def _gz(path: Path, members: list[tuple[str, bytes]]) -> Path:
    plain = write_tar(path.with_suffix(".plain"), members)
    path.write_bytes(gzip.compress(plain.read_bytes()))
    return path


def test_the_parser_yields_runs_of_a_key_and_names_the_key_a_cut_falls_in(tmp_path: Path) -> None:
    data = write_tar(tmp_path / "a.tar", sample("k0") + sample("k1") + [("k0.npz", b"x")]).read_bytes()
    assert [k for k, _ in iter_tar_groups(io.BytesIO(data))] == ["k0", "k1", "k0"]  # ungrouped: k0 twice
    groups = iter_tar_groups(io.BytesIO(data[:5000]))  # inside the data of k1's first member
    assert next(groups)[0] == "k0"
    with pytest.raises(TruncatedTar) as cut:
        next(groups)
    assert cut.value.key == "k1"


def test_a_unit_of_a_compressed_tar_is_streamed_to_its_end_and_no_further(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    members = [m for i in range(12) for m in sample(f"{i:03d}", f"caption {i}")]
    shard = _gz(tmp_path / "c.tar.gz", members)
    read: list[str] = []
    real = reader.iter_tar_groups

    def counting(f: Any):  # noqa: ANN202 - generator
        for key, parts in real(f):
            read.append(key)
            yield key, parts

    monkeypatch.setattr(reader, "iter_tar_groups", counting)
    rows = list(iter_unit_rows(str(shard), SPEC, 4, 8))
    assert sorted(r["key"] for r in rows) == ["004", "005", "006", "007"]
    assert read == [f"{i:03d}" for i in range(9)]  # up to the first key past the unit: the rest is not read
    whole, report = read_shard(str(shard), SPEC)  # a whole-shard pass streams the same way
    assert len(whole) == 12 and report.good == 12 and not report.bad


def test_a_transient_error_mid_stream_reopens_the_shard_and_skips_what_was_read(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    shard = write_tar(tmp_path / "s.tar", [m for i in range(6) for m in sample(f"{i:03d}")])
    local = pafs.LocalFileSystem()
    opened: list[int] = []

    class Flaky:
        def open_input_stream(self, path: str, compression: Any = None) -> Any:
            opened.append(1)
            data = local.open_input_stream(path).read()
            if len(opened) > 1:
                return io.BytesIO(data)

            class Breaks(io.BytesIO):
                def read(self, n: int = -1) -> bytes:
                    if self.tell() > len(data) // 2:
                        raise OSError("connection reset by peer")
                    return super().read(n)

            return Breaks(data)

    monkeypatch.setattr(reader, "filesystem_for", lambda uri, storage: (Flaky(), uri))
    monkeypatch.setattr(reader.time, "sleep", lambda s: None)
    report = ShardReport(shard=str(shard))
    keys = [r.key for r in reader._stream_tar(str(shard), SPEC.storage, report)]
    assert keys == [f"{i:03d}" for i in range(6)] and len(opened) == 2 and not report.bad


def test_an_ungrouped_tar_is_regrouped_whole(tmp_path: Path) -> None:
    members = sample("a")[:1] + sample("b") + sample("a")[1:]  # a.jpg, b.*, a.txt, a.json
    shard = write_tar(tmp_path / "u.tar", members)
    raws, report = read_shard(str(shard), SPEC)
    assert [r.key for r in raws] == ["a", "b"] and report.ungrouped and report.good == 2
    rows = list(iter_unit_rows(str(shard), SPEC, 0, 2))
    assert sorted(r["key"] for r in rows) == ["a", "b"]


def test_the_drivers_data_check_streams_a_tar_and_keeps_only_flags(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    members = sample("a") + [("b.jpg", b"x")] + sample("c", "  ")  # b: no caption; c: blank caption
    shard = write_tar(tmp_path / "f.tar", members)

    def no_whole_read(*_: Any, **__: Any) -> bytes:
        raise AssertionError("a grouped tar must not be read whole")

    monkeypatch.setattr(reader, "_fetch", no_whole_read)
    flags, report = reader.sample_flags(str(shard), SPEC)
    assert flags == [True, False, False] and report.good == 1
    assert report.bad == {"b": "missing_caption", "c": "empty_caption"}
    ungrouped = write_tar(tmp_path / "g.tar", sample("a")[:1] + sample("b") + sample("a")[1:])
    with pytest.raises(AssertionError, match="must not be read whole"):  # regrouping reads it whole
        reader.sample_flags(str(ungrouped), SPEC)
    monkeypatch.undo()
    assert reader.sample_flags(str(ungrouped), SPEC)[0] == [True, True]
