"""The batch contract: what the pipeline delivers and what the model consumes.

Legend: B batch, C channels (3), H/W image size, T text tokens, R scene objects.

Pipeline rows (numpy, per sample; `iter_torch_batches` stacks them):
    image           uint8   [B, C, H, W]   RGB, resized to data.image_size
    input_ids       int64   [B, T]         [CLS] caption [SEP] [PAD]...
    attention_mask  int64   [B, T]         1 = real token
    obj_labels      int64   [B, R]         scene object class (index into the dataset's object
                                           vocabulary, jobs.data.datasets), -1 = none / unknown
    obj_boxes       float32 [B, R, 4]      normalised x0, y0, x1, y1
    sample_id       int64   [B]            stable id of the sample key (pipeline.sample_id)
    image_id        int64   [B]            which image the caption describes (the json's image_id,
                                           else the sample): the retrieval ground truth

Only when the model reads precomputed (BUTD-style) region features (`model.region_source:
precomputed`; KEY.npz or the json, `jobs.data.regions`), F = model.region_feature_size:
    region_feats    float32 [B, R, F]      detector features per region, zeros = no region
    region_boxes    float32 [B, R, 4]      normalised x0, y0, x1, y1 (zero box = no region)
    region_labels   int64   [B, R]         detector class per region, -1 = none

Text is right-padded: the encoders' causal attention relies on it (models/encoders/layers.py).

`to_model_batch` turns a stacked batch into the model's input: the same function serves training,
evaluation and the benchmarks, so normalisation can never drift between them. It adds one key,
computed from the host copy before the transfer (no device sync):
    text_full       bool    []  (CPU)      no text position of the batch is padding
                                           (models.objectives.base.TEXT_FULL)
On a GPU the host tensors should be pinned (the streams ask Ray Data for pinned batches), so that the
copies are asynchronous (`non_blocking`) and overlap the previous step's kernels.
"""

from __future__ import annotations

import torch

from models.objectives.base import TEXT_FULL

# CLIP/ViLT-style normalisation to roughly [-1, 1]; the shapes world has no dataset statistics
# worth estimating, and the mean/std only need to be the same everywhere.
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def to_model_batch(batch: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != TEXT_FULL}
    mask = batch.get("attention_mask")
    if TEXT_FULL in batch:
        out[TEXT_FULL] = batch[TEXT_FULL]
    elif mask is not None and mask.device.type == "cpu":
        out[TEXT_FULL] = mask.all()
    image = out["image"]
    if image.dtype == torch.uint8:
        image = (image.to(dtype) / 255.0 - IMAGE_MEAN) / IMAGE_STD
    out["image"] = image.to(dtype)
    return out
