"""The Ray Data input pipeline of one rank: its units of shards -> decoded samples -> model-ready rows.

    [unit_item] ──map_batches (one CPU task per unit)──▶ read (reader.iter_unit_rows),
                                decode + resize images, tokenize + pad captions, scene boxes/labels,
                                yielded as columnar batches
                                ──iter_torch_batches (order preserved) ─▶ the rank's train loop

Each rank streams its own deterministic sequence (see `jobs.data.stream`), so a position in it is
(epoch, unit, offset) and a resumed run continues exactly where it stopped. Images travel as
uint8 (4x smaller in the object store than float32); `jobs.data.batch` normalises them on the
worker.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from jobs.data.index import ShardIndex
from jobs.data.reader import ReadSpec, ShardReport, iter_unit_rows
from jobs.data.regions import region_columns
from jobs.data.tokenizer import encode, load_tokenizer
from jobs.data.units import Unit
from jobs.storage import StorageOptions

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PipelineSpec:
    """Everything a read/preprocess task needs; small and picklable."""

    tokenizer_uri: str
    image_size: int
    max_text_len: int
    max_objects: int
    storage: StorageOptions
    image_column: str = "jpg"
    caption_column: str = "caption"
    # F of the precomputed region features the model reads (region_source: precomputed); 0 = none
    region_feature_size: int = 0
    # The dataset's object vocabulary (jobs.data.datasets): class name or synonym -> class id, and
    # the scene-object field that holds the name. Objects whose name is not in it get label -1.
    object_index: tuple[tuple[str, int], ...] = ()
    object_key: str = "name"

    @property
    def read(self) -> ReadSpec:
        return ReadSpec(image_size=self.image_size, storage=self.storage,
                        image_column=self.image_column, caption_column=self.caption_column)


def sample_id(key: str) -> int:
    """A stable 63-bit id for a sample key (for tracking which samples a rank consumed)."""
    return (zlib.crc32(key.encode()) << 31) ^ zlib.adler32(key.encode())


_ROWS_PER_BATCH = 256


def unit_seed(seed: int | None, epoch: int, shard: str, start: int) -> int | None:
    """A unit's within-unit permutation seed: stable across processes (no Python hash randomisation)."""
    return None if seed is None else zlib.crc32(f"{seed}:{epoch}:{shard}:{start}".encode())


def unit_item(unit: Unit, index: ShardIndex, unit_pos: int, begin: int = 0) -> dict[str, Any]:
    """What a read task needs for one unit: its samples, which positions of their permuted order to read
    (from `begin`, or the piece's own begin, to the piece's end), its bytes (-1: unknown)."""
    ranged = index.offsets is not None
    return {"shard": unit.shard, "unit_pos": unit_pos, "start": unit.start, "stop": unit.stop,
            "begin": max(begin, unit.begin), "end": unit.last,
            "lo": index.offsets[unit.start] if ranged else -1, "hi": index.offsets[unit.stop] if ranged else -1,
            "truncated": index.truncated_key or "" if unit.stop == index.samples else ""}


def _unit_batches(items: dict[str, np.ndarray], spec: PipelineSpec, seed: int | None, epoch: int,
                  ledger: Any) -> Iterator[dict[str, np.ndarray]]:
    """One task per unit: fetch, decode and tokenize its samples only, as columnar batches of rows.

    Columnar output (one numpy array per column) instead of a dict per row: Ray Data then moves
    whole arrays, not Python objects, and decode + tokenize happen in one task with no second
    hop through the object store.
    """
    def report(r: ShardReport) -> None:
        if ledger is not None:
            ledger.add.remote(r)

    for i in range(len(items["shard"])):
        shard, start, lo = str(items["shard"][i]), int(items["start"][i]), int(items["lo"][i])
        rows: list[dict[str, Any]] = []
        for row in iter_unit_rows(shard, spec.read, start, int(items["stop"][i]),
                                  seed=unit_seed(seed, epoch, shard, start), begin=int(items["begin"][i]),
                                  end=int(items["end"][i]),
                                  byte_range=None if lo < 0 else (lo, int(items["hi"][i])),
                                  truncated_key=str(items["truncated"][i]) or None, on_report=report):
            row["unit_pos"] = int(items["unit_pos"][i])
            rows.append(row)
            if len(rows) == _ROWS_PER_BATCH:
                yield _columns(rows, spec)
                rows = []
        if rows:
            yield _columns(rows, spec)


