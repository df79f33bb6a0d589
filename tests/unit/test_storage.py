"""jobs.storage: URI -> filesystem, joins, small reads/writes, shard spec expansion (local and S3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pyarrow import fs as pafs

from jobs import storage
from jobs.storage import StorageOptions, expand_braces, expand_shards, filesystem_for, join


def _s3_kwargs(filesystem: pafs.FileSystem) -> dict[str, object]:
    """The options an S3FileSystem was built with (what it pickles to)."""
    return filesystem.__reduce__()[1][0]


def test_local_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    filesystem, path = filesystem_for("data/x.tar")
    assert isinstance(filesystem, pafs.LocalFileSystem)
    assert path == str(tmp_path / "data" / "x.tar")
    assert filesystem_for(f"file://{tmp_path}/y.tar")[1] == str(tmp_path / "y.tar")
    assert filesystem_for(str(tmp_path / "z"))[1] == str(tmp_path / "z")


def test_s3_endpoint_split_into_host_and_scheme() -> None:
    opts = StorageOptions(endpoint_url="http://127.0.0.1:5000", region="eu-west-1")
    filesystem, path = filesystem_for("s3://bkt/a/b.tar", opts)
    assert isinstance(filesystem, pafs.S3FileSystem)
    assert path == "bkt/a/b.tar"
    kwargs = _s3_kwargs(filesystem)
    assert (kwargs["endpoint_override"], kwargs["scheme"], kwargs["region"]) == (
        "127.0.0.1:5000",
        "http",
        "eu-west-1",
    )
    assert kwargs["access_key"] is None  # credentials left to the AWS chain, never stored


def test_s3_filesystem_cached_per_endpoint_and_region() -> None:
    a = StorageOptions(endpoint_url="https://minio.example:9000", region="us-east-1")
    first, _ = filesystem_for("s3://bkt/x", a)
    again, _ = filesystem_for("s3://other/y", a)
    other_region, _ = filesystem_for("s3://bkt/x", StorageOptions(a.endpoint_url, "us-west-2"))
    assert first is again
    assert other_region is not first
    assert _s3_kwargs(first)["scheme"] == "https"


def test_s3_defaults_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://localhost:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:9001")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert StorageOptions().resolved() == StorageOptions("http://s3only:9001", "ap-south-1")
    kwargs = _s3_kwargs(filesystem_for("s3://bkt/x")[0])
    assert (kwargs["endpoint_override"], kwargs["region"]) == ("s3only:9001", "ap-south-1")
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    assert StorageOptions().resolved() == StorageOptions(None, "us-east-1")


def test_bad_s3_uris_are_errors() -> None:
    with pytest.raises(ValueError, match="names no bucket"):
        filesystem_for("s3://")
    with pytest.raises(ValueError, match="must use http:// or https://"):
        filesystem_for("s3://bkt/x", StorageOptions(endpoint_url="ftp://host:21", region="r1"))


def test_is_remote_and_join() -> None:
    assert storage.is_remote("s3://b/k") and not storage.is_remote("/tmp/x")
    assert join("s3://b/", "train", "00000.tar") == "s3://b/train/00000.tar"
    assert join("s3://", "b", "k") == "s3://b/k"
    assert join("data/shapes", "/eval/", "x.tar") == "data/shapes/eval/x.tar"
    assert join("/", "x") == "/x"
    assert join("s3://b/k") == "s3://b/k"


def test_read_write_local_creates_parents(tmp_path: Path) -> None:
    uri = str(tmp_path / "a" / "b" / "c.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00\x01gz")
    storage.write_text(str(tmp_path / "a" / "t.txt"), "héllo")
    assert storage.read_bytes(uri) == b"\x00\x01gz"
    assert storage.read_text(str(tmp_path / "a" / "t.txt")) == "héllo"
    assert storage.exists(uri) and storage.exists(str(tmp_path / "a"))


def test_read_bytes_does_not_inflate_gz(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "x.gz"), b"not gzip at all")
    assert storage.read_bytes(str(tmp_path / "x.gz")) == b"not gzip at all"


def test_expand_braces() -> None:
    assert expand_braces("x/{a,b}.tar") == ["x/a.tar", "x/b.tar"]
    assert expand_braces("{00008..00011}.tar") == ["00008.tar", "00009.tar", "00010.tar", "00011.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{0..1}-{a,b}") == ["0-a", "0-b", "1-a", "1-b"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("part-00001.tar", "part-00000.tar", "other-0.tar", "notes.txt", "part-x.parquet"):
        (folder / name).write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "nested.tar").write_bytes(b"x")
    return folder


def test_expand_shards_local_forms(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(shard_dir)
    everything = [f"{d}/other-0.tar", f"{d}/part-00000.tar", f"{d}/part-00001.tar"]
    assert expand_shards(d) == everything  # folder: direct files with the suffix, sorted
    assert expand_shards(d + "/") == everything
    assert expand_shards(f"{d}/part-") == everything[1:]  # key prefix
    assert expand_shards(f"{d}/part-", suffixes=(".parquet",)) == [f"{d}/part-x.parquet"]
    assert expand_shards(f"{d}/part-{{00000..00002}}.tar") == [  # brace: not stat'ed
        f"{d}/part-00000.tar",
        f"{d}/part-00001.tar",
        f"{d}/part-00002.tar",
    ]
    assert expand_shards(f"{d}/notes.txt") == [f"{d}/notes.txt"]  # a named file, whatever its suffix
    assert expand_shards([f"{d}/sub", f"{d}/other-0.tar"]) == [f"{d}/sub/nested.tar", f"{d}/other-0.tar"]
    monkeypatch.chdir(shard_dir.parent)
    assert expand_shards("shards/other-") == [f"{d}/other-0.tar"]  # relative -> absolute


def test_expand_shards_no_match_message(shard_dir: Path) -> None:
    spec = f"{shard_dir}/missing-"
    with pytest.raises(ValueError) as err:
        expand_shards(spec)
    assert str(err.value) == (
        f"no shards match {spec!r} (looked for ('.tar',) files in that folder, "
        "under that key prefix, or named by that pattern)"
    )
    with pytest.raises(ValueError, match="no shards match '.*nowhere/'"):
        expand_shards([str(shard_dir), f"{shard_dir}/nowhere/"])
    with pytest.raises(ValueError, match=r"no shards match .*\('\.zip',\)"):
        expand_shards(str(shard_dir), suffixes=(".zip",))
    with pytest.raises(ValueError, match=r"no shards match \[\]"):
        expand_shards([])


def test_s3_read_write_and_expand(s3_server) -> None:
    bucket = s3_server.create_bucket()
    opts = StorageOptions(endpoint_url=s3_server.endpoint_url)
    for name in ("cc/part-001.tar", "cc/part-000.tar", "cc/readme.md", "cc/deep/x.tar", "dd/only.tar"):
        storage.write_bytes(f"s3://{bucket}/{name}", name.encode(), opts)
    storage.write_text(f"s3://{bucket}/t.json", '{"a": 1}', opts)

    assert storage.read_bytes(f"s3://{bucket}/cc/part-001.tar", opts) == b"cc/part-001.tar"
    assert storage.read_text(f"s3://{bucket}/t.json", opts) == '{"a": 1}'
    assert storage.exists(f"s3://{bucket}/cc", opts)
    assert not storage.exists(f"s3://{bucket}/zz", opts)
    assert not storage.exists("s3://no-such-bucket/k", opts)

    base = f"s3://{bucket}/cc"
    assert expand_shards(base + "/", opts) == [f"{base}/part-000.tar", f"{base}/part-001.tar"]
    assert expand_shards(f"{base}/part-", opts) == [f"{base}/part-000.tar", f"{base}/part-001.tar"]
    assert expand_shards(f"{base}/part-{{000..002}}.tar", opts)[-1] == f"{base}/part-002.tar"
    assert expand_shards([f"s3://{bucket}/dd/only.tar", base + "/deep"], opts) == [
        f"s3://{bucket}/dd/only.tar",
        f"{base}/deep/x.tar",
    ]
    with pytest.raises(ValueError, match=f"no shards match 's3://{bucket}/nothing/'"):
        expand_shards(f"s3://{bucket}/nothing/", opts)


def test_s3_endpoint_from_env(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Ray worker sees: only env vars, no StorageOptions."""
    bucket = s3_server.create_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    storage.write_bytes(f"s3://{bucket}/k.bin", b"abc")
    assert storage.read_bytes(f"s3://{bucket}/k.bin") == b"abc"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
