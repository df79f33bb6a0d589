"""COCO captions (`captions_train2017.json`) + the image folder (`train2017/`), optionally with the
instances file (`instances_train2017.json`): its boxes and 80 categories become the scene objects
and the label vocabulary (class id = the category's position by COCO id).

Every caption is one sample (Chen et al. 2015: five or more per image), written adjacently per
image, each carrying the image's `image_id`: retrieval counts all of an image's captions.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.data.datasets.write import Sample


def _load(path: str | Path, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path}: {exc}") from None
    missing = [k for k in keys if k not in data] if isinstance(data, dict) else list(keys)
    if missing:
        raise ValueError(f"{what} {path}: not a COCO annotation file (no {', '.join(missing)})")
    return data


def read(captions: str | Path, instances: str | Path | None = None) -> tuple[Iterator[Sample], list[str] | None]:
    cap = _load(captions, "--captions", ("images", "annotations"))
    by_image: dict[int, list[str]] = defaultdict(list)
    for a in cap["annotations"]:
        by_image[a["image_id"]].append(str(a["caption"]).strip())
    classes: list[str] | None = None
    objects: dict[int, list[dict[str, Any]]] = defaultdict(list)
    if instances:
        inst = _load(instances, "--instances", ("annotations", "categories"))
        categories = sorted(inst["categories"], key=lambda c: c["id"])
        names = {c["id"]: str(c["name"]) for c in categories}
        classes = [names[c["id"]] for c in categories]
        for a in inst["annotations"]:
            x, y, w, h = a["bbox"]
            objects[a["image_id"]].append({"name": names[a["category_id"]], "bbox": [x, y, x + w, y + h],
                                           "area": w * h})
    images = cap["images"]

    def samples() -> Iterator[Sample]:
        for im in images:
            # the largest objects first: data.max_objects keeps the first R
            objs = [{k: v for k, v in o.items() if k != "area"}
                    for o in sorted(objects.get(im["id"], []), key=lambda o: -o["area"])]
            scene = {"objects": objs, "relations": []} if objs else None
            for text in by_image.get(im["id"], []):
                if text:
                    yield Sample(caption=text, image_id=im["id"], image=im["file_name"], scene=scene,
                                 extra={"coco_url": im["coco_url"]} if "coco_url" in im else {})

    return samples(), classes
