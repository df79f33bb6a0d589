"""Reading one shard robustly: WebDataset tar or img2dataset Parquet -> decoded samples + a report.

Runs read units (jobs.data.units): a unit's byte range when the shard's index has offsets, else
the tar streamed to the unit's end keeping only its samples, so memory per read task is one unit
however large the shard. Tars are parsed by one streaming parser (formats.iter_tar_groups), here,
in the writer's index and in the benchmarks alike. Only a tar whose members of a key are not
adjacent is read whole, to regroup it (the shard is named in a warning). Whole-shard passes (the
driver's data check, `mmpt data inspect`, tokenizer training) stream too.

Every bad sample is classified by a `Reason`, named in the log with its shard and key, and counted
in the `ShardReport`; nothing sleeps per bad sample. I/O errors (throttling, dropped connections)
are retried with backoff before a shard is declared unreadable; pyarrow's S3 client also retries
each request (503 SlowDown included) itself.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from jobs.data.formats import IMAGE_EXTENSIONS, TruncatedTar, iter_tar_groups
from jobs.data.parquet_schema import schema_problem
from jobs.storage import StorageOptions, filesystem_for

log = logging.getLogger(__name__)

Reason = Literal["corrupt_image", "missing_image", "missing_caption", "empty_caption", "truncated_tar",
                 "unreadable_shard", "bad_schema"]
REASONS: tuple[Reason, ...] = ("corrupt_image", "missing_image", "missing_caption", "empty_caption",
                               "truncated_tar", "unreadable_shard", "bad_schema")
SHARD_SUFFIXES = (".tar", ".parquet")
_IO_ATTEMPTS = 3


@dataclass(frozen=True)
class ReadSpec:
    """How to turn raw samples into rows; small and picklable (it travels to Ray tasks)."""

    image_size: int
    storage: StorageOptions = field(default_factory=StorageOptions)
    image_column: str = "jpg"  # img2dataset's Parquet column names
    caption_column: str = "caption"


@dataclass
class ShardReport:
    shard: str
    good: int = 0
    bad: dict[str, str] = field(default_factory=dict)  # key -> reason
    ungrouped: bool = False
    detail: str = ""  # why the whole shard is bad (a Parquet column missing or of the wrong type)
    unit: str = ""  # "start:stop" when the report covers one unit of the shard (jobs.data.units); "" = all of it

    def count(self, reason: str) -> int:
        return sum(1 for r in self.bad.values() if r == reason)


@dataclass
class _Raw:
    key: str
    image: bytes | None
    caption: str | None
    meta: str
    npz: bytes | None = None  # KEY.npz: precomputed region features (jobs.data.regions)


def _raw(key: str, parts: dict[str, bytes]) -> _Raw:
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    text = parts.get("txt")
    return _Raw(key, image, None if text is None else text.decode("utf-8", "replace"),
                parts.get("json", b"").decode("utf-8", "replace"), parts.get("npz"))


def _truncated(report: ShardReport, exc: TruncatedTar) -> None:
    """Everything before the cut is fine; the group being read may be incomplete: it is the bad one."""
    report.bad[exc.key or "<shard>"] = "truncated_tar"
    log.warning("truncated tar %s after key %s: %s", report.shard, exc.key or "<shard>", exc.cause)


def _read_tar(data: bytes, report: ShardReport) -> list[_Raw]:
    """A tar in memory, its samples in key order of first appearance; members of a key that are not
    adjacent are regrouped (the shard is named in a warning)."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        for key, parts in iter_tar_groups(io.BytesIO(data)):
            if key in groups:
                report.ungrouped = True
            groups.setdefault(key, {}).update(parts)
    except TruncatedTar as exc:
        _truncated(report, exc)
        if exc.key is not None and exc.key in groups:  # the cut key's earlier members: incomplete too
            groups.pop(exc.key)
    if report.ungrouped:
        log.warning("tar members of %s are not grouped by key; regrouped them", report.shard)
    return [_raw(key, parts) for key, parts in groups.items()]


