"""A Conceptual Captions style TSV (Sharma et al. 2018): one `caption<TAB>url` row per image, an
optional header row naming the columns (`caption`, `url` or `image`), and the images already
downloaded into the images folder. An image is found as the row's path (when it is one), the
url's file name, or img2dataset's numbering of the row (000000123.jpg, or 00000/000000123.jpg).
"""

from __future__ import annotations

import csv
import posixpath
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from jobs.data.datasets.write import Sample

_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def _find(root: Path, ref: str, row: int) -> str:
    parsed = urlparse(ref)
    candidates = [ref] if not parsed.scheme else [posixpath.basename(parsed.path)]
    for ext in _EXTS:
        candidates += [f"{row:09d}{ext}", f"{row // 10000:05d}/{row:09d}{ext}"]
    return next((c for c in candidates if c and (root / c).is_file()), candidates[0] or f"{row:09d}.jpg")


def read(images: str | Path, tsv: str | Path) -> tuple[Iterator[Sample], None]:
    root = Path(images)
    try:
        lines = Path(tsv).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"--captions {tsv}: {exc}") from None
    rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    caption_col, image_col = 0, 1
    if rows and {c.strip().lower() for c in rows[0]} & {"caption", "url", "image"}:
        header = [c.strip().lower() for c in rows.pop(0)]
        if "caption" not in header or not {"url", "image"} & set(header):
            raise ValueError(f"--captions {tsv}: the header needs a caption column and a url or image column; "
                             f"it has {header}")
        caption_col = header.index("caption")
        image_col = header.index("url") if "url" in header else header.index("image")
    for n, row in enumerate(rows):
        if len(row) <= max(caption_col, image_col):
            raise ValueError(f"--captions {tsv}: row {n + 1} has {len(row)} columns; expected caption<TAB>url")

    def samples() -> Iterator[Sample]:
        for n, row in enumerate(rows):
            caption, ref = row[caption_col].strip(), row[image_col].strip()
            if caption:
                yield Sample(caption=caption, image_id=ref or n, image=_find(root, ref, n),
                             extra={"url": ref} if urlparse(ref).scheme else {})

    return samples(), None
