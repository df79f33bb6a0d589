"""Labelled examples for zero-shot evaluation and fine-tuning: read, split, subset, batch.

Legend: N examples, C channels, H/W image size, T text tokens, R scene objects.

Fine-tuning sets are small (a label budget of 100 or 1000 examples, or a few thousand), so a
rank reads its labelled samples once into memory and iterates over them in seeded epochs, rather
than streaming them through Ray Data as pretraining does: a data position is then (epoch,
offset), checkpointed like pretraining's. Images are decoded and texts tokenized exactly as the
pretraining pipeline does (jobs/data/reader.py, jobs/data/tokenizer.py), so a pretrained encoder
sees the same inputs.

Splits: `test` = the held-out shards (data.eval); `val` = the last `val_samples` of data.train in
shard order, `train` = the rest of data.train (the label pool); `--labels N` draws a seeded subset
of N training examples. VQA splits by image, then expands each image into its questions, so no
image of the test or val split is seen in training.

Arrays (numpy; `to_batch` stacks rows into the batch contract of jobs/data/batch.py):
    image uint8 [N, C, H, W]   input_ids / attention_mask int64 [N, T]   obj_boxes float32 [N, R, 4]
    obj_labels int64 [N, R] (all -1: the scene's classes are what the tasks ask for)   label int64 [N]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from jobs import storage
from jobs.data.pipeline import PipelineSpec, _scene, _tokenizer
from jobs.data.reader import SHARD_SUFFIXES, decode_image, iter_rows
from jobs.data.tokenizer import encode
from jobs.transfer.tasks import ClassTask, questions

Sample = dict[str, Any]  # key, image uint8 [C,H,W], caption, meta (dict)
Arrays = dict[str, np.ndarray]
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_shards(shards: list[str], spec: PipelineSpec, limit: int | None = None) -> list[Sample]:
    """Decoded samples of `shards` in file order (no shuffle: splits are the same in every run)."""
    out: list[Sample] = []
    for shard in shards:
        for row in iter_rows(shard, spec.read, seed=None):
            meta = json.loads(row["meta"]) if row["meta"] else {}
            out.append({"key": row["key"], "image": row["image"], "caption": row["caption"], "meta": meta})
            if limit is not None and len(out) >= limit:
                return out
    return out


def read_image_folder(folder: str, image_size: int, limit: int | None = None) -> list[Sample]:
    """An ImageFolder layout (folder/<class>/<image>): meta = {"label": <class folder name>}, sorted."""
    out: list[Sample] = []
    for label in sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))):
        for name in sorted(os.listdir(os.path.join(folder, label))):
            if not name.lower().endswith(_IMAGE_SUFFIXES):
                continue
            with open(os.path.join(folder, label, name), "rb") as f:
                image = decode_image(f.read(), image_size)
            out.append({"key": f"{label}/{name}", "image": image, "caption": "", "meta": {"label": label}})
            if limit is not None and len(out) >= limit:
                return out
    return out


def is_image_folder(source: str) -> bool:
    return (not storage.is_remote(source) and os.path.isdir(source)
            and any(os.path.isdir(os.path.join(source, d)) for d in os.listdir(source))
            and not any(n.endswith(SHARD_SUFFIXES) for n in os.listdir(source)))


def read_source(source: str | list[str], spec: PipelineSpec, limit: int | None = None) -> list[Sample]:
    """Shards (any form storage.expand_shards takes) or a labelled image folder."""
    if isinstance(source, str) and is_image_folder(source):
        return read_image_folder(source, spec.image_size, limit)
    return read_shards(storage.expand_shards(source, spec.storage, suffixes=SHARD_SUFFIXES), spec, limit)


# -- arrays ---------------------------------------------------------------------------------------

def _tokens(texts: list[str], spec: PipelineSpec) -> tuple[np.ndarray, np.ndarray]:
    return encode(_tokenizer(spec.tokenizer_uri, spec.storage), texts, spec.max_text_len)


def _visual(samples: list[Sample], spec: PipelineSpec) -> Arrays:
    R = spec.max_objects
    boxes = np.zeros((len(samples), R, 4), dtype=np.float32)
    for i, s in enumerate(samples):
        boxes[i] = _scene(s["meta"], R, {}, "shape")[1]  # boxes only: labels are the task's
    image = (np.stack([s["image"] for s in samples]) if samples
             else np.zeros((0, 3, spec.image_size, spec.image_size), dtype=np.uint8))
    return {"image": image, "obj_boxes": boxes, "obj_labels": np.full((len(samples), R), -1, dtype=np.int64)}


def classification_arrays(samples: list[Sample], task: ClassTask, spec: PipelineSpec) -> Arrays:
    """Samples with a label for `task`, an empty text each ([CLS] [SEP]: the image alone is classified)."""
    labelled = [(s, y) for s in samples if (y := task.label(s["meta"])) is not None]
    kept = [s for s, _ in labelled]
    ids, mask = _tokens([""] * len(kept), spec)
    return {**_visual(kept, spec), "input_ids": ids, "attention_mask": mask,
            "label": np.array([y for _, y in labelled], dtype=np.int64)}


def vqa_arrays(samples: list[Sample], spec: PipelineSpec, seed: int = 0) -> Arrays:
    """One row per generated question (jobs/transfer/tasks.py); `qtype` indexes QUESTION_TYPES."""
    from jobs.transfer.tasks import QUESTION_TYPES

    rows = [(s, q) for s in samples for q in questions(s["meta"], s["key"], seed)]
    ids, mask = _tokens([q[1] for _, q in rows], spec)
    return {**_visual([s for s, _ in rows], spec), "input_ids": ids, "attention_mask": mask,
            "label": np.array([q[2] for _, q in rows], dtype=np.int64),
            "qtype": np.array([QUESTION_TYPES.index(q[0]) for _, q in rows], dtype=np.int64)}


def retrieval_arrays(samples: list[Sample], spec: PipelineSpec) -> Arrays:
    """Image-caption pairs."""
    ids, mask = _tokens([s["caption"] for s in samples], spec)
    return {**_visual(samples, spec), "input_ids": ids, "attention_mask": mask}


def size(arrays: Arrays) -> int:
    return len(arrays["image"])


def take(arrays: Arrays, index: np.ndarray) -> Arrays:
    return {k: v[index] for k, v in arrays.items()}


def subset(arrays: Arrays, labels: int | None, seed: int) -> Arrays:
    """`labels` examples drawn without replacement by `seed` (all of them when None or more than there are)."""
    n = size(arrays)
    if labels is None or labels >= n:
        return arrays
    return take(arrays, np.sort(np.random.default_rng(seed).permutation(n)[:labels]))


def rank_share(arrays: Arrays, rank: int, world: int) -> Arrays:
    """Every world-th row from `rank`, cut so all ranks hold the same count (equal steps, MoE all-to-all)."""
    per = size(arrays) // world
    return take(arrays, np.arange(rank, world * per, world))


def to_batch(arrays: Arrays, index: np.ndarray) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v[index])) for k, v in arrays.items()}


def batches(arrays: Arrays, batch_size: int) -> Iterator[dict[str, Any]]:
    """In order, the last batch short (evaluation)."""
    n = size(arrays)
    for start in range(0, n, batch_size):
        yield to_batch(arrays, np.arange(start, min(start + batch_size, n)))


class EpochSampler:
    """Endless seeded epochs of a rank's training rows, full batches only; position = (epoch, offset).

    The permutation of epoch e is drawn from (seed, e): the order varies with the seed (and so with
    the sweep's seeds), and a resumed run continues with the batch it would have drawn."""

    def __init__(self, arrays: Arrays, batch_size: int, seed: int, epoch: int = 0, offset: int = 0) -> None:
        if size(arrays) < batch_size:
            raise ValueError(f"{size(arrays)} training examples on this rank, fewer than train.batch_size="
                             f"{batch_size}; lower train.batch_size or raise finetune.labels")
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.epoch, self.offset = epoch, offset

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(size(self.arrays))

    def next(self) -> dict[str, Any]:
        if self.offset + self.batch_size > size(self.arrays):
            self.epoch, self.offset = self.epoch + 1, 0
        index = self._order()[self.offset: self.offset + self.batch_size]
        self.offset += self.batch_size
        return to_batch(self.arrays, index)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}
