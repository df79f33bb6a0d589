"""jobs.data.synth: captions true of the pixels, byte-deterministic datasets, local and S3."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.data import synth
from jobs.data.formats import caption, image_bytes, iter_shard
from jobs.data.tokenizer import encode, load_tokenizer, text_spec
from jobs.storage import StorageOptions, expand_shards, read_bytes


def _centre(bbox: list[int]) -> tuple[float, float]:
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


def _expected_relation(a: list[int], b: list[int]) -> str:
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


def _scenes(n: int, image_size: int = 64) -> list[tuple[Image.Image, str, dict]]:
    return [synth.make_sample(np.random.default_rng([7, 0, k]), image_size) for k in range(n)]


def test_vocabularies_and_sizes() -> None:
    assert set(synth.SHAPES) >= {"circle", "square", "triangle", "diamond"}
    assert set(synth.COLORS) >= {"red", "green", "blue", "yellow", "purple", "orange"}
    assert len(set(synth.COLOR_RGB.values())) == len(synth.COLORS)
    assert (synth.size_px("small", 64), synth.size_px("large", 64)) == (12, 24)
    assert (synth.size_px("small", 128), synth.size_px("large", 128)) == (24, 48)


def test_relations_true_of_bboxes() -> None:
    counts: collections.Counter[str] = collections.Counter()
    for image, text, scene in _scenes(600):
        objs = scene["objects"]
        assert image.size == (64, 64) and image.mode == "RGB"
        assert 1 <= len(objs) <= 3 and len(scene["relations"]) == len(objs) - 1
        assert len(text.split()) <= 24
        for obj in objs:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert x1 - x0 == y1 - y0 == synth.size_px(obj["size"], 64)
            assert f"{obj['size']} {obj['color']} {obj['shape']}" in text  # every object named
        for i, a in enumerate(objs):  # no overlaps
            for b in objs[i + 1 :]:
                ax0, ay0, ax1, ay1 = a["bbox"]
                bx0, by0, bx1, by1 = b["bbox"]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
        for rel in scene["relations"]:
            subject, obj = objs[rel["subject"]], objs[rel["object"]]
            assert rel["relation"] == _expected_relation(subject["bbox"], obj["bbox"])
            phrase = f"{subject['color']} {subject['shape']} {rel['relation']} "
            assert phrase in text
            counts[rel["relation"]] += 1
    assert set(counts) == set(synth.RELATIONS) and min(counts.values()) > 50


def test_object_colour_at_bbox_centre() -> None:
    for image, _, scene in _scenes(100):
        decoded = np.asarray(Image.open(io.BytesIO(synth._encode_jpeg(image))).convert("RGB"), dtype=int)
        for obj in scene["objects"]:
            cx, cy = (int(v) for v in _centre(obj["bbox"]))
            pixel = decoded[cy, cx]
            assert np.abs(pixel - np.array(synth.COLOR_RGB[obj["color"]])).max() < 40, obj


def test_captions_vary() -> None:
    captions = collections.Counter(text for _, text, _ in _scenes(2000))
    assert captions.most_common(1)[0][1] / 2000 < 0.03
    assert len(captions) > 1000


def test_both_rng_kinds_deterministic() -> None:
    a = synth.make_sample(random.Random(3), 64)
    b = synth.make_sample(random.Random(3), 64)
    assert a[1] == b[1] and a[0].tobytes() == b[0].tobytes()
    c = synth.make_sample(np.random.default_rng(3), 96, noise=0)
    assert c[0].size == (96, 96)
    assert c[0].getpixel((0, 0)) == c[0].getpixel((1, 0))  # no noise: plain background
    with pytest.raises(ValueError, match="image_size=16 is too small"):
        synth.make_sample(random.Random(0), 16)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_synthetic_layout_and_json(tmp_path: Path) -> None:
    seen: list[int] = []
    result = synth.write_synthetic(str(tmp_path), samples=20, shards=3, eval_samples=10, progress=seen.append)
    assert result.train_shards == [str(tmp_path / "train" / f"0000{i}.tar") for i in range(3)]
    assert result.eval_shards == [str(tmp_path / "eval" / f"0000{i}.tar") for i in range(2)]  # ceil(10/7)
    assert (result.train_samples, result.eval_samples) == (20, 10)
    assert seen == list(range(1, 31))

    train = [list(iter_shard(u)) for u in result.train_shards]
    evals = [list(iter_shard(u)) for u in result.eval_shards]
    assert [len(s) for s in train] == [7, 7, 6] and [len(s) for s in evals] == [5, 5]
    assert [s.key for s in train[1]][:2] == ["000010000", "000010001"]
    assert evals[1][4].key == "000040004"  # eval shard e numbered 3 + e
    keys = [s.key for shard in train + evals for s in shard]
    assert len(set(keys)) == 30

    sample = train[2][5]
    meta = json.loads(sample.parts["json"])
    assert set(meta) == {"key", "caption", "status", "width", "height", "sha256", "scene"}
    assert (meta["key"], meta["status"], meta["width"], meta["height"]) == ("000020005", "success", 64, 64)
    assert meta["caption"] == caption(sample)
    assert meta["sha256"] == hashlib.sha256(image_bytes(sample) or b"").hexdigest()
    assert set(meta["scene"]["objects"][0]) == {"shape", "color", "size", "bbox"}
    assert Image.open(io.BytesIO(sample.parts["jpg"])).size == (64, 64)

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["train_shards"] == ["train/00000.tar", "train/00001.tar", "train/00002.tar"]
    assert (manifest["seed"], manifest["image_size"], manifest["eval_samples"]) == (0, 64, 10)
    assert manifest["vocabularies"]["shapes"] == list(synth.SHAPES)

    tok = load_tokenizer(result.tokenizer)
    assert text_spec(tok, 24).vocab_size == tok.get_vocab_size()
    for word in synth.GROUNDED_WORDS:  # grounded words are single tokens
        assert tok.token_to_id(word) is not None, word
    ids, mask = encode(tok, [meta["caption"]], 32)
    assert tok.decode(ids[0, : int(mask[0].sum())].tolist()) == meta["caption"]


def test_deterministic_bytes_and_seed_sensitive(tmp_path: Path) -> None:
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synth.write_synthetic(str(tmp_path / name), samples=12, shards=2, seed=seed, eval_samples=4)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    # 2 train + 1 eval shard and their indexes, tokenizer, manifest, dataset card + its vocabulary
    assert len(a) == 10 and a == b
    assert sum(name.endswith(".tar.index.json") for name in a) == 3
    assert a["train/00000.tar"] != c["train/00000.tar"]
    assert a["eval/00000.tar"] != c["eval/00000.tar"]


def test_content_independent_of_shard_count(tmp_path: Path) -> None:
    two = synth.write_synthetic(str(tmp_path / "two"), samples=12, shards=2, eval_samples=4)
    four = synth.write_synthetic(str(tmp_path / "four"), samples=12, shards=4, eval_samples=4)

    def jpgs(uris: list[str]) -> list[bytes]:
        return [s.parts["jpg"] for u in uris for s in iter_shard(u)]

    assert jpgs(two.train_shards) == jpgs(four.train_shards)
    assert read_bytes(two.tokenizer) == read_bytes(four.tokenizer)


def test_write_synthetic_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1 <= shards <= samples"):
        synth.write_synthetic(str(tmp_path / "x"), samples=2, shards=3)
    synth.write_synthetic(str(tmp_path / "y"), samples=4, shards=2, eval_samples=2)
    with pytest.raises(ValueError, match="already holds shards this run would not overwrite"):
        synth.write_synthetic(str(tmp_path / "y"), samples=4, shards=1, eval_samples=2)


def test_write_synthetic_s3(s3_server) -> None:
    bucket = s3_server.create_bucket()
    opts = StorageOptions(endpoint_url=s3_server.endpoint_url)
    result = synth.write_synthetic(
        f"s3://{bucket}/shapes", samples=10, shards=2, eval_samples=3, options=opts
    )
    assert expand_shards(f"s3://{bucket}/shapes/train/", opts) == result.train_shards
    assert result.train_shards[1] == f"s3://{bucket}/shapes/train/00001.tar"
    samples = [s for u in result.train_shards for s in iter_shard(u, opts)]
    assert len(samples) == 10
    assert sum(1 for u in result.eval_shards for _ in iter_shard(u, opts)) == 3
    assert text_spec(load_tokenizer(result.tokenizer, opts), 16).cls_id == 2
    assert json.loads(read_bytes(f"s3://{bucket}/shapes/manifest.json", opts))["train_samples"] == 10
