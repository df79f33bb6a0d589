"""A user's image folder + captions file -> WebDataset shards (img2dataset's layout) + tokenizer.

Captions come as CSV (a header row) or JSON lines, with the image path in a column named
`image`, `file_name`, `filename` or `path` (relative to the image folder) and the caption in
`caption` or `text`. Images are stored as they are when they are JPEG, PNG or WebP (no re-encoding
loss), others are converted to JPEG. Rows whose image is missing or unreadable are skipped and
listed in the result, never silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from jobs import storage
from jobs.data.formats import ShardWriter
from jobs.data.tokenizer import save_tokenizer, train_tokenizer
from jobs.storage import StorageOptions

_IMAGE_KEYS = ("image", "file_name", "filename", "path")
_CAPTION_KEYS = ("caption", "text")
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class PrepareResult:
    shards: list[str]
    samples: int
    tokenizer: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason)


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


def _encoded(path: Path) -> tuple[bytes, str, int, int]:
    """(bytes, extension, width, height); verifies the image decodes."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        fmt, (w, h) = im.format, im.size
        if fmt in _KEEP_FORMATS:
            return data, _KEEP_FORMATS[fmt], w, h
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg", w, h


def prepare(images: str | Path, captions: str | Path, out: str, *, samples_per_shard: int = 1000,
            vocab_size: int = 8000, options: StorageOptions | None = None,
            progress: Callable[[int], None] | None = None) -> PrepareResult:
    root = Path(images)
    if not root.is_dir():
        raise ValueError(f"--images {images}: not a folder")
    pairs = list(read_captions(captions))
    shards: list[str] = []
    skipped: list[tuple[str, str]] = []
    texts: list[str] = []
    writer: ShardWriter | None = None
    n = 0
    try:
        for i, (rel, text) in enumerate(pairs):
            try:
                data, ext, w, h = _encoded(root / rel)
            except FileNotFoundError:
                skipped.append((rel, "missing image"))
                continue
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
                skipped.append((rel, f"unreadable image ({type(exc).__name__})"))
                continue
            if n % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                shards.append(storage.join(out, f"{len(shards):05d}.tar"))
                writer = ShardWriter(shards[-1], options)
            key = f"{len(shards) - 1:05d}{n % samples_per_shard:04d}"
            meta = {"key": key, "caption": text, "status": "success", "width": w, "height": h,
                    "source": rel, "sha256": hashlib.sha256(data).hexdigest()}
            writer.write(key, {ext: data, "txt": text.encode(), "json": json.dumps(meta).encode()})  # type: ignore[union-attr]
            texts.append(text)
            n += 1
            if progress is not None:
                progress(i + 1)
    finally:
        if writer is not None:
            writer.close()
    if not texts:
        raise ValueError(f"{captions}: no usable image-caption pair ({len(skipped)} skipped)")
    tok_uri = storage.join(out, "tokenizer.json")
    save_tokenizer(train_tokenizer(texts, vocab_size=vocab_size), tok_uri, options)
    return PrepareResult(shards=shards, samples=n, tokenizer=tok_uri, skipped=skipped)
