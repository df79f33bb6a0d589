"""Image-text contrastive learning: CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3).

Shapes: B batch, E joint embedding dim.

Minimal and in-batch: the B matched pairs of the (clean) batch are the positives, the other B-1
captions/images of the same batch the negatives. Gathering negatives across workers is a later
extension of this objective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.config import TextSpec
from models.objectives.base import Objective, encoder_inputs, require


def clean_view(batch: Mapping[str, Tensor], text: TextSpec, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The batch as it is: matched pairs, nothing masked."""
    return encoder_inputs(batch)


class ImageTextContrastive(Objective):
    """loss = (CE(s * I T^T, arange) + CE(s * T I^T, arange)) / 2 on L2-normalised embeddings, s the
    encoder's learnable `logit_scale`. Metric `itc_acc`: image-to-text top-1 within the batch."""

    name: ClassVar[str] = "itc"
    view: ClassVar[str] = "clean"
    requires: ClassVar[frozenset[str]] = frozenset({"text_embed", "image_embed", "logit_scale"})

    def forward(
        self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        image_BE = require(outputs, "image_embed").float()
        text_BE = require(outputs, "text_embed").float()
        logits_BB = require(outputs, "logit_scale").float() * image_BE @ text_BE.T  # row i: image i vs texts
        target_B = torch.arange(logits_BB.shape[0], device=logits_BB.device)
        loss = (F.cross_entropy(logits_BB, target_B) + F.cross_entropy(logits_BB.T, target_B)) / 2
        acc = (logits_BB.argmax(dim=1) == target_B).float().mean()
        return {"itc": loss}, {"itc_acc": acc.detach()}
