"""The Ray Data input pipeline of one rank: its shards -> decoded samples -> model-ready rows.

    [{shard, shard_pos, start}] ──flat_map──▶ reader.iter_rows (one task reads one shard, decodes images)
                                ──map_batches─▶ tokenize + pad captions, scene boxes/labels  (CPU tasks)
                                ──iter_torch_batches (order preserved) ─▶ the rank's train loop

Each rank streams its own deterministic sequence (see `jobs.data.stream`), so a position in it is
(epoch, shard_pos, offset) and a resumed run continues exactly where it stopped. Images travel as
uint8 (4x smaller in the object store than float32); `jobs.data.batch` normalises them on the
worker.
"""

from __future__ import annotations

import json
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


def _rows(item: dict[str, Any], spec: PipelineSpec, seed: int | None, epoch: int,
          stride: tuple[int, int] | None, ledger: Any) -> Iterator[dict[str, Any]]:
    def report(r: ShardReport) -> None:
        if ledger is not None:
            ledger.add.remote(r)

    for row in iter_rows(item["shard"], spec.read, seed=shard_seed(seed, epoch, item["shard"]),
                         start=item["start"], on_report=report):
        if stride is not None and row["offset"] % stride[1] != stride[0]:
            continue
        row["shard_pos"] = item["shard_pos"]
        yield row


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


def _preprocess(batch: dict[str, np.ndarray], spec: PipelineSpec) -> dict[str, np.ndarray]:
    n = len(batch["key"])
    labels = np.full((n, spec.max_objects), -1, dtype=np.int64)
    boxes = np.zeros((n, spec.max_objects, 4), dtype=np.float32)
    for i in range(n):
        labels[i], boxes[i] = _scene(batch["meta"][i], spec.max_objects)
    ids, mask = encode(_tokenizer(spec.tokenizer_uri, spec.storage), list(batch["caption"]), spec.max_text_len)
    return {
        "image": np.stack(list(batch["image"])) if batch["image"].dtype == object else batch["image"],
        "input_ids": ids,
        "attention_mask": mask,
        "obj_labels": labels,
        "obj_boxes": boxes,
        "sample_id": np.array([sample_id(k) for k in batch["key"]], dtype=np.int64),
        "shard_pos": np.asarray(batch["shard_pos"], dtype=np.int64),
        "offset": np.asarray(batch["offset"], dtype=np.int64),
    }


def build_dataset(items: list[dict[str, Any]], spec: PipelineSpec, *, seed: int | None, epoch: int,
                  stride: tuple[int, int] | None = None, ledger: Any = None, read_tasks: int = 0,
                  ray_remote_args: dict[str, Any] | None = None):  # noqa: ANN201 - ray.data.Dataset
    """A lazy Ray Dataset over `items` ({shard, shard_pos, start}), in item order.

    `stride=(rank, world)` keeps every world-th sample of each shard (when there are fewer shards
    than ranks); `ledger` (a BadSampleLedger actor) receives each shard's report.
    """
    import ray.data

    remote = dict(ray_remote_args or {})
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(_rows, fn_kwargs={"spec": spec, "seed": seed, "epoch": epoch, "stride": stride,
                                       "ledger": ledger},
                     **({"concurrency": read_tasks} if read_tasks else {}), **remote)
    return ds.map_batches(_preprocess, fn_kwargs={"spec": spec}, batch_size=64, batch_format="numpy", **remote)
