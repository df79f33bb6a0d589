"""Masked region modelling (MRM): predict what the masked visual tokens were, from the text and the rest.

Shapes: B batch, T text tokens, P visual tokens, D model dim, F visual feature size, C object
classes, N masked visual tokens in the batch.

Recipe (UNITER, Chen et al. 2020, §3.1; LXMERT §3.1.2; ImageBERT §4.2):
- 15 % of the visual tokens are masked: their input features are zeroed (the encoder zeroes them
  from `visual_mask`), a sample with no token drawn gets one (UNITER's `_get_img_mask`: every
  sample contributes).
- Conditional masking (UNITER §3.1, ImageBERT §4.2): one modality at a time. This view masks
  regions and leaves the caption intact, MLM's view masks words and leaves the image intact, so a
  masked region is always predicted from the full caption; masked losses are computed on the
  batch's own (matched) pairs only, never on ITM's swapped ones.
- UNIMO's overlap rule (Li et al. 2021, §3.1): a region overlapping a masked one by IoU > 0.3 is
  masked as well, otherwise its near-duplicate features leak the answer. It applies to object
  regions; the whole-image region (token 0 of region inputs) neither triggers nor receives it
  (its IoU with an object is the object's area), and grid cells (patches) never overlap.

Heads (each on the masked, real tokens only):
- `mrfr` (UNITER MRFR, LXMERT RoI-feature regression, ImageBERT MRFR): Linear(D, F) regresses the
  unmasked input feature, L2 (sum over F, mean over the masked tokens); target detached.
- `mrc` (UNITER MRC: cross-entropy to the detector's argmax class) and `moc` (Unicoder-VL /
  ImageBERT masked object classification, LXMERT's detected-label classification): cross-entropy
  to the token's object class; tokens without a class (-1) are skipped. The scene json's class is
  the label both ways (the shapes world has no detector distribution to argmax).
- `mrc_kl` (UNITER MRC-kl, ViLBERT's masked multimodal modelling): KL(target || softmax(logits))
  to a soft label distribution. Without a detector the target is the scene class, label-smoothed
  (0.9 on the class, the rest spread uniformly), standing in for the detector's class scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import TextSpec
from models.objectives.base import (
    CLEAN_FEATS,
    NUM_VISUAL_TOKENS,
    VISUAL_MASK,
    Objective,
    ObjectiveContext,
    cross_entropy_and_accuracy,
    encoder_inputs,
    require,
)
from models.objectives.sampling import uniform

MASK_PROB = 0.15
OVERLAP_IOU = 0.3  # UNIMO's threshold
SOFT_LABEL_MASS = 0.9  # mrc_kl: probability on the scene class in the stand-in soft label


def box_iou(a_BP4: Tensor, b_BQ4: Tensor) -> Tensor:
    """[B, P, Q] IoU of xyxy boxes."""
    lt = torch.maximum(a_BP4[:, :, None, :2], b_BQ4[:, None, :, :2])
    rb = torch.minimum(a_BP4[:, :, None, 2:], b_BQ4[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a_BP4[..., 2:] - a_BP4[..., :2]).clamp(min=0).prod(-1)
    area_b = (b_BQ4[..., 2:] - b_BQ4[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter).clamp(min=1e-9)


def overlap_closure(masked_BP: Tensor, boxes_BP4: Tensor, real_BP: Tensor, threshold: float = OVERLAP_IOU) -> Tensor:
    """UNIMO's rule: also mask every real token whose box overlaps a masked one by IoU > threshold
    (one pass: overlap with an originally masked region, as UNIMO applies it)."""
    iou_BPP = box_iou(boxes_BP4.float(), boxes_BP4.float())
    hit_BP = ((iou_BPP > threshold) & masked_BP[:, None, :] & real_BP[:, None, :]).any(-1)
    return masked_BP | (hit_BP & real_BP)


def _region_layout(batch: Mapping[str, Tensor], P: int) -> tuple[Tensor, Tensor] | None:
    """(boxes [B,P,4], object token [B,P] bool) when the tokens are [whole image, regions]; else None."""
    for boxes_key, labels_key in (("region_boxes", "region_labels"), ("obj_boxes", "obj_labels")):
        if boxes_key in batch and batch[boxes_key].shape[1] + 1 == P:
            boxes_BR4 = batch[boxes_key]
            B = boxes_BR4.shape[0]
            full_B14 = boxes_BR4.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(B, 1, 4)
            real_BR = batch[labels_key] >= 0 if labels_key in batch else torch.ones_like(boxes_BR4[..., 0], dtype=torch.bool)
            whole_B1 = torch.zeros(B, 1, dtype=torch.bool, device=boxes_BR4.device)
            return torch.cat([full_B14, boxes_BR4], 1), torch.cat([whole_B1, real_BR.bool()], 1)
    return None


def mask_regions(
    batch: Mapping[str, Tensor], P: int, prob: float = MASK_PROB, generator: torch.Generator | None = None
) -> Tensor:
    """bool [B, P]: the visual tokens to mask (15 %, >= 1 per sample, UNIMO's overlap closure)."""
    B, device = batch["input_ids"].shape[0], batch["input_ids"].device
    layout = _region_layout(batch, P)
    eligible_BP = torch.ones(B, P, dtype=torch.bool, device=device) if layout is None else layout[1]
    masked_BP = eligible_BP & (uniform((B, P), device, generator) < prob)
    # A sample with no token drawn masks one eligible token picked uniformly (UNITER).
    score_BP = torch.where(eligible_BP, uniform((B, P), device, generator), torch.full((B, P), -1.0, device=device))
    forced_BP = torch.zeros_like(masked_BP).scatter_(1, score_BP.argmax(1, keepdim=True), True) & eligible_BP
    masked_BP = torch.where(masked_BP.any(1, keepdim=True), masked_BP, forced_BP)
    if layout is not None:
        masked_BP = overlap_closure(masked_BP, layout[0], layout[1])
    return masked_BP


def masked_regions_view(
    batch: Mapping[str, Tensor], text: TextSpec, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Matched pairs, caption intact (conditional masking), `visual_mask` [B,P] from `mask_regions`."""
    view = encoder_inputs(batch)
    view[VISUAL_MASK] = mask_regions(batch, int(batch[NUM_VISUAL_TOKENS]), generator=generator)
    return view


def _selected(outputs: Mapping[str, Tensor | None]) -> Tensor:
    """bool [B, P]: tokens that are real and were masked."""
    return require(outputs, "image_masked") & require(outputs, "image_mask")


def soft_kl(logits_NC: Tensor, target_NC: Tensor) -> Tensor:
    """Mean over N of KL(target || softmax(logits)); 0 when they are the same distribution."""
    if logits_NC.shape[0] == 0:
        return logits_NC.sum() * 0.0
    return F.kl_div(F.log_softmax(logits_NC.float(), -1), target_NC.float(), reduction="batchmean")


class _RegionHead(nn.Module):
    """UNITER's region heads: Linear + GELU + LayerNorm + Linear(D, out)."""

    def __init__(self, hidden_size: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size),
                                 nn.Linear(hidden_size, out))

    def forward(self, h_ND: Tensor) -> Tensor:
        return self.net(h_ND)


class MaskedRegionFeatureRegression(Objective):
    name: ClassVar[str] = "mrfr"
    view: ClassVar[str] = "masked_regions"
    requires: ClassVar[frozenset[str]] = frozenset({"image_hidden", "image_feats", "image_mask", "cross_modal"})

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        if ctx.visual_feature_size <= 0:
            raise ValueError("objective 'mrfr' needs a visual input with features (visual_feature_size > 0)")
        self.head = _RegionHead(ctx.hidden_size, ctx.visual_feature_size)

    def forward(
        self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        sel_BP = _selected(outputs)
        target = outputs.get(CLEAN_FEATS)
        target_NF = (require(outputs, "image_feats") if target is None else target)[sel_BP].detach().float()
        pred_NF = self.head(require(outputs, "image_hidden")[sel_BP]).float()
        loss = ((pred_NF - target_NF) ** 2).sum(-1).sum() / sel_BP.sum().clamp(min=1)
        return {"mrfr": loss}, {"mrfr_masked": sel_BP.float().sum().detach() / sel_BP.shape[0]}


class _RegionClassification(Objective):
    view: ClassVar[str] = "masked_regions"
    requires: ClassVar[frozenset[str]] = frozenset({"image_hidden", "image_labels", "image_mask", "cross_modal"})

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.num_classes = ctx.object_classes
        self.head = _RegionHead(ctx.hidden_size, ctx.object_classes)

    def forward(
        self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        labels_BP = require(outputs, "image_labels")
        sel_BP = _selected(outputs) & (labels_BP >= 0)
        logits_NC = self.head(require(outputs, "image_hidden")[sel_BP])
        return self.loss(logits_NC, labels_BP[sel_BP])

    def loss(self, logits_NC: Tensor, labels_N: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        loss, acc = cross_entropy_and_accuracy(logits_NC, labels_N)
        return {self.name: loss}, {f"{self.name}_acc": acc}


class MaskedRegionClassification(_RegionClassification):
    name: ClassVar[str] = "mrc"


class MaskedObjectClassification(_RegionClassification):
    name: ClassVar[str] = "moc"


class MaskedRegionClassificationKL(_RegionClassification):
    name: ClassVar[str] = "mrc_kl"

    def loss(self, logits_NC: Tensor, labels_N: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        C = self.num_classes
        target_NC = torch.full_like(logits_NC, (1 - SOFT_LABEL_MASS) / max(C - 1, 1), dtype=torch.float32)
        target_NC.scatter_(1, labels_N[:, None], SOFT_LABEL_MASS if C > 1 else 1.0)
        acc = ((logits_NC.argmax(-1) == labels_N).float().sum() / max(labels_N.numel(), 1)).detach()
        return {"mrc_kl": soft_kl(logits_NC, target_NC)}, {"mrc_kl_acc": acc}