class _Ungrouped(Exception):
    """A key came back after other keys: the shard must be regrouped in memory (_read_tar)."""


def _stream_tar(shard: str, storage: StorageOptions, report: ShardReport, start: int = 0,
                stop: int | None = None) -> Iterator[_Raw]:
    """Samples [start, stop) of a tar shard, streaming: one sample in memory, the rest of the
    shard not read. A transient I/O error reopens the shard (backoff) and skips what was read;
    a key that comes back raises _Ungrouped (the caller falls back to the whole shard)."""
    done, seen = 0, set()
    fs, path = filesystem_for(shard, storage)
    for attempt in range(_IO_ATTEMPTS):
        try:
            with fs.open_input_stream(path, compression=None) as f:
                for n, (key, parts) in enumerate(iter_tar_groups(f)):  # type: ignore[arg-type]
                    if n < done:
                        continue
                    if key in seen:
                        raise _Ungrouped(key)
                    seen.add(key)
                    if stop is not None and n >= stop:
                        return
                    done = n + 1
                    if n >= start:
                        yield _raw(key, parts)
            return
        except TruncatedTar as exc:
            if not isinstance(exc.cause, OSError) or isinstance(exc.cause, gzip.BadGzipFile):
                _truncated(report, exc)
                return
            error: OSError = exc.cause
        except FileNotFoundError:
            raise
        except OSError as exc:  # opening it
            error = exc
        if attempt == _IO_ATTEMPTS - 1:
            raise error
        delay = 0.25 * 2**attempt
        log.warning("reading %s failed (%s); retry %d in %.2fs", shard, error, attempt + 1, delay)
        time.sleep(delay)


class _BadShard(Exception):
    """The whole shard is unusable: (reason, detail)."""


def _read_parquet(data: bytes, spec: ReadSpec, report: ShardReport) -> list[_Raw]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _BadShard("unreadable_shard", f"not a Parquet file ({' '.join(str(exc).split())[:120]})") from None
    if problem := schema_problem(table.schema, spec.image_column, spec.caption_column):
        raise _BadShard("bad_schema", problem)
    return _parquet_raws(table, spec, 0)


def _parquet_raws(table: Any, spec: ReadSpec, first: int) -> list[_Raw]:
    """The rows of `table` (a pyarrow Table whose first row is row `first` of its shard)."""
    images = table.column(spec.image_column).to_pylist()
    captions = table.column(spec.caption_column).to_pylist()
    keys = (table.column("key").to_pylist() if "key" in table.column_names
            else [f"{first + i:09d}" for i in range(table.num_rows)])
    extra = [c for c in table.column_names if c not in (spec.image_column, spec.caption_column)]
    rows = table.select(extra).to_pylist() if extra else [{}] * table.num_rows
    return [_Raw(str(k), img, cap, json.dumps(meta, default=str)) for k, img, cap, meta
            in zip(keys, images, captions, rows, strict=True)]


