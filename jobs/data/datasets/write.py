"""Samples of any layout -> WebDataset shards (img2dataset's layout) + tokenizer + dataset card.

A converter (jobs.data.datasets.LAYOUTS) yields `Sample`s, the captions of one image adjacent;
this writes, per sample, KEY.jpg|png|webp (stored as it is when JPEG, PNG or WebP, else converted
to JPEG), KEY.txt and KEY.json (key, caption, width, height, image_id, source, sha256, the
layout's extra fields and, when the layout has one, `scene`: objects with pixel x0 y0 x1 y1
boxes, class names and attributes, and relations between them), plus KEY.npz when the layout
has precomputed region features. An image is encoded once for all its captions. Rows whose image
is missing or unreadable are skipped and listed in the result, never silently.

`eval_images` > 0 holds out the last that many images (all their captions) into OUT/eval/, the
rest going to OUT/train/; the tokenizer, objects_vocab.txt and dataset.json lie in OUT.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import storage
from jobs.data.datasets.card import DatasetCard, save_card
from jobs.data.datasets.vocab import VISUAL_GENOME_CLASSES
from jobs.data.formats import ShardWriter
from jobs.data.tokenizer import save_tokenizer, train_tokenizer
from jobs.storage import StorageOptions

_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_MAX_PER_SHARD = 10_000  # the key's 4-digit index field
# Words that name no relation on their own ("on top of": "top" is the relation word); ERNIE-ViL
# masks relation nodes, and a word every relation shares would say which node nothing.
_RELATION_STOP = frozenset({"a", "an", "the", "of", "to", "in", "on", "at", "with", "from"})


@dataclass
class Sample:
    caption: str
    image_id: str | int
    image: str = ""  # path relative to the images folder (or absolute)
    data: bytes | None = None  # the encoded image, when it does not come from a file
    scene: dict[str, Any] | None = None  # {"objects": [{"name", "bbox", "attributes"}], "relations": [...]}
    extra: dict[str, Any] = field(default_factory=dict)  # more KEY.json fields (url, source ids)
    npz: bytes | None = None


@dataclass
class PrepareResult:
    shards: list[str]
    samples: int
    tokenizer: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    card: str = ""
    eval_shards: list[str] = field(default_factory=list)
    images: int = 0


def encode_image(data: bytes) -> tuple[bytes, str, int, int]:
    """(bytes, extension, width, height); verifies the image decodes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        fmt, (w, h) = im.format, im.size
        if fmt in _KEEP_FORMATS:
            return data, _KEEP_FORMATS[fmt], w, h
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg", w, h


class _Split:
    """The shards of one split, opened as samples arrive."""

    def __init__(self, folder: str, per_shard: int, options: StorageOptions | None) -> None:
        self.folder, self.per_shard, self.options = folder, per_shard, options
        self.shards: list[str] = []
        self.writer: ShardWriter | None = None
        self.n = 0

    def write(self, members: dict[str, bytes], meta: dict[str, Any]) -> None:
        if self.n % self.per_shard == 0:
            self.close()
            self.shards.append(storage.join(self.folder, f"{len(self.shards):05d}.tar"))
            self.writer = ShardWriter(self.shards[-1], self.options)
        key = f"{len(self.shards) - 1:05d}{self.n % self.per_shard:04d}"
        meta = {"key": key, **meta}
        self.writer.write(key, {**members, "json": json.dumps(meta).encode()})  # type: ignore[union-attr]
        self.n += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _relation_words(predicate: str) -> list[str]:
    return [w for w in predicate.lower().split() if w not in _RELATION_STOP]


