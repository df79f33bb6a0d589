"""WebDataset tar shards in img2dataset's layout: KEY.jpg, KEY.txt, KEY.json, one key's members adjacent.

Reading is streaming (tar mode "r|*") so a shard is consumed front to back from S3 without seeks
or a local copy; writing is byte-deterministic so a dataset made twice from one seed is identical.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import BinaryIO

from jobs.storage import StorageOptions, filesystem_for, is_remote

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".index.json"  # beside each shard written here: its sample offsets (jobs.data.index)


class ShardWriter:
    """Write one tar shard to any URI; use as a context manager.

    Headers carry no time or owner (mtime 0, uid/gid 0, empty names, mode 0o644), so the bytes
    depend only on the samples written. Closing writes `<uri>.index.json` too: the samples' byte
    offsets, so that a reader can fetch and decode only a range of them (jobs.data.index).
    """

    def __init__(self, uri: str, options: StorageOptions | None = None) -> None:
        self.uri = uri
        self.count = 0  # samples written so far
        self._keys: set[str] = set()
        filesystem, path = filesystem_for(uri, options)
        self._filesystem, self._path = filesystem, path
        if not is_remote(uri):
            filesystem.create_dir(posixpath.dirname(path) or "/", recursive=True)
        self._stream = filesystem.open_output_stream(path, compression=None)
        self._tar = tarfile.open(fileobj=self._stream, mode="w|", format=tarfile.PAX_FORMAT)
        self._offsets: list[int] = []  # where each sample starts: <shard>.index.json (jobs.data.index)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; `members` maps extension (no dot) -> bytes, e.g. {"jpg": ..., "txt": ...}."""
        # Readers group members by the name up to the first dot, so a dot or slash in the key, or a
        # key repeated later in the shard, would silently split or merge samples on read.
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        if key in self._keys:
            raise ValueError(f"sample key {key!r} written twice to {self.uri}")
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        for ext in members:  # validate all before writing any: no half-written sample
            if not ext or ext.startswith(".") or "/" in ext:
                raise ValueError(f"sample {key!r}: bad extension {ext!r} (expected e.g. 'jpg')")
        self._offsets.append(self._tar.offset)
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self.count += 1

    def close(self) -> None:
        from jobs.data.index import encode_index

        end = self._tar.offset
        self._tar.close()  # writes the end-of-archive blocks; does not close a given fileobj
        self._stream.close()
        with self._filesystem.open_output_stream(self._path + INDEX_SUFFIX, compression=None) as f:
            f.write(encode_index([*self._offsets, end]).encode())

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        if exc_type is not None:
            # A half-written shard would be read later as a valid but short one: remove it.
            for path in (self._path, self._path + INDEX_SUFFIX):
                try:
                    self._filesystem.delete_file(path)
                except OSError:
                    pass


@dataclass
class RawSample:
    """One sample as stored: its key, the shard it came from and its undecoded members."""

    key: str
    shard: str
    parts: dict[str, bytes] = field(default_factory=dict)  # extension (lower-case, no dot) -> bytes


def _split_name(name: str) -> tuple[str, str]:
    """Key up to the FIRST dot of the basename: dir/000010003.seg.png -> (000010003, seg.png)."""
    base = posixpath.basename(name)
    key, _, ext = base.partition(".")
    return key, ext.lower()


def sample_members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, key, extension) of each regular file of an open tar that names a sample's part
    (KEY.EXT); directories, links and names without a key or an extension are passed over."""
    for member in tar:
        if not member.isfile():
            continue
        key, ext = _split_name(member.name)
        if key and ext:
            yield member, key, ext


class TruncatedTar(tarfile.ReadError):
    """The tar ends (or breaks) inside the members of `key` (None: before the first one)."""

    def __init__(self, key: str | None, cause: BaseException) -> None:
        super().__init__(f"tar breaks off after key {key}: {cause}")
        self.key, self.cause = key, cause


def _read_errors() -> tuple[type[BaseException], ...]:
    import zlib

    return tarfile.TarError, EOFError, OSError, zlib.error


def iter_tar_groups(fileobj: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each run of consecutive members that share a key, streaming
    (tar mode "r|*": front to back, no seeks, one sample in memory). The one tar parser of mmpt:
    the writer's index, the runs' reader (jobs.data.reader) and the benchmarks read through it.

    A key whose members are not adjacent comes out twice (the caller decides: regroup or not).
    Directories, links and members without a key or an extension are passed over. A corrupt or
    truncated tar raises TruncatedTar naming the key being read (its group is not yielded).
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member, k, ext in sample_members(tar):
                if k != key and key is not None:
                    yield key, parts
                    parts = {}
                key = k
                extracted = tar.extractfile(member)
                parts[ext] = extracted.read() if extracted is not None else b""
    except _read_errors() as exc:
        raise TruncatedTar(key, exc) from exc
    if key is not None:
        yield key, parts


def iter_tar_samples(fileobj: BinaryIO, shard: str) -> Iterator[RawSample]:
    """Stream samples out of a tar (iter_tar_groups); a corrupt or truncated tar raises
    TruncatedTar (a tarfile.ReadError): the caller decides the error policy."""
    for key, parts in iter_tar_groups(fileobj):
        yield RawSample(key=key, shard=shard, parts=parts)


def iter_shard(uri: str, options: StorageOptions | None = None) -> Iterator[RawSample]:
    """Stream the samples of one shard at any URI (local or s3://)."""
    filesystem, path = filesystem_for(uri, options)
    # compression=None: tarfile's "r|*" detects gzip/bz2/xz itself, from the bytes, not the name.
    with filesystem.open_input_stream(path, compression=None) as stream:
        yield from iter_tar_samples(stream, shard=uri)  # type: ignore[arg-type]


def image_bytes(sample: RawSample) -> bytes | None:
    """The encoded image, from the first image extension present (in IMAGE_EXTENSIONS order)."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample.parts:
            return sample.parts[ext]
    return None


def caption(sample: RawSample) -> str | None:
    """The txt member, utf-8 decoded and stripped; None when missing or blank (no text to learn)."""
    data = sample.parts.get("txt")
    if data is None:
        return None
    text = data.decode("utf-8").strip()
    return text or None
