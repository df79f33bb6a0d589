"""Reading shards that are not clean: every bad case skipped, named and counted, nothing dropped
silently; Parquet shards; deterministic order and offsets; the error budget."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.data.ledger import BadSampleLedger, DataBudgetExceeded, check_budget
from jobs.data.reader import ReadSpec, iter_rows, read_shard

SPEC = ReadSpec(image_size=16)


def jpeg(color: tuple[int, int, int] = (200, 10, 10), size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, caption: str = "a red square") -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", jpeg()), (f"{key}.txt", caption.encode()), (f"{key}.json", b'{"key": "%s"}' % key.encode())]


def rows(path: Path, **kw) -> list[dict]:
    return list(iter_rows(str(path), SPEC, **kw))


def test_clean_shard_rows_decode_to_uint8_chw(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "a.tar", sample("000") + sample("001"))
    out = rows(shard)
    assert [r["key"] for r in out] == ["000", "001"]
    assert [r["offset"] for r in out] == [0, 1]
    assert out[0]["image"].shape == (3, 16, 16) and out[0]["image"].dtype == np.uint8
    assert out[0]["caption"] == "a red square"


def test_each_bad_case_is_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    truncated_jpeg = jpeg()[:60]
    members = (
        sample("000")
        + [("001.jpg", b"this is not an image"), ("001.txt", b"corrupt")]
        + [("002.jpg", truncated_jpeg), ("002.txt", b"truncated image")]
        + [("003.txt", b"no image here")]
        + [("004.jpg", jpeg())]
        + [("005.jpg", jpeg()), ("005.txt", b"   \n")]
        + sample("006")
    )
    shard = write_tar(tmp_path / "bad.tar", members)
    reports = []
    out = list(iter_rows(str(shard), SPEC, on_report=reports.append))
    assert [r["key"] for r in out] == ["000", "006"]
    assert len(reports) == 2 and reports[0] is reports[1]  # once for structural problems, once at the end
    report = reports[-1]
    assert report.bad == {"001": "corrupt_image", "002": "corrupt_image", "003": "missing_image",
                          "004": "missing_caption", "005": "empty_caption"}
    assert report.good == 2


def test_truncated_tar_keeps_what_came_before(tmp_path: Path) -> None:
    full = write_tar(tmp_path / "full.tar", sample("000") + sample("001") + sample("002"))
    data = full.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    raws, report = read_shard(str(cut), SPEC)
    assert "truncated_tar" in report.bad.values()
    assert 1 <= len(raws) <= 2 and all(r.key in ("000", "001") for r in raws)


def test_members_not_grouped_by_key_are_regrouped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = sample("000"), sample("001")
    shard = write_tar(tmp_path / "ungrouped.tar", [a[0], b[0], a[1], b[1], a[2], b[2]])
    raws, report = read_shard(str(shard), SPEC)
    assert report.ungrouped and report.bad == {}
    assert sorted(r.key for r in raws) == ["000", "001"]
    assert "not grouped by key" in caplog.text and "ungrouped.tar" in caplog.text


def test_missing_object_is_an_unreadable_shard(tmp_path: Path) -> None:
    raws, report = read_shard(str(tmp_path / "vanished.tar"), SPEC)
    assert raws == [] and report.bad == {"<shard>": "unreadable_shard"}


def test_parquet_shard_with_null_bytes_and_custom_columns(tmp_path: Path) -> None:
    table = pa.table({"key": ["a", "b", "c"], "img": [jpeg(), None, jpeg()],
                      "text": ["a red square", "lost image", None], "width": [24, 24, 24]})
    path = tmp_path / "part-0.parquet"
    pq.write_table(table, path)
    spec = ReadSpec(image_size=16, image_column="img", caption_column="text")
    reports = []
    out = list(iter_rows(str(path), spec, on_report=reports.append))
    assert [r["key"] for r in out] == ["a"]
    assert json.loads(out[0]["meta"]) == {"key": "a", "width": 24}
    assert reports[-1].bad == {"b": "missing_image", "c": "missing_caption"}


def test_parquet_without_the_configured_column_is_a_bad_shard_naming_the_column(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"jpg": [jpeg()], "txt": ["x"]}), path)
    raws, report = read_shard(str(path), SPEC)
    assert raws == [] and report.bad == {"<shard>": "bad_schema"}
    assert report.detail == "no column 'caption' (columns: jpg, txt; set data.caption_column)"


@pytest.mark.parametrize(("columns", "detail"), [
    ({"jpg": [1, 2], "caption": ["a", "b"]}, "column 'jpg' is int64, expected binary (encoded image bytes)"),
    ({"jpg": [jpeg(), jpeg()], "caption": [3, 4]}, "column 'caption' is int64, expected string"),
    ({"jpg": ["not bytes", "x"], "caption": ["a", "b"]}, "column 'jpg' is string, expected binary"),
])
def test_parquet_columns_of_the_wrong_type_are_a_bad_shard(tmp_path: Path, columns: dict, detail: str) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table(columns), path)
    raws, report = read_shard(str(path), SPEC)
    assert raws == [] and report.bad == {"<shard>": "bad_schema"} and report.detail.startswith(detail)


def test_a_garbage_parquet_file_among_good_ones_is_counted_like_a_bad_tar(tmp_path: Path) -> None:
    good = tmp_path / "00000.parquet"
    pq.write_table(pa.table({"jpg": [jpeg()] * 3, "caption": ["a red square"] * 3}), good)
    garbage = tmp_path / "00001.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet at all")
    ledger = BadSampleLedger()
    for shard in (good, garbage):
        ledger.add(read_shard(str(shard), SPEC)[1])
    totals = ledger.totals()
    assert (totals["samples"], totals["bad"], totals["by_reason"]) == (4, 1, {"unreadable_shard": 1})
    worst = totals["worst_shards"][0]
    assert worst["shard"] == str(garbage) and worst["why"].startswith("not a Parquet file")
    with pytest.raises(DataBudgetExceeded, match=r"00001.parquet \(1 of 1: not a Parquet file"):
        check_budget(totals, 0.1, min_samples=1)


def test_seeded_order_is_a_stable_permutation_and_start_skips(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "p.tar", [m for i in range(20) for m in sample(f"{i:03d}")])
    first = [r["key"] for r in rows(shard, seed=7)]
    assert first == [r["key"] for r in rows(shard, seed=7)]
    assert sorted(first) == [f"{i:03d}" for i in range(20)] and first != sorted(first)
    tail = rows(shard, seed=7, start=15)
    assert [r["key"] for r in tail] == first[15:] and [r["offset"] for r in tail] == list(range(15, 20))


def test_ledger_counts_distinct_samples_and_budget_names_worst_shards(tmp_path: Path) -> None:
    ledger = BadSampleLedger()
    shard = write_tar(tmp_path / "x.tar", sample("000") + [("001.txt", b"no image")])
    for _ in range(2):  # the same shard read twice (a second epoch) counts once
        _, report = read_shard(str(shard), SPEC)
        ledger.add(report)
    totals = ledger.totals()
    assert (totals["samples"], totals["bad"], totals["by_reason"]) == (2, 1, {"missing_image": 1})
    check_budget(totals, max_fraction=0.6, min_samples=1)
    with pytest.raises(DataBudgetExceeded, match=r"1 of 2 samples are bad \(50.0% > data.max_bad_fraction=0.1\); "
                                                  r"by reason: missing_image: 1; worst shards: .*x.tar \(1 of 2\)"):
        check_budget(totals, max_fraction=0.1, min_samples=1)
    check_budget(totals, max_fraction=0.1, min_samples=64)  # too few samples to judge yet
    restored = BadSampleLedger()
    restored.load(ledger.state())
    assert restored.totals() == totals
