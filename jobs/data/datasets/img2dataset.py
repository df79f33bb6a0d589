"""img2dataset output as it is (Beaumont 2021), in any of its output formats:
`webdataset` (NNNNN.tar of KEY.jpg/txt/json), `parquet` (NNNNN.parquet with `jpg`, `caption`,
`key`, `url`... columns) or `files` (NNNNN/KEY.jpg + KEY.txt + KEY.json). Samples whose status is
not "success" are left out (img2dataset records failed downloads too); each sample keeps its json
(url, original width/height...) and its image id is its url, else its key. KEY.npz members
(precomputed region features added by an extractor) are carried over.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.data.datasets.write import Sample
from jobs.data.formats import IMAGE_EXTENSIONS, iter_shard

_KEEP = ("url", "original_width", "original_height", "exif", "similarity")


def _sample(key: str, image: bytes | None, caption: str | None, meta: dict[str, Any], npz: bytes | None,
            origin: str) -> Sample | None:
    if meta.get("status", "success") != "success" or image is None:
        return None
    text = (caption if caption is not None else str(meta.get("caption") or "")).strip()
    if not text:
        return None
    return Sample(caption=text, image_id=str(meta.get("url") or key), data=image, npz=npz,
                  extra={k: meta[k] for k in _KEEP if k in meta} | {"origin": origin})


def _tar(path: Path) -> Iterator[Sample | None]:
    for raw in iter_shard(str(path)):
        meta = json.loads(raw.parts["json"]) if "json" in raw.parts else {}
        image = next((raw.parts[e] for e in IMAGE_EXTENSIONS if e in raw.parts), None)
        text = raw.parts["txt"].decode("utf-8", "replace") if "txt" in raw.parts else None
        yield _sample(raw.key, image, text, meta, raw.parts.get("npz"), f"{path.name}/{raw.key}")


def _parquet(path: Path) -> Iterator[Sample | None]:
    import pyarrow.parquet as pq

    for row in pq.read_table(path).to_pylist():
        image = row.pop("jpg", None) or row.pop("png", None) or row.pop("webp", None)
        key = str(row.get("key", ""))
        yield _sample(key, image, row.get("caption"), row, None, f"{path.name}/{key}")


def _files(folder: Path) -> Iterator[Sample | None]:
    for img in sorted(p for p in folder.iterdir() if p.suffix.lstrip(".").lower() in IMAGE_EXTENSIONS):
        meta_path, txt_path, npz_path = img.with_suffix(".json"), img.with_suffix(".txt"), img.with_suffix(".npz")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        text = txt_path.read_text() if txt_path.exists() else None
        yield _sample(img.stem, img.read_bytes(), text, meta, npz_path.read_bytes() if npz_path.exists() else None,
                      f"{folder.name}/{img.stem}")


def read(folder: str | Path) -> tuple[Iterator[Sample], None]:
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--images {folder}: not a folder (img2dataset's output folder)")
    tars, parquets = sorted(root.glob("*.tar")), sorted(root.glob("*.parquet"))
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not (tars or parquets or subdirs):
        raise ValueError(f"--images {folder}: no img2dataset output (*.tar, *.parquet or NNNNN/ folders)")

    def samples() -> Iterator[Sample]:
        # webdataset output also writes NNNNN.parquet (metadata only, no images): the tars win
        sources = [_tar(t) for t in tars] or [_parquet(p) for p in parquets] or [_files(d) for d in subdirs]
        for source in sources:
            yield from (s for s in source if s is not None)

    return samples(), None
