"""A deterministic "shapes world": image-caption pairs whose captions are true of the pixels.

Each image holds 1-3 non-overlapping coloured shapes; the caption names every object (size,
colour, shape) and states spatial relations computed from the drawn boxes. The words in SHAPES,
COLORS, SIZES and RELATIONS are the visually grounded ones, so alignment objectives (ITM, ITC,
WRA) have something real to learn, at a size a laptop trains in minutes.

Output layout (img2dataset / WebDataset style):
    OUT/train/00000.tar ... OUT/train/{shards-1:05d}.tar   keys f"{shard:05d}{index:04d}"
    OUT/eval/00000.tar ...                                 keys numbered AFTER the train shards:
                                                           eval shard e uses shard number shards+e
    OUT/tokenizer.json   trained on all captions (train + eval)
    OUT/dataset.json     the dataset card (jobs.data.datasets.shapes) + OUT/objects_vocab.txt
    OUT/manifest.json    written last: its presence marks a complete dataset
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw
from pyarrow import fs as pafs

from jobs.data.formats import ShardWriter
from jobs.data.tokenizer import save_tokenizer, train_tokenizer
from jobs.storage import StorageOptions, filesystem_for, join, write_text

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
GROUNDED_WORDS = (*SHAPES, *COLORS, *SIZES, "left", "right", "above", "below")
# The words of each scene-graph node type (ERNIE-ViL, Yu et al. 2021: objects, their attributes, the
# relations between them) in this world's captions, which are generated from the scene graph itself:
# no parser needed. "of" is no relation word: every horizontal relation has it, so it names none.
SCENE_GRAPH_WORDS: dict[str, tuple[str, ...]] = {
    "object": SHAPES,
    "attribute": (*COLORS, *SIZES),
    "relation": tuple(dict.fromkeys(w for r in RELATIONS for w in r.split() if w != "of")),
}

_OBJECT_COUNT_WEIGHTS = (1, 2, 2)  # P(1, 2, 3 objects) = 0.2, 0.4, 0.4: most captions carry a relation
_PLACEMENT_TRIES = 200
_JPEG_QUALITY = 95
_SPLIT_CODE = {"train": 0, "eval": 1}
_MAX_PER_SHARD = 10_000  # the key's 4-digit index field

Rng = random.Random | np.random.Generator
T = TypeVar("T")


def _randint(rng: Rng, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] from either kind of generator."""
    if isinstance(rng, random.Random):
        return rng.randint(lo, hi)
    return int(rng.integers(lo, hi + 1))


def _choice(rng: Rng, items: Sequence[T]) -> T:
    return items[_randint(rng, 0, len(items) - 1)]


def _weighted_index(rng: Rng, weights: Sequence[int]) -> int:
    draw = _randint(rng, 0, sum(weights) - 1)
    for i, w in enumerate(weights):
        if draw < w:
            return i
        draw -= w
    raise AssertionError("unreachable")


def size_px(size: str, image_size: int) -> int:
    """Shape extent in pixels: small ~ 3/16 of the image (12 px at 64), large twice that."""
    small = max(3, round(image_size * 3 / 16))
    return small if size == "small" else 2 * small