def _fetch(shard: str, storage: StorageOptions, byte_range: tuple[int, int] | None = None) -> bytes:
    """The shard's bytes (or the range [lo, hi) of them), retrying transient I/O errors with
    exponential backoff."""
    fs, path = filesystem_for(shard, storage)
    for attempt in range(_IO_ATTEMPTS):
        try:
            if byte_range is not None:
                with fs.open_input_file(path) as f:
                    return f.read_at(byte_range[1] - byte_range[0], byte_range[0])
            with fs.open_input_stream(path, compression=None) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if attempt == _IO_ATTEMPTS - 1:
                raise
            delay = 0.25 * 2**attempt
            log.warning("reading %s failed (%s); retry %d in %.2fs", shard, exc, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def decode_image(data: bytes, size: int) -> np.ndarray:
    """uint8 [3, size, size] RGB; raises on corrupt or truncated data (PIL decodes fully)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _validate(raw: _Raw) -> Reason | None:
    if raw.image is None:
        return "missing_image"
    if raw.caption is None:
        return "missing_caption"
    if not raw.caption.strip():
        return "empty_caption"
    return None


def sample_flags(shard: str, spec: ReadSpec) -> tuple[list[bool], ShardReport]:
    """Per sample of `shard`, in the key order units count (jobs.data.units): structurally valid?
    With the report of what is bad (images are checked only when decoded). A tar is streamed and
    only its flags kept: one sample in memory however large the shard (an ungrouped tar, or a
    Parquet file, goes through `_structural`: read whole)."""
    if not shard.endswith(".parquet"):
        report = ShardReport(shard=shard)
        flags: list[bool] = []
        try:
            for raw in _stream_tar(shard, spec.storage, report):
                flags.append(_checked(raw, report, shard) is None)
            report.good = sum(flags)
            return flags, report
        except OSError as exc:
            report.bad["<shard>"] = "unreadable_shard"
            log.warning("unreadable shard %s: %s", shard, exc)
            return [], report
        except _Ungrouped:
            pass
    raws, report = _structural(shard, spec)
    return [raw.key not in report.bad for raw in raws], report


def _checked(raw: _Raw, report: ShardReport, shard: str) -> Reason | None:
    """Why `raw` is structurally bad (None: it is not), named in the log and the report."""
    reason = _validate(raw)
    if reason is not None:
        report.bad[raw.key] = reason
        log.warning("skipping %s in %s: %s", raw.key, shard, reason.replace("_", " "))
    return reason


def _structural(shard: str, spec: ReadSpec) -> tuple[list[_Raw], ShardReport]:
    """Every sample of `shard` (key order), bad ones named in the report, and the count of good ones.

    A tar is streamed (only an ungrouped one is read whole, to regroup it); a Parquet file is read
    whole (its schema and columns are checked at once)."""
    report = ShardReport(shard=shard)
    try:
        if shard.endswith(".parquet"):
            raws = _read_parquet(_fetch(shard, spec.storage), spec, report)
        else:
            try:
                raws = list(_stream_tar(shard, spec.storage, report))
            except _Ungrouped:
                report = ShardReport(shard=shard)
                raws = _read_tar(_fetch(shard, spec.storage), report)
    except OSError as exc:
        report.bad["<shard>"] = "unreadable_shard"
        log.warning("unreadable shard %s: %s", shard, exc)
        return [], report
    except _BadShard as exc:  # counted like a bad tar: one bad entry for the shard, named with why
        reason, report.detail = exc.args
        report.bad["<shard>"] = reason
        log.warning("skipping shard %s: %s", shard, report.detail)
        return [], report
    for raw in raws:
        _checked(raw, report, shard)
    report.good = sum(1 for raw in raws if raw.key not in report.bad)
    return raws, report


def _decoded(raw: _Raw, offset: int, spec: ReadSpec, report: ShardReport, shard: str) -> dict[str, Any] | None:
    """The row of a structurally valid sample, or None (counted as corrupt_image) if its image does not decode."""
    try:
        image = decode_image(raw.image, spec.image_size)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        report.bad[raw.key] = "corrupt_image"
        report.good -= 1
        log.warning("skipping %s in %s: corrupt image (%s)", raw.key, shard, exc)
        return None
    return {"key": raw.key, "image": image, "caption": raw.caption.strip(),  # type: ignore[union-attr]
            "meta": raw.meta, "npz": raw.npz, "offset": offset}


def read_shard(shard: str, spec: ReadSpec, *, seed: int | None = None) -> tuple[list[_Raw], ShardReport]:
    """The structurally valid samples of `shard` (not yet decoded), in file order or a `seed`ed
    permutation, and the report of what was bad so far (images are checked when decoded)."""
    raws, report = _structural(shard, spec)
    valid = [raw for raw in raws if raw.key not in report.bad]
    if seed is not None:
        random.Random(seed).shuffle(valid)
    return valid, report


def iter_rows(shard: str, spec: ReadSpec, *, seed: int | None = None, start: int = 0,
              on_report: Callable[[ShardReport], None] | None = None) -> Iterator[dict[str, Any]]:
    """Decoded rows of `shard` from position `start` of its order, each tagged with its `offset`.

    Offsets index the shard's (permuted) list of structurally valid samples, so they are the same
    in every pass; a sample whose image fails to decode is skipped and its offset left unused.
    `on_report` gets the shard's report once the shard is exhausted (and, if it has structural
    problems, once before the first sample).
    """
    raws, report = read_shard(shard, spec, seed=seed)
    if on_report is not None and report.bad:
        on_report(report)  # the structural problems now: a budget check need not wait for the shard's end
    for offset in range(start, len(raws)):
        row = _decoded(raws[offset], offset, spec, report, shard)
        if row is not None:
            yield row
    if on_report is not None:
        on_report(report)


# -- one unit of a shard (jobs.data.units) ------------------------------------------------------------


def _unit_raws(shard: str, spec: ReadSpec, start: int, stop: int, byte_range: tuple[int, int] | None) -> list[_Raw]:
    """Samples [start, stop) of `shard`, undecoded: only their bytes when the index gave a range,
    only their Parquet row groups; else the whole tar, of which they are kept."""
    if shard.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, path = filesystem_for(shard, spec.storage)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            groups, first, base = [], 0, 0
            for i in range(pf.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if base < stop and base + n > start:
                    first = base if not groups else first
                    groups.append(i)
                base += n
            table = pf.read_row_groups(groups).slice(start - first, stop - start)
        return _parquet_raws(table, spec, start)
    scratch = ShardReport(shard=shard)  # truncation is reported by the unit that ends the shard
    if byte_range is not None:
        raws = _read_tar(_fetch(shard, spec.storage, byte_range), scratch)
        if len(raws) == stop - start:
            return raws
        log.warning("the index of %s does not match its bytes %s; streaming the shard", shard, byte_range)
    try:  # no byte offsets (a compressed tar): streamed to the unit's end, only its samples kept
        return list(_stream_tar(shard, spec.storage, scratch, start, stop))
    except _Ungrouped:
        return _read_tar(_fetch(shard, spec.storage), scratch)[start:stop]


def iter_unit_rows(shard: str, spec: ReadSpec, start: int, stop: int, *, seed: int | None = None, begin: int = 0,
                   end: int | None = None, byte_range: tuple[int, int] | None = None, truncated_key: str | None = None,
                   on_report: Callable[[ShardReport], None] | None = None) -> Iterator[dict[str, Any]]:
    """Decoded rows of samples [start, stop) of `shard`, from position `begin` of their (`seed`ed)
    order up to `end` (a piece of the unit; None: its last), each tagged with that position (`offset`).
    Only these samples are fetched (a byte range
    when given) and decoded. Bad ones are skipped and counted as in `iter_rows`; `truncated_key`
    (the unit that ends a truncated tar) is counted too. `on_report` as in `iter_rows`, per unit.
    """
    report = ShardReport(shard=shard, unit=f"{start}:{stop}")
    try:
        raws = _unit_raws(shard, spec, start, stop, byte_range)
    except OSError as exc:
        report.bad["<shard>"] = "unreadable_shard"
        log.warning("unreadable shard %s: %s", shard, exc)
        raws = []
    good = [_validate(raw) is None for raw in raws]
    for raw, ok in zip(raws, good, strict=True):
        if not ok:
            reason = _validate(raw)
            report.bad[raw.key] = reason  # type: ignore[assignment]
            log.warning("skipping %s in %s: %s", raw.key, shard, str(reason).replace("_", " "))
    if truncated_key is not None:
        report.bad[truncated_key] = "truncated_tar"
    report.good = sum(good)
    order = list(range(len(raws)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    if on_report is not None and report.bad:
        on_report(report)
    for offset in range(begin, len(order) if end is None else min(end, len(order))):
        if good[order[offset]] and (row := _decoded(raws[order[offset]], offset, spec, report, shard)) is not None:
            yield row
    if on_report is not None:
        on_report(report)
