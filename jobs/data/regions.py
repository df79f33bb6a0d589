"""Precomputed (BUTD-style) region features of a sample -> the `region_*` batch columns.

Legend: N regions stored for the sample, R = data.max_objects regions kept, F feature size.

ViLBERT, LXMERT, UNITER and Oscar read Faster R-CNN features extracted once by the bottom-up
attention detector (Anderson et al. 2018, trained on Visual Genome's 1600 object classes). The
extractors store them in a few layouts, all read here:

- `KEY.npz` beside the image in the tar shard: py-bottom-up-attention's `x` / `bbox` /
  `image_w` / `image_h`, UNITER's `features` / `norm_bb` / `soft_labels`, or plain
  `features` / `boxes` / `labels` (LXMERT's TSV fields `objects_id`, `img_w`, `img_h` too).
  Loaded with `allow_pickle=False`: a pickled member (py-bottom-up-attention's `info` dict) is
  never executed, so its `objects_id` is not read (put the class ids in a plain array instead).
- the sample's metadata (KEY.json, or a Parquet shard's extra columns): the same key names.

Boxes are x0 y0 x1 y1, in pixels of an image_w x image_h image or already normalised to [0, 1].
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Each field's names in the extractors' outputs, first match wins.
FEATURE_KEYS = ("features", "x", "feats", "feat", "roi_features")
BOX_KEYS = ("boxes", "bbox", "bboxes", "norm_bb")
LABEL_KEYS = ("labels", "class_ids", "objects_id", "objects", "cls")
SOFT_LABEL_KEYS = ("soft_labels",)  # UNITER: [N, 1 + classes] detector scores, background first
WIDTH_KEYS = ("image_w", "img_w", "width")
HEIGHT_KEYS = ("image_h", "img_h", "height")

Regions = tuple[np.ndarray, np.ndarray, np.ndarray]  # feats [R, F], boxes [R, 4], labels [R]


def _first(source: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((source[k] for k in keys if k in source), None)


def _npz_fields(data: bytes) -> dict[str, Any]:
    """The npz's arrays by name; members that need unpickling are skipped, never executed."""
    out: dict[str, Any] = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        for name in npz.files:
            try:
                out[name] = npz[name]
            except ValueError:  # an object array (pickled): not loaded
                continue
    return out


def _fields(meta: str, npz: bytes | None) -> dict[str, Any] | None:
    """The region fields of a sample: its npz when it has one, else its metadata json."""
    if npz is not None:
        try:
            fields = _npz_fields(npz)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            log.warning("ignoring unreadable region npz (%s)", exc)
            return None
        if meta and not any(k in fields for k in (*WIDTH_KEYS, *HEIGHT_KEYS)):
            try:  # the image size may only be in the json (img2dataset's width/height)
                info = json.loads(meta)
                fields |= {k: info[k] for k in (*WIDTH_KEYS, *HEIGHT_KEYS) if k in info}
            except json.JSONDecodeError:
                pass
        return fields if _first(fields, FEATURE_KEYS) is not None else None
    if not meta or not any(f'"{k}"' in meta for k in FEATURE_KEYS):
        return None
    try:
        info = json.loads(meta)
    except json.JSONDecodeError as exc:
        log.warning("ignoring malformed region features (%s)", exc)
        return None
    return info if isinstance(info, dict) and _first(info, FEATURE_KEYS) is not None else None


def precomputed_regions(meta: str, max_objects: int, npz: bytes | None = None) -> Regions | None:
    """(feats [R, F], boxes [R, 4] normalised, labels [R], -1 = none) with R = max_objects, truncated
    or zero-padded (a zero box is not a region), or None when the sample has no region features."""
    info = _fields(meta, npz)
    if info is None:
        return None
    try:
        feats = np.asarray(_first(info, FEATURE_KEYS), dtype=np.float32)
        n = feats.shape[0]
        raw_boxes = _first(info, BOX_KEYS)
        boxes = np.asarray(np.zeros((n, 4)) if raw_boxes is None else raw_boxes, dtype=np.float32)[:, :4]
        raw_labels, soft = _first(info, LABEL_KEYS), _first(info, SOFT_LABEL_KEYS)
        if raw_labels is None and soft is not None:  # UNITER: argmax over the classes, background dropped
            raw_labels = np.asarray(soft, dtype=np.float32)[:, 1:].argmax(1)
        labels = np.asarray(np.full(n, -1) if raw_labels is None else raw_labels, dtype=np.int64).reshape(n)
        boxes = boxes.reshape(n, 4)
    except (TypeError, ValueError, IndexError) as exc:
        log.warning("ignoring malformed region features (%s)", exc)
        return None
    if feats.ndim != 2:
        return None
    if boxes.size and boxes.max() > 1.0:
        w = float(np.asarray(_first(info, WIDTH_KEYS) or 1.0))
        h = float(np.asarray(_first(info, HEIGHT_KEYS) or 1.0))
        boxes = boxes / np.array([w, h, w, h], dtype=np.float32)
    R = min(n, max_objects)
    out_f = np.zeros((max_objects, feats.shape[1]), dtype=np.float32)
    out_b = np.zeros((max_objects, 4), dtype=np.float32)
    out_l = np.full((max_objects,), -1, dtype=np.int64)
    out_f[:R], out_b[:R], out_l[:R] = feats[:R], np.clip(boxes[:R], 0.0, 1.0), labels[:R]
    return out_f, out_b, out_l


def region_columns(rows: Sequence[Mapping[str, Any]], max_objects: int, feature_size: int) -> dict[str, np.ndarray]:
    """`region_feats` [B, R, F] / `region_boxes` [B, R, 4] / `region_labels` [B, R] of a batch of rows
    (each with `meta` and `npz`). Every batch of a run has them, with F = model.region_feature_size,
    so Ray Data can stack any two; a row without features (or with another F) gets no real region
    (only the whole-image token, the mean of none) and is named in the log."""
    B = len(rows)
    cols = {"region_feats": np.zeros((B, max_objects, feature_size), dtype=np.float32),
            "region_boxes": np.zeros((B, max_objects, 4), dtype=np.float32),
            "region_labels": np.full((B, max_objects), -1, dtype=np.int64)}
    for i, row in enumerate(rows):
        found = precomputed_regions(row.get("meta", ""), max_objects, row.get("npz"))
        if found is None or found[0].shape[1] != feature_size:
            why = "none" if found is None else f"{found[0].shape[1]} features, not {feature_size}"
            log.warning("sample %s has no usable region features (%s)", row.get("key", "?"), why)
            continue
        cols["region_feats"][i], cols["region_boxes"][i], cols["region_labels"][i] = found
    return cols


def npz_bytes(features: np.ndarray, boxes: np.ndarray, labels: np.ndarray | None = None,
              image_w: int | None = None, image_h: int | None = None) -> bytes:
    """A KEY.npz in the plain layout (`features`, `boxes`, `labels`, `image_w`, `image_h`)."""
    arrays: dict[str, np.ndarray] = {"features": np.asarray(features, np.float32), "boxes": np.asarray(boxes, np.float32)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int64)
    if image_w is not None and image_h is not None:
        arrays["image_w"], arrays["image_h"] = np.asarray(image_w), np.asarray(image_h)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def feature_size_read(model: Any) -> int:
    """F of the precomputed region features a model (a models.config.ModelConfig) reads from the
    shards; 0 when it computes its visual tokens from pixels."""
    from models.blocks import resolve

    blocks = resolve(model)
    return blocks.region_feature_size if blocks.visual == "region" and blocks.region_source == "precomputed" else 0