def relation(subject_bbox: Sequence[int], object_bbox: Sequence[int]) -> str:
    """Where the subject is relative to the object: box centres, along the dominant axis (y grows down)."""
    dx = (subject_bbox[0] + subject_bbox[2]) - (object_bbox[0] + object_bbox[2])  # 2x centre offsets
    dy = (subject_bbox[1] + subject_bbox[3]) - (object_bbox[1] + object_bbox[3])
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _clear(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    """Boxes (x1, y1 exclusive) at least `gap` px apart along some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _unambiguous(a: Sequence[int], b: Sequence[int], margin: int) -> bool:
    """The dominant axis wins by `margin` px, so "left of" vs "above" is never a coin toss."""
    dx = abs((a[0] + a[2]) - (b[0] + b[2])) / 2
    dy = abs((a[1] + a[3]) - (b[1] + b[3])) / 2
    return abs(dx - dy) >= margin


def _place(
    rng: Rng, sizes: list[int], pairs: list[tuple[int, int]], image_size: int
) -> list[list[int]] | None:
    """Random non-overlapping boxes whose described pairs have a clear relation, or None."""
    margin, gap, clarity = 1, max(2, image_size // 32), max(2, image_size // 16)
    for _ in range(_PLACEMENT_TRIES):
        boxes: list[list[int]] = []
        for s in sizes:
            x0 = _randint(rng, margin, image_size - s - margin)
            y0 = _randint(rng, margin, image_size - s - margin)
            box = [x0, y0, x0 + s, y0 + s]
            if not all(_clear(box, other, gap) for other in boxes):
                break
            boxes.append(box)
        if len(boxes) == len(sizes) and all(_unambiguous(boxes[i], boxes[j], clarity) for i, j in pairs):
            return boxes
    return None


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL coordinates are inclusive
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=rgb)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def make_sample(rng: Rng, image_size: int, noise: float = 2.0) -> tuple[Image.Image, str, dict[str, Any]]:
    """One scene: (RGB image, caption, scene dict with objects and relations).

    Objects have distinct (colour, shape) pairs so "the blue square" refers to one object.
    `noise` is the std of faint Gaussian pixel noise (0 disables it).
    """
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small for 3 shapes; use >= 32")
    count = 1 + _weighted_index(rng, _OBJECT_COUNT_WEIGHTS)
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    objects: list[dict[str, Any]] = []
    for _ in range(count):
        color, shape = kinds.pop(_randint(rng, 0, len(kinds) - 1))
        objects.append({"shape": shape, "color": color, "size": _choice(rng, SIZES)})
    reference = _randint(rng, 0, 1)  # what the third object is related to
    while True:  # drop the last object if it cannot be placed clearly (rare; deterministic)
        pairs = [(0, 1), (2, reference)][: len(objects) - 1]
        boxes = _place(rng, [size_px(o["size"], image_size) for o in objects], pairs, image_size)
        if boxes is not None:
            break
        objects.pop()
    for obj, box in zip(objects, boxes, strict=True):
        obj["bbox"] = box
    relations = [{"subject": i, "relation": relation(boxes[i], boxes[j]), "object": j} for i, j in pairs]

    grey = _randint(rng, 225, 250)
    image = Image.new("RGB", (image_size, image_size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj["shape"], obj["bbox"], COLOR_RGB[obj["color"]])
    if noise > 0:
        nrng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng.getrandbits(63))
        pixels = np.asarray(image, dtype=np.float32) + nrng.normal(0.0, noise, (image_size, image_size, 3))
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")

    scene = {"objects": objects, "relations": relations}
    return image, describe(scene), scene


def describe(scene: dict[str, Any]) -> str:
    """Caption for a scene: at most 21 words ("a small red circle left of a large blue square and ...")."""
    objs = scene["objects"]

    def name(i: int, article: str) -> str:
        return f"{article} {objs[i]['size']} {objs[i]['color']} {objs[i]['shape']}"

    words = [name(0, "a")]
    for n, rel in enumerate(scene["relations"]):
        subject, obj = rel["subject"], rel["object"]
        if n == 0:
            words.append(f"{rel['relation']} {name(obj, 'a')}")
        else:
            words.append(f"and {name(subject, 'a')} {rel['relation']} {name(obj, 'the')}")
    return " ".join(words)


@dataclass(frozen=True)
class SynthResult:
    train_shards: list[str]
    eval_shards: list[str]
    tokenizer: str
    train_samples: int
    eval_samples: int


def _balanced(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` sizes differing by at most one (none empty when parts <= total)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _refuse_stale(folder: str, keep: list[str], options: StorageOptions | None) -> None:
    """A folder read later by expand_shards must not mix in shards from an earlier, larger run."""
    filesystem, path = filesystem_for(folder, options)
    keep_paths = {filesystem_for(u, options)[1] for u in keep}
    listed = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    stale = sorted(i.path for i in listed if i.path.endswith(".tar") and i.path not in keep_paths)
    if stale:
        raise ValueError(
            f"{folder} already holds shards this run would not overwrite ({stale[:3]}...); "
            "write to an empty folder"
        )


def _encode_jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: 4:2:0 would smear the colour of a 12-px shape into the background.
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def write_synthetic(
    out: str,
    samples: int,
    shards: int,
    seed: int = 0,
    image_size: int = 64,
    eval_samples: int | None = None,
    options: StorageOptions | None = None,
    vocab_size: int = 2000,
    progress: Callable[[int], None] | None = None,
) -> SynthResult:
    """Write a shapes-world dataset under `out` (local or s3://); byte-identical for a given seed.

    Sample k of a split is seeded from (seed, split, k) alone, so its content does not depend on
    the shard count or write order. eval_samples defaults to max(64, samples // 10).
    """
    if samples < 1 or not 1 <= shards <= samples:
        raise ValueError(
            f"need samples >= 1 and 1 <= shards <= samples, got samples={samples} shards={shards}"
        )
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    per_shard = math.ceil(samples / shards)
    if per_shard > _MAX_PER_SHARD:
        raise ValueError(f"{per_shard} samples per shard exceeds {_MAX_PER_SHARD}; use more shards")
    n_eval = max(64, samples // 10) if eval_samples is None else eval_samples
    if n_eval < 1:
        raise ValueError(f"eval_samples={eval_samples} must be >= 1")
    splits = {
        "train": [join(out, "train", f"{i:05d}.tar") for i in range(shards)],
        "eval": [join(out, "eval", f"{i:05d}.tar") for i in range(math.ceil(n_eval / per_shard))],
    }
    for split, uris in splits.items():
        _refuse_stale(join(out, split), uris, options)

    captions: list[str] = []
    for split, uris in splits.items():
        key_offset = 0 if split == "train" else shards  # eval keys continue after the train shards
        index = 0
        for shard, count in enumerate(_balanced(samples if split == "train" else n_eval, len(uris))):
            with ShardWriter(uris[shard], options) as writer:
                for i in range(count):
                    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
                    image, text, scene = make_sample(rng, image_size)
                    key = f"{key_offset + shard:05d}{i:04d}"
                    jpg = _encode_jpeg(image)
                    meta = {
                        "key": key,
                        "caption": text,
                        "status": "success",
                        "width": image_size,
                        "height": image_size,
                        "sha256": hashlib.sha256(jpg).hexdigest(),
                        "scene": scene,
                    }
                    writer.write(key, {"jpg": jpg, "txt": text.encode(), "json": json.dumps(meta).encode()})
                    captions.append(text)
                    index += 1
                    if progress is not None:
                        progress(len(captions))

    tokenizer_uri = join(out, "tokenizer.json")
    save_tokenizer(train_tokenizer(captions, vocab_size=vocab_size), tokenizer_uri, options)
    from jobs.data.datasets import shapes  # the plug-in: this world's card (labels, scene words)
    from jobs.data.datasets.card import save_card

    save_card(out, shapes.card(), shapes.classes(), options)
    result = SynthResult(
        train_shards=splits["train"],
        eval_shards=splits["eval"],
        tokenizer=tokenizer_uri,
        train_samples=samples,
        eval_samples=n_eval,
    )
    manifest = {
        "seed": seed,
        "image_size": image_size,
        "train_samples": samples,
        "eval_samples": n_eval,
        "train_shards": [f"train/{i:05d}.tar" for i in range(len(splits["train"]))],  # relative to OUT
        "eval_shards": [f"eval/{i:05d}.tar" for i in range(len(splits["eval"]))],
        "tokenizer": "tokenizer.json",
        "key_scheme": "f'{shard:05d}{index:04d}'; eval shard e is numbered len(train_shards) + e",
        "vocabularies": {"shapes": SHAPES, "colors": COLORS, "sizes": SIZES, "relations": RELATIONS},
    }
    write_text(join(out, "manifest.json"), json.dumps(manifest, indent=2), options)
    return result