@lru_cache(maxsize=4)
def _tokenizer(uri: str, storage: StorageOptions):  # noqa: ANN202 - tokenizers.Tokenizer
    return load_tokenizer(uri, storage)


def _scene(info: dict[str, Any], max_objects: int, names: dict[str, int], key: str) -> tuple[np.ndarray, np.ndarray]:
    """The scene objects' classes (via the dataset's vocabulary) and normalised boxes."""
    labels = np.full((max_objects,), -1, dtype=np.int64)
    boxes = np.zeros((max_objects, 4), dtype=np.float32)
    scene = info.get("scene") or {}
    if max_objects == 0 or not scene:
        return labels, boxes
    w = float(info.get("width") or 1.0)
    h = float(info.get("height") or 1.0)
    for i, obj in enumerate((scene.get("objects") or [])[:max_objects]):
        labels[i] = names.get(str(obj.get(key, "")).lower(), -1)
        x0, y0, x1, y1 = obj.get("bbox", (0, 0, 0, 0))
        boxes[i] = (x0 / w, y0 / h, x1 / w, y1 / h)
    return labels, boxes


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    try:
        info = json.loads(row["meta"]) if row["meta"] else {}
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def image_id(info: dict[str, Any], key: str) -> int:
    """Which image a sample's caption describes: the metadata's `image_id` (COCO: five captions
    share one), else the sample itself. The retrieval ground truth (jobs.evaluate)."""
    raw = info.get("image_id")
    if raw is None:
        return sample_id(key)
    if isinstance(raw, int) and 0 <= raw < 1 << 62:
        return raw
    return sample_id(f"image:{raw}")


@lru_cache(maxsize=4)
def _names(index: tuple[tuple[str, int], ...]) -> dict[str, int]:
    return dict(index)


def _columns(rows: list[dict[str, Any]], spec: PipelineSpec) -> dict[str, np.ndarray]:
    n = len(rows)
    labels = np.full((n, spec.max_objects), -1, dtype=np.int64)
    boxes = np.zeros((n, spec.max_objects, 4), dtype=np.float32)
    images = np.zeros((n,), dtype=np.int64)
    names = _names(spec.object_index)
    for i, row in enumerate(rows):
        info = _meta(row)
        labels[i], boxes[i] = _scene(info, spec.max_objects, names, spec.object_key)
        images[i] = image_id(info, row["key"])
    ids, mask = encode(_tokenizer(spec.tokenizer_uri, spec.storage), [r["caption"] for r in rows], spec.max_text_len)
    return {
        "image": np.stack([r["image"] for r in rows]),
        "input_ids": ids,
        "attention_mask": mask,
        "obj_labels": labels,
        "obj_boxes": boxes,
        "sample_id": np.array([sample_id(r["key"]) for r in rows], dtype=np.int64),
        "image_id": images,
        "unit_pos": np.array([r["unit_pos"] for r in rows], dtype=np.int64),
        "offset": np.array([r["offset"] for r in rows], dtype=np.int64),
    } | (region_columns(rows, spec.max_objects, spec.region_feature_size) if spec.region_feature_size else {})


def build_dataset(items: list[dict[str, Any]], spec: PipelineSpec, *, seed: int | None, epoch: int,
                  ledger: Any = None, read_tasks: int = 0,
                  ray_remote_args: dict[str, Any] | None = None):  # noqa: ANN201 - ray.data.Dataset
    """A lazy Ray Dataset over `items` (`unit_item`s), in item order; `ledger` (a BadSampleLedger
    actor) receives each unit's report."""
    import ray.data

    # Positions are (shard, offset) of the last row consumed: only exact if rows keep their order.
    # Set on the process's context (what datasets are created with) and on this dataset's own.
    current = ray.data.DataContext.get_current()
    current.execution_options.preserve_order = True
    current.enable_progress_bars = False
    remote = dict(ray_remote_args or {})
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(_unit_batches, batch_size=1, batch_format="numpy",
                        fn_kwargs={"spec": spec, "seed": seed, "epoch": epoch, "ledger": ledger},
                        **({"concurrency": read_tasks} if read_tasks else {}), **remote)
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return ds
