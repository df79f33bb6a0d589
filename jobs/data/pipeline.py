"""The Ray Data input pipeline of one rank: its shards -> decoded samples -> model-ready rows.

    [{shard, shard_pos, start}] ──map_batches (one CPU task per shard)──▶ read (reader.iter_rows),
                                decode + resize images, tokenize + pad captions, scene boxes/labels,
                                yielded as columnar batches
                                ──iter_torch_batches (order preserved) ─▶ the rank's train loop

Each rank streams its own deterministic sequence (see `jobs.data.stream`), so a position in it is
(epoch, shard_pos, offset) and a resumed run continues exactly where it stopped. Images travel as
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

from jobs.data.reader import ReadSpec, ShardReport, iter_rows
from jobs.data.synth import SHAPES
from jobs.data.tokenizer import encode, load_tokenizer
from jobs.storage import StorageOptions

log = logging.getLogger(__name__)

# Scene classes of the shapes world; real shards without a scene get -1 labels.
_SHAPE_INDEX = {name: i for i, name in enumerate(SHAPES)}


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

    @property
    def read(self) -> ReadSpec:
        return ReadSpec(image_size=self.image_size, storage=self.storage,
                        image_column=self.image_column, caption_column=self.caption_column)


def sample_id(key: str) -> int:
    """A stable 63-bit id for a sample key (for tracking which samples a rank consumed)."""
    return (zlib.crc32(key.encode()) << 31) ^ zlib.adler32(key.encode())


def shard_seed(seed: int | None, epoch: int, shard: str) -> int | None:
    """The within-shard permutation seed: stable across processes (no Python hash randomisation)."""
    return None if seed is None else zlib.crc32(f"{seed}:{epoch}:{shard}".encode())


_ROWS_PER_BATCH = 256


def _shard_batches(items: dict[str, np.ndarray], spec: PipelineSpec, seed: int | None, epoch: int,
                   stride: tuple[int, int] | None, ledger: Any) -> Iterator[dict[str, np.ndarray]]:
    """One task per shard: read, decode, tokenize, and yield columnar batches of model-ready rows.

    Columnar output (one numpy array per column) instead of a dict per row: Ray Data then moves
    whole arrays, not Python objects, and decode + tokenize happen in one task with no second
    hop through the object store.
    """
    def report(r: ShardReport) -> None:
        if ledger is not None:
            ledger.add.remote(r)

    for shard, shard_pos, start in zip(items["shard"], items["shard_pos"], items["start"], strict=True):
        rows: list[dict[str, Any]] = []
        for row in iter_rows(str(shard), spec.read, seed=shard_seed(seed, epoch, str(shard)), start=int(start),
                             on_report=report):
            if stride is not None and row["offset"] % stride[1] != stride[0]:
                continue
            row["shard_pos"] = int(shard_pos)
            rows.append(row)
            if len(rows) == _ROWS_PER_BATCH:
                yield _columns(rows, spec)
                rows = []
        if rows:
            yield _columns(rows, spec)


@lru_cache(maxsize=4)
def _tokenizer(uri: str, storage: StorageOptions):  # noqa: ANN202 - tokenizers.Tokenizer
    return load_tokenizer(uri, storage)


def _scene(meta: str, max_objects: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.full((max_objects,), -1, dtype=np.int64)
    boxes = np.zeros((max_objects, 4), dtype=np.float32)
    if not meta or max_objects == 0:
        return labels, boxes
    try:
        info = json.loads(meta)
    except json.JSONDecodeError:
        return labels, boxes
    scene = info.get("scene") or {}
    w = float(info.get("width") or 1.0)
    h = float(info.get("height") or 1.0)
    for i, obj in enumerate((scene.get("objects") or [])[:max_objects]):
        labels[i] = _SHAPE_INDEX.get(obj.get("shape", ""), -1)
        x0, y0, x1, y1 = obj.get("bbox", (0, 0, 0, 0))
        boxes[i] = (x0 / w, y0 / h, x1 / w, y1 / h)
    return labels, boxes


def precomputed_regions(meta: str, max_objects: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """BUTD-style precomputed region features of a sample, or None when it has none.

    Read from the sample's metadata (the tar's KEY.json, or a Parquet shard's extra columns):
    `features` [N, F], `boxes` [N, 4] x0 y0 x1 y1 (pixels of an image_w x image_h image, or already
    normalised), optional `labels` [N] (detector classes) and `image_w`/`image_h` (else
    `width`/`height`). Returns (feats [R, F], boxes [R, 4] normalised, labels [R], -1 = none) with
    R = max_objects, truncated or zero-padded (a zero box is not a region).
    """
    if not meta or '"features"' not in meta:
        return None
    try:
        info = json.loads(meta)
        feats = np.asarray(info["features"], dtype=np.float32)
        n = feats.shape[0]
        boxes = np.asarray(info.get("boxes", np.zeros((n, 4))), dtype=np.float32).reshape(n, 4)
        labels = np.asarray(info.get("labels", np.full(n, -1)), dtype=np.int64).reshape(n)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring malformed region features (%s)", exc)
        return None
    if feats.ndim != 2:
        return None
    if boxes.size and boxes.max() > 1.0:
        w = float(info.get("image_w") or info.get("width") or 1.0)
        h = float(info.get("image_h") or info.get("height") or 1.0)
        boxes = boxes / np.array([w, h, w, h], dtype=np.float32)
    R = min(n, max_objects)
    out_f = np.zeros((max_objects, feats.shape[1]), dtype=np.float32)
    out_b = np.zeros((max_objects, 4), dtype=np.float32)
    out_l = np.full((max_objects,), -1, dtype=np.int64)
    out_f[:R], out_b[:R], out_l[:R] = feats[:R], np.clip(boxes[:R], 0.0, 1.0), labels[:R]
    return out_f, out_b, out_l


def _region_columns(metas: list[str], max_objects: int) -> dict[str, np.ndarray]:
    """`region_feats`/`region_boxes`/`region_labels` when any sample of the batch has precomputed
    features (rows without them get no real region); {} otherwise. A dataset should have them for
    all samples or none: Ray Data cannot stack batches with different columns."""
    found = [precomputed_regions(m, max_objects) for m in metas]
    first = next((r for r in found if r is not None), None)
    if first is None:
        return {}
    n, F = len(metas), first[0].shape[1]
    cols = {"region_feats": np.zeros((n, max_objects, F), dtype=np.float32),
            "region_boxes": np.zeros((n, max_objects, 4), dtype=np.float32),
            "region_labels": np.full((n, max_objects), -1, dtype=np.int64)}
    for i, r in enumerate(found):
        if r is not None and r[0].shape[1] == F:
            cols["region_feats"][i], cols["region_boxes"][i], cols["region_labels"][i] = r
    return cols


def _columns(rows: list[dict[str, Any]], spec: PipelineSpec) -> dict[str, np.ndarray]:
    n = len(rows)
    labels = np.full((n, spec.max_objects), -1, dtype=np.int64)
    boxes = np.zeros((n, spec.max_objects, 4), dtype=np.float32)
    for i, row in enumerate(rows):
        labels[i], boxes[i] = _scene(row["meta"], spec.max_objects)
    ids, mask = encode(_tokenizer(spec.tokenizer_uri, spec.storage), [r["caption"] for r in rows], spec.max_text_len)
    return {
        "image": np.stack([r["image"] for r in rows]),
        "input_ids": ids,
        "attention_mask": mask,
        "obj_labels": labels,
        "obj_boxes": boxes,
        "sample_id": np.array([sample_id(r["key"]) for r in rows], dtype=np.int64),
        "shard_pos": np.array([r["shard_pos"] for r in rows], dtype=np.int64),
        "offset": np.array([r["offset"] for r in rows], dtype=np.int64),
    }


def build_dataset(items: list[dict[str, Any]], spec: PipelineSpec, *, seed: int | None, epoch: int,
                  stride: tuple[int, int] | None = None, ledger: Any = None, read_tasks: int = 0,
                  ray_remote_args: dict[str, Any] | None = None):  # noqa: ANN201 - ray.data.Dataset
    """A lazy Ray Dataset over `items` ({shard, shard_pos, start}), in item order.

    `stride=(rank, world)` keeps every world-th sample of each shard (when there are fewer shards
    than ranks); `ledger` (a BadSampleLedger actor) receives each shard's report.
    """
    import ray.data

    # Positions are (shard, offset) of the last row consumed: only exact if rows keep their order.
    # Set on the process's context (what datasets are created with) and on this dataset's own.
    current = ray.data.DataContext.get_current()
    current.execution_options.preserve_order = True
    current.enable_progress_bars = False
    remote = dict(ray_remote_args or {})
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(_shard_batches, batch_size=1, batch_format="numpy",
                        fn_kwargs={"spec": spec, "seed": seed, "epoch": epoch, "stride": stride, "ledger": ledger},
                        **({"concurrency": read_tasks} if read_tasks else {}), **remote)
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return ds
