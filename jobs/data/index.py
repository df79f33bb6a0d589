"""How many samples a shard holds, and where each one starts: what splitting shards into units needs.

A tar written by mmpt (`ShardWriter`: `mmpt data synth`, `mmpt data prepare`) gets
`<shard>.index.json` beside it, written with the shard: {"samples": n, "offsets": [b_0 .. b_n]},
sample i being the bytes [b_i, b_i+1) of the tar (its members' headers and data). Any other shard
is counted by one streaming pass over the tar (members are skipped, nothing is decoded), or from
a Parquet file's footer, once per process (cached).

Counts are of keys by first appearance, as the reader groups them (jobs.data.reader._read_tar); a
key cut by a truncation is not counted (it is reported bad by the unit that ends the shard).
Offsets exist only where a byte range holds exactly its samples: an uncompressed tar whose members
are grouped by key. Without them a unit reads the whole shard and keeps its own samples (it still
decodes only those).
"""

from __future__ import annotations

import gzip
import json
import logging
import tarfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from jobs.data.formats import INDEX_SUFFIX, sample_members
from jobs.storage import StorageOptions, filesystem_for

log = logging.getLogger(__name__)

_IO_ATTEMPTS = 3
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


@dataclass(frozen=True)
class ShardIndex:
    samples: int
    offsets: tuple[int, ...] | None = None  # samples + 1 byte offsets (tar, grouped, uncompressed)
    truncated_key: str | None = None  # the key a truncation cut (not counted)
    problem: tuple[str, str] | None = None  # (reason, detail): the whole shard is unusable


def index_uri(shard: str) -> str:
    return shard + INDEX_SUFFIX


def encode_index(offsets: list[int]) -> str:
    return json.dumps({"samples": len(offsets) - 1, "offsets": offsets}, separators=(",", ":"))


def _from_json(text: str) -> ShardIndex:
    doc = json.loads(text)
    offsets = doc.get("offsets")
    if offsets is not None and len(offsets) != doc["samples"] + 1:
        raise ValueError("offsets do not match samples")
    return ShardIndex(int(doc["samples"]), None if offsets is None else tuple(int(b) for b in offsets))


def scan_tar(fileobj: Any) -> ShardIndex:
    """Count a tar's samples (and their byte offsets) in one streaming pass, decoding nothing."""
    head = fileobj.read(6)
    compressed = any(head.startswith(m) for m in _COMPRESSED_MAGIC)
    starts: list[int] = []
    seen: set[str] = set()
    last: str | None = None
    grouped, end, truncated = True, 0, None
    try:
        with tarfile.open(fileobj=_Prefixed(head, fileobj), mode="r|*") as tar:
            for member, key, _ext in sample_members(tar):
                if key != last:
                    if key in seen:
                        grouped = False
                    else:
                        seen.add(key)
                        starts.append(member.offset)
                    last = key
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, _zlib_error()):
        # as the reader does: the group being read when the bytes end may be incomplete
        # (other OSErrors are I/O: shard_index retries them)
        truncated = last
        if last is not None:
            seen.discard(last)
            if grouped:
                end = starts.pop()
    offsets = None if compressed or not grouped else (*starts, end)
    return ShardIndex(len(seen), offsets, truncated_key=truncated)


def _zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


class _Prefixed:
    """A read-only stream that yields `head` (already read) before the rest of `raw`."""

    def __init__(self, head: bytes, raw: Any) -> None:
        self.head, self.raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.raw.read() if n < 0 else self.raw.read(n)
        if n < 0:
            out, self.head = self.head + self.raw.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.raw.read(n - len(out)) if len(out) < n else b"")


def _scan_parquet(shard: str, storage: StorageOptions, image_column: str, caption_column: str) -> ShardIndex:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.data.parquet_schema import schema_problem

    fs, path = filesystem_for(shard, storage)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f)
            if problem := schema_problem(meta.schema_arrow, image_column, caption_column):
                return ShardIndex(0, problem=("bad_schema", problem))
            return ShardIndex(meta.metadata.num_rows)
    except (pa.ArrowInvalid, ValueError) as exc:
        return ShardIndex(0, problem=("unreadable_shard", f"not a Parquet file ({' '.join(str(exc).split())[:120]})"))


def _read_or_scan(shard: str, storage: StorageOptions, image_column: str, caption_column: str) -> ShardIndex:
    if shard.endswith(".parquet"):
        return _scan_parquet(shard, storage, image_column, caption_column)
    fs, path = filesystem_for(shard, storage)
    try:
        with fs.open_input_stream(path + INDEX_SUFFIX, compression=None) as f:
            return _from_json(f.read().decode())
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as exc:  # a damaged index: count the shard itself
        log.warning("ignoring the index of %s (%s); counting its samples", shard, exc)
    with fs.open_input_stream(path, compression=None) as f:
        return scan_tar(f)


_cache: dict[tuple[str, StorageOptions, str, str], ShardIndex] = {}
_lock = threading.Lock()


def shard_index(shard: str, storage: StorageOptions, image_column: str = "jpg",
                caption_column: str = "caption") -> ShardIndex:
    """The shard's index (cached per process); an unreadable shard has `problem` set and 0 samples."""
    key = (shard, storage, image_column, caption_column)
    with _lock:
        if key in _cache:
            return _cache[key]
    for attempt in range(_IO_ATTEMPTS):
        try:
            found = _read_or_scan(shard, storage, image_column, caption_column)
            break
        except FileNotFoundError as exc:
            found = ShardIndex(0, problem=("unreadable_shard", str(exc)))
            break
        except OSError as exc:
            if attempt == _IO_ATTEMPTS - 1:
                found = ShardIndex(0, problem=("unreadable_shard", str(exc)))
                break
            time.sleep(0.25 * 2**attempt)
    with _lock:
        _cache[key] = found
    return found


def clear_cache() -> None:
    with _lock:
        _cache.clear()
