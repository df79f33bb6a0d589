"""jobs.data.formats: deterministic WebDataset shards, streamed back grouped by key."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from jobs.data.formats import (
    RawSample,
    ShardWriter,
    caption,
    image_bytes,
    iter_shard,
    iter_tar_samples,
)
from jobs.storage import StorageOptions, read_bytes

SAMPLES = {
    f"00000{i:04d}": {"jpg": bytes([i]) * (100 + i), "txt": f" caption {i}\n".encode(), "json": b"{}"}
    for i in range(5)
}


def _write(uri: str, options: StorageOptions | None = None) -> None:
    with ShardWriter(uri, options) as writer:
        for key, members in SAMPLES.items():
            writer.write(key, members)
        assert writer.count == 5


def test_members_adjacent_with_fixed_headers(tmp_path: Path) -> None:
    uri = str(tmp_path / "s" / "00000.tar")
    _write(uri)
    with tarfile.open(uri) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    assert len(members) == 15
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def test_bytes_deterministic(tmp_path: Path) -> None:
    _write(str(tmp_path / "a.tar"))
    _write(str(tmp_path / "b.tar"))
    assert read_bytes(str(tmp_path / "a.tar")) == read_bytes(str(tmp_path / "b.tar"))


def test_round_trip_counts_and_parts(tmp_path: Path) -> None:
    uri = str(tmp_path / "00000.tar")
    _write(uri)
    samples = list(iter_shard(uri))
    assert [s.key for s in samples] == list(SAMPLES)
    assert all(s.shard == uri for s in samples)
    assert samples[3].parts == SAMPLES["000000003"]
    assert image_bytes(samples[2]) == bytes([2]) * 102
    assert caption(samples[4]) == "caption 4"


def test_writer_rejects_bad_keys(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path / "x.tar")) as writer:
        writer.write("k1", {"txt": b"a"})
        with pytest.raises(ValueError, match="contain no '.'"):
            writer.write("a.b", {"txt": b"a"})
        with pytest.raises(ValueError, match="written twice"):
            writer.write("k1", {"txt": b"a"})
        with pytest.raises(ValueError, match="bad extension '.jpg'"):
            writer.write("k2", {"txt": b"a", ".jpg": b"b"})
    # the failed k2 wrote nothing, not even its valid txt
    assert [s.key for s in iter_shard(str(tmp_path / "x.tar"))] == ["k1"]


def test_failed_write_removes_partial_shard(tmp_path: Path) -> None:
    uri = tmp_path / "partial.tar"
    with pytest.raises(RuntimeError), ShardWriter(str(uri)) as writer:
        writer.write("k1", {"txt": b"a"})
        raise RuntimeError("boom")
    assert not uri.exists()


def _tar_bytes(entries: list[tuple[str, bytes | None]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_grouping_by_first_dot_skips_dirs_and_keyless() -> None:
    data = _tar_bytes(
        [
            ("shard0", None),
            ("shard0/000010003.JPG", b"img"),
            ("shard0/000010003.seg.png", b"seg"),
            ("shard0/000010003.txt", b"a cat"),
            ("shard0/._000010003.jpg", b"apple double"),
            ("shard0/README", b"no extension"),
            ("shard0/000010004.jpeg", b"img2"),
            ("000010005.txt", b"  "),
        ],
        mode="w:gz",  # "r|*" detects compression from the bytes
    )
    samples = list(iter_tar_samples(io.BytesIO(data), shard="mem"))
    assert [(s.key, sorted(s.parts)) for s in samples] == [
        ("000010003", ["jpg", "seg.png", "txt"]),
        ("000010004", ["jpeg"]),
        ("000010005", ["txt"]),
    ]
    assert image_bytes(samples[1]) == b"img2"
    assert caption(samples[2]) is None  # blank caption counts as none
    assert image_bytes(samples[2]) is None


def test_truncated_tar_raises() -> None:
    data = _tar_bytes([("k.txt", b"x" * 5000)])
    with pytest.raises(tarfile.ReadError):
        list(iter_tar_samples(io.BytesIO(data[:1000]), shard="cut"))


def test_caption_missing() -> None:
    assert caption(RawSample(key="k", shard="s", parts={"jpg": b""})) is None


def test_s3_shard_round_trip(s3_server) -> None:
    bucket = s3_server.create_bucket()
    opts = StorageOptions(endpoint_url=s3_server.endpoint_url)
    uri = f"s3://{bucket}/wds/00000.tar"
    _write(uri, opts)
    samples = list(iter_shard(uri, opts))
    assert len(samples) == 5
    assert samples[0].parts == SAMPLES["000000000"]
