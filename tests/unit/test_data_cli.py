"""`mmpt data prepare` and `mmpt data inspect` on a user's image folder (no Ray)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from jobs.data.formats import iter_shard
from jobs.data.inspect import inspect_shards
from jobs.data.prepare import prepare
from orchestrator.cli.main import app


def _images(folder: Path) -> None:
    folder.mkdir()
    for i, (fmt, size) in enumerate([("JPEG", 40), ("PNG", 200), ("BMP", 30), ("JPEG", 700)]):
        Image.new("RGB", (size, size // 2), (10 * i, 100, 50)).save(folder / f"img{i}.{fmt.lower()}", format=fmt)
    (folder / "broken.jpg").write_bytes(b"not an image")


def test_prepare_writes_img2dataset_shards_and_lists_skipped_rows(tmp_path: Path) -> None:
    _images(tmp_path / "imgs")
    captions = tmp_path / "captions.csv"
    captions.write_text("file_name,caption\nimg0.jpeg,a dark square\nimg1.png,a wide png\nimg2.bmp,a bitmap\n"
                        "missing.jpg,nothing\nbroken.jpg,broken\nimg3.jpeg,a large image\n")
    res = prepare(tmp_path / "imgs", captions, str(tmp_path / "out"), samples_per_shard=3, vocab_size=100)
    assert res.samples == 4 and len(res.shards) == 2
    assert res.skipped == [("missing.jpg", "missing image"), ("broken.jpg", "unreadable image (UnidentifiedImageError)")]
    samples = [s for shard in res.shards for s in iter_shard(shard)]
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002", "000010000"]
    assert [sorted(s.parts) for s in samples][:3] == [["jpg", "json", "txt"], ["json", "png", "txt"], ["jpg", "json", "txt"]]
    meta = json.loads(samples[1].parts["json"])
    assert (meta["caption"], meta["width"], meta["height"], meta["source"]) == ("a wide png", 200, 100, "img1.png")
    assert Path(res.tokenizer).exists()


def test_prepare_reads_jsonl_and_names_missing_columns(tmp_path: Path) -> None:
    _images(tmp_path / "imgs")
    good = tmp_path / "c.jsonl"
    good.write_text(json.dumps({"image": "img0.jpeg", "text": "a square"}) + "\n")
    assert prepare(tmp_path / "imgs", good, str(tmp_path / "o1"), vocab_size=100).samples == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"picture": "img0.jpeg", "caption": "x"}) + "\n")
    result = CliRunner().invoke(app, ["data", "prepare", "--images", str(tmp_path / "imgs"), "--captions", str(bad),
                                      "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2
    assert "row 1 needs an image column (image/file_name/filename/path)" in result.output


def test_inspect_counts_histograms_and_bad_samples(tmp_path: Path) -> None:
    _images(tmp_path / "imgs")
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\nimg0.jpeg,one two three\nimg1.png,a caption of exactly seven words here\n"
                        "img3.jpeg,x\n")
    res = prepare(tmp_path / "imgs", captions, str(tmp_path / "out"), vocab_size=100)
    # add a shard with a corrupt image and a missing caption
    extra = tmp_path / "out" / "00099.tar"
    with tarfile.open(extra, "w") as tar:
        for name, data in [("k1.jpg", b"garbage"), ("k1.txt", b"bad image"), ("k2.jpg", (tmp_path / "imgs" / "img0.jpeg").read_bytes())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = inspect_shards([*res.shards, str(extra)])
    assert out.samples == 3 and out.shards == 2
    assert sorted(out.bad_samples) == [(str(extra), "k1", "corrupt_image"), (str(extra), "k2", "missing_caption")]
    assert dict(out.image_sizes) == {"<= 64": 1, "<= 256": 1, "<= 1024": 1}
    assert dict(out.caption_words) == {"<= 5": 2, "<= 10": 1}
    cli = CliRunner().invoke(app, ["data", "inspect", str(tmp_path / "out")])
    assert cli.exit_code == 0, cli.output
    assert "2 shards, 5 samples: 3 good, 2 bad" in cli.output
    assert "corrupt_image" in cli.output and "missing_caption 1" in cli.output
