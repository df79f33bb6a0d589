"""A user's image folder + captions file (the `folder` layout) -> WebDataset shards + tokenizer.

Other layouts (COCO, Visual Genome, CC3M, img2dataset output) are in jobs.data.datasets.layouts;
all of them are written by jobs.data.datasets.write.

Captions come as CSV (a header row) or JSON lines, with the image path in a column named
`image`, `file_name`, `filename` or `path` (relative to the image folder) and the caption in
`caption` or `text`. Images are stored as they are when they are JPEG, PNG or WebP (no re-encoding
loss), others are converted to JPEG. Rows whose image is missing or unreadable are skipped and
listed in the result, never silently.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from jobs.data.datasets.write import PrepareResult
from jobs.storage import StorageOptions

_IMAGE_KEYS = ("image", "file_name", "filename", "path")
_CAPTION_KEYS = ("caption", "text")
__all__ = ["PrepareResult", "prepare", "read_captions"]


def read_captions(path: str | Path) -> Iterator[tuple[str, str]]:
    """(image path, caption) pairs from a CSV or JSON-lines file."""
    p = Path(path)
    with p.open(newline="") as f:
        rows = (json.loads(line) for line in f if line.strip()) if p.suffix in (".jsonl", ".json") else csv.DictReader(f)
        for i, row in enumerate(rows):
            image = next((row[k] for k in _IMAGE_KEYS if row.get(k)), None)
            text = next((row[k] for k in _CAPTION_KEYS if row.get(k) is not None), None)
            if image is None or text is None:
                raise ValueError(f"{path}: row {i + 1} needs an image column ({'/'.join(_IMAGE_KEYS)}) and a "
                                 f"caption column ({'/'.join(_CAPTION_KEYS)}); it has {sorted(row)}")
            yield str(image), str(text)


def prepare(images: str | Path, captions: str | Path, out: str, *, samples_per_shard: int = 1000,
            vocab_size: int = 8000, options: StorageOptions | None = None,
            progress: Callable[[int], None] | None = None) -> PrepareResult:
    from jobs.data.datasets.layouts import Inputs
    from jobs.data.datasets.layouts import prepare as prepare_layout

    return prepare_layout("folder", Inputs(images=str(images), captions=str(captions)), out,
                          samples_per_shard=samples_per_shard, vocab_size=vocab_size, options=options,
                          progress=progress)
