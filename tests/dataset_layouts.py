"""Small on-disk fixtures of the layouts `mmpt data prepare` converts, images drawn with PIL (no
downloads): COCO captions + instances, Visual Genome region descriptions + objects + relationships,
a CC3M-style TSV, and img2dataset output (webdataset, parquet, files)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"},
              {"id": 62, "name": "chair"}]
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 205, 20)}


def _scene(rng: random.Random, size: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    image = Image.new("RGB", (size, size), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    objects = []
    for n in range(rng.randint(1, 2)):
        cat = rng.choice(CATEGORIES)
        colour = rng.choice(sorted(COLOURS))
        x, y = rng.randint(0, size // 2), rng.randint(0, size // 2)
        w, h = rng.randint(size // 4, size // 2), rng.randint(size // 4, size // 2)
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[colour])
        objects.append({"category": cat, "colour": colour, "bbox": [x, y, w, h], "n": n})
    return image, objects


def _save(image: Image.Image, path: Path, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def coco(root: Path, images: int = 6, captions_per_image: int = 5, size: int = 32, seed: int = 0,
         split: str = "train2017") -> dict[str, Path]:
    """COCO's layout: ROOT/train2017/*.jpg, annotations/captions_train2017.json, instances_train2017.json."""
    rng = random.Random(seed)
    folder = root / split
    cap_images, cap_anns, inst_anns = [], [], []
    for i in range(images):
        image_id = 1000 + 7 * i
        image, objects = _scene(rng, size)
        name = f"{image_id:012d}.jpg"
        _save(image, folder / name)
        cap_images.append({"id": image_id, "file_name": name, "width": size, "height": size,
                           "coco_url": f"http://images.cocodataset.org/{split}/{name}"})
        first = objects[0]
        for c in range(captions_per_image):
            words = ["a", first["colour"], first["category"]["name"]]
            tail = [["on", "the", "left"], ["in", "a", "room"], ["near", "a", "wall"], ["seen", "from", "above"],
                    ["standing", "still"]][c % 5]
            cap_anns.append({"id": 10 * image_id + c, "image_id": image_id, "caption": " ".join(words + tail)})
        for o in objects:
            inst_anns.append({"id": 100 * image_id + o["n"], "image_id": image_id, "category_id": o["category"]["id"],
                              "bbox": o["bbox"], "area": o["bbox"][2] * o["bbox"][3], "iscrowd": 0})
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    captions = ann / f"captions_{split}.json"
    captions.write_text(json.dumps({"images": cap_images, "annotations": cap_anns}))
    instances = ann / f"instances_{split}.json"
    instances.write_text(json.dumps({"images": cap_images, "annotations": inst_anns, "categories": CATEGORIES}))
    return {"images": folder, "captions": captions, "instances": instances}


def visual_genome(root: Path, images: int = 3, size: int = 32, seed: int = 1) -> dict[str, Path]:
    """VG's layout: ROOT/VG_100K/{id}.jpg, region_descriptions.json, attributes.json, relationships.json."""
    rng = random.Random(seed)
    regions, attributes, relationships = [], [], []
    for i in range(images):
        image_id = 1 + i
        image, objects = _scene(rng, size)
        _save(image, root / "VG_100K" / f"{image_id}.jpg")
        objs = [{"object_id": 50 * image_id + o["n"], "x": o["bbox"][0], "y": o["bbox"][1], "w": o["bbox"][2],
                 "h": o["bbox"][3], "names": [o["category"]["name"]], "attributes": [o["colour"]]} for o in objects]
        attributes.append({"image_id": image_id, "attributes": objs, "objects": objs})
        rels = [{"relationship_id": image_id, "predicate": "next to", "subject": objs[0], "object": objs[-1]}] \
            if len(objs) > 1 else []
        relationships.append({"image_id": image_id, "relationships": rels})
        regions.append({"id": image_id, "regions": [
            {"region_id": 10 * image_id + k, "image_id": image_id, "phrase": f"a {o['colour']} {o['category']['name']}",
             "x": o["bbox"][0], "y": o["bbox"][1], "width": o["bbox"][2], "height": o["bbox"][3]}
            for k, o in enumerate(objects)]})
    paths = {"images": root, "captions": root / "region_descriptions.json", "objects": root / "attributes.json",
             "relationships": root / "relationships.json"}
    paths["captions"].write_text(json.dumps(regions))
    paths["objects"].write_text(json.dumps(attributes))
    paths["relationships"].write_text(json.dumps(relationships))
    return paths


def cc3m(root: Path, rows: int = 4, size: int = 32) -> dict[str, Path]:
    """Google's TSV (caption<TAB>url, no header) and the images img2dataset-numbered (000000000.jpg);
    the last row's image was never downloaded."""
    rng = random.Random(2)
    lines = []
    for i in range(rows):
        image, objects = _scene(rng, size)
        if i < rows - 1:
            _save(image, root / "images" / f"{i:09d}.jpg")
        lines.append(f"a {objects[0]['colour']} thing in a picture\thttp://example.com/pics/{i}.jpg?x=1")
    tsv = root / "Train_GCC-training.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return {"images": root / "images", "captions": tsv}


def img2dataset(root: Path, fmt: str, rows: int = 4, size: int = 32) -> dict[str, Path]:
    """img2dataset's output folder in `fmt` (webdataset, parquet, files); row 1 failed to download."""
    rng = random.Random(3)
    out = root / f"i2d_{fmt}"
    out.mkdir(parents=True)
    samples = []
    for i in range(rows):
        image, objects = _scene(rng, size)
        buf = io.BytesIO()
        image.save(buf, format="JPEG")
        key = f"0000{i:05d}"
        ok = i != 1
        meta = {"url": f"http://example.com/{i}.jpg", "key": key, "caption": f"a {objects[0]['colour']} square",
                "status": "success" if ok else "failed_to_download", "width": size, "height": size,
                "original_width": 4 * size, "original_height": 4 * size}
        samples.append((key, buf.getvalue() if ok else None, meta))
    if fmt == "webdataset":
        with tarfile.open(out / "00000.tar", "w") as tar:
            for key, jpg, meta in samples:
                if jpg is None:
                    continue
                for ext, data in (("jpg", jpg), ("txt", meta["caption"].encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (out / "00000_stats.json").write_text(json.dumps({"count": rows, "successes": rows - 1}))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{**meta, "jpg": jpg} for _, jpg, meta in samples]), out / "00000.parquet")
    else:
        shard = out / "00000"
        shard.mkdir()
        for key, jpg, meta in samples:
            if jpg is not None:
                (shard / f"{key}.jpg").write_bytes(jpg)
                (shard / f"{key}.txt").write_text(meta["caption"])
            (shard / f"{key}.json").write_text(json.dumps(meta))
    return {"images": out}
