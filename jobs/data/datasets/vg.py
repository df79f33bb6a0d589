"""Visual Genome (Krishna et al. 2017): region descriptions (`region_descriptions.json`) as
captions of their image, as UNITER and ALBEF pretrain on them, plus optionally the scene graph:
`objects.json` or `attributes.json` (objects with names, boxes and attributes) and
`relationships.json` (subject - predicate - object). Their object names become the label
vocabulary (the most frequent, up to BUTD's 1600), attribute and predicate words the scene-graph
words of SGP (ERNIE-ViL's object / attribute / relation nodes).

Images are looked up as IMAGES/{image_id}.jpg, IMAGES/VG_100K/{image_id}.jpg or
IMAGES/VG_100K_2/{image_id}.jpg (the two folders VG ships).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.data.datasets.write import Sample

_FOLDERS = ("", "VG_100K", "VG_100K_2")


def _load_list(path: str | Path, what: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path}: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"{what} {path}: a Visual Genome file is a list of images")
    return data


def _image_id(entry: dict[str, Any]) -> int:
    return int(entry.get("image_id", entry.get("id")))


def _name(obj: dict[str, Any]) -> str:
    names = obj.get("names") or [obj.get("name", "")]
    return str(names[0]).strip().lower()


def _scene(objs: list[dict[str, Any]], rels: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not objs:
        return None
    order = sorted(range(len(objs)), key=lambda i: -objs[i]["w"] * objs[i]["h"])  # largest first
    index = {objs[i]["object_id"]: n for n, i in enumerate(order)}
    objects = [{"name": _name(objs[i]), "bbox": [objs[i]["x"], objs[i]["y"], objs[i]["x"] + objs[i]["w"],
                                                 objs[i]["y"] + objs[i]["h"]],
                "attributes": [str(a).strip().lower() for a in objs[i].get("attributes", []) if str(a).strip()]}
               for i in order]
    relations = [{"subject": index[r["subject"]["object_id"]], "relation": str(r["predicate"]).strip().lower(),
                  "object": index[r["object"]["object_id"]]}
                 for r in rels if r["subject"].get("object_id") in index and r["object"].get("object_id") in index]
    return {"objects": objects, "relations": relations}


def read(images: str | Path, regions: str | Path, objects: str | Path | None = None,
         relationships: str | Path | None = None) -> tuple[Iterator[Sample], None]:
    root = Path(images)
    entries = _load_list(regions, "--captions")
    objs = {_image_id(e): e.get("objects", []) for e in _load_list(objects, "--objects")} if objects else {}
    rels = {_image_id(e): e.get("relationships", []) for e in _load_list(relationships, "--relationships")} \
        if relationships else {}

    def path(image_id: int) -> str:
        for folder in _FOLDERS:
            rel = f"{folder}/{image_id}.jpg" if folder else f"{image_id}.jpg"
            if (root / rel).exists():
                return rel
        return f"{image_id}.jpg"  # reported missing by the writer

    def samples() -> Iterator[Sample]:
        for e in entries:
            image_id = _image_id(e)
            scene = _scene(objs.get(image_id, []), rels.get(image_id, []))
            for r in e.get("regions", []):
                phrase = str(r.get("phrase", "")).strip()
                if phrase:
                    yield Sample(caption=phrase, image_id=image_id, image=path(image_id), scene=scene,
                                 extra={"region_id": r.get("region_id"),
                                        "region": [r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]]})

    return samples(), None