def write_dataset(samples: Iterable[Sample], out: str, *, name: str, layout: str, images: str | Path = "",
                  classes: list[str] | None = None, samples_per_shard: int = 1000, vocab_size: int = 8000,
                  eval_images: int = 0, max_classes: int = VISUAL_GENOME_CLASSES,
                  options: StorageOptions | None = None,
                  progress: Callable[[int], None] | None = None) -> PrepareResult:
    """Write `samples` under `out`; `classes` is the layout's own label vocabulary (COCO's
    categories), else the `max_classes` most frequent object names become it (1600: BUTD's size)."""
    if not 1 <= samples_per_shard <= _MAX_PER_SHARD:
        raise ValueError(f"samples_per_shard={samples_per_shard}: allowed 1..{_MAX_PER_SHARD}")
    root = Path(images) if images else None
    rows = list(samples)
    image_order = list(dict.fromkeys(s.image_id for s in rows))
    held_out = set(image_order[len(image_order) - eval_images:]) if eval_images else set()
    if eval_images and len(held_out) >= len(image_order):
        raise ValueError(f"--eval-images {eval_images}: the data has only {len(image_order)} images")
    splits = {"train": _Split(storage.join(out, "train") if eval_images else out, samples_per_shard, options)}
    if eval_images:
        splits["eval"] = _Split(storage.join(out, "eval"), samples_per_shard, options)
    skipped: list[tuple[str, str]] = []
    texts: list[str] = []
    names: Counter[str] = Counter()
    attributes: set[str] = set()
    relations: set[str] = set()
    fields: set[str] = {"image_id"}
    written_images: set[str | int] = set()
    cache: tuple[str, tuple[bytes, str, int, int] | Exception] | None = None
    try:
        for i, s in enumerate(rows):
            source = s.image or f"<{s.image_id}>"
            if cache is None or cache[0] != source:
                try:
                    raw = s.data if s.data is not None else _read(root, s.image)
                    cache = (source, encode_image(raw))
                except FileNotFoundError as exc:
                    cache = (source, exc)
                except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
                    cache = (source, exc)
            encoded = cache[1]
            if isinstance(encoded, Exception):
                why = "missing image" if isinstance(encoded, FileNotFoundError) else \
                    f"unreadable image ({type(encoded).__name__})"
                skipped.append((source, why))
                continue
            data, ext, w, h = encoded
            meta: dict[str, Any] = {"caption": s.caption, "status": "success", "width": w, "height": h,
                                    "image_id": s.image_id, **({"source": s.image} if s.image else {}),
                                    "sha256": hashlib.sha256(data).hexdigest(), **s.extra}
            if s.scene:
                meta["scene"] = s.scene
                for obj in s.scene.get("objects", ()):
                    names[str(obj.get("name", "")).lower()] += 1
                    attributes.update(str(a).lower() for a in obj.get("attributes", ()))
                    fields.update({"boxes"} if obj.get("bbox") else set())
                for rel in s.scene.get("relations", ()):
                    relations.update(_relation_words(str(rel.get("relation", ""))))
            members = {ext: data, "txt": s.caption.encode()}
            if s.npz is not None:
                members["npz"] = s.npz
                fields.add("region_features")
            splits["eval" if s.image_id in held_out else "train"].write(members, meta)
            texts.append(s.caption)
            written_images.add(s.image_id)
            if progress is not None:
                progress(i + 1)
    finally:
        for split in splits.values():
            split.close()
    if not texts:
        raise ValueError(f"no usable image-caption pair ({len(skipped)} skipped)")
    names.pop("", None)
    vocab = classes if classes is not None else [n for n, _ in sorted(names.items(), key=lambda kv: (-kv[1], kv[0]))
                                                 ][:max_classes]
    if vocab and names:
        fields.add("object_labels")
    if attributes or relations:
        fields.add("scene_graph")
    scene_words = {"object": tuple(sorted(set(vocab))), "attribute": tuple(sorted(attributes)),
                   "relation": tuple(sorted(relations))} if "scene_graph" in fields else {}
    tok_uri = storage.join(out, "tokenizer.json")
    save_tokenizer(train_tokenizer(texts, vocab_size=vocab_size), tok_uri, options)
    card = DatasetCard(name=name, layout=layout, fields=tuple(f for f in ("image_id", "boxes", "object_labels",
                                                                         "scene_graph", "region_features")
                                                                   if f in fields),
                       scene_words={k: v for k, v in scene_words.items() if v},
                       grounded_words=tuple(vocab) if names else (),
                       captions_per_image=round(len(texts) / max(len(written_images), 1), 3))
    card_uri = save_card(out, card, vocab if names else (), options)
    return PrepareResult(shards=splits["train"].shards, samples=len(texts), tokenizer=tok_uri, skipped=skipped,
                         card=card_uri, eval_shards=splits["eval"].shards if eval_images else [],
                         images=len(written_images))


def _read(root: Path | None, rel: str) -> bytes:
    path = Path(rel) if root is None or Path(rel).is_absolute() else root / rel
    return path.read_bytes()
