"""The DALL-E objective (Ramesh et al. 2021, §2.2): next-token cross-entropy over [text; image].

Shapes: B batch, T text positions, N image tokens, V text vocabulary, K codebook entries.

loss = text_loss_weight * CE(text) + image_loss_weight * CE(image), 1/8 and 7/8 in the paper ("we
are primarily interested in image modeling"); the weights come from model.dalle. Text CE counts the
real caption tokens (padding positions predict nothing), image CE every image token.
Metrics: `dalle_text_ce`, `dalle_image_ce` (unweighted), `dalle_image_acc` (top-1 of the next
image token), `dalle_image_bits` (image CE in bits per token: log2 K = guessing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

from models.config import ModelConfig
from models.objectives.base import Objective, ObjectiveContext, cross_entropy_and_accuracy, require


class DalleLoss(Objective):
    name: ClassVar[str] = "dalle"
    view: ClassVar[str] = "clean"
    requires: ClassVar[frozenset[str]] = frozenset({"text_logits", "text_labels", "image_logits", "image_codes"})

    def __init__(self, ctx: ObjectiveContext, text_weight: float = 1 / 8, image_weight: float = 7 / 8) -> None:
        super().__init__(ctx)
        self.text_weight, self.image_weight = text_weight, image_weight

    @classmethod
    def from_config(cls, ctx: ObjectiveContext, model: ModelConfig) -> DalleLoss:
        """The factory's hook for objectives configured by the model section (model.dalle)."""
        return cls(ctx, model.dalle.text_loss_weight, model.dalle.image_loss_weight)

    def forward(
        self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        text_BTV, labels_BT = require(outputs, "text_logits"), require(outputs, "text_labels")
        image_BNK, codes_BN = require(outputs, "image_logits"), require(outputs, "image_codes")
        text_ce, text_acc = cross_entropy_and_accuracy(text_BTV.flatten(0, 1), labels_BT.flatten())
        image_ce, image_acc = cross_entropy_and_accuracy(image_BNK.flatten(0, 1), codes_BN.flatten())
        loss = self.text_weight * text_ce + self.image_weight * image_ce
        return ({"dalle": loss},
                {"dalle_text_ce": text_ce.detach(), "dalle_image_ce": image_ce.detach(), "dalle_text_acc": text_acc,
                 "dalle_image_acc": image_acc, "dalle_image_bits": image_ce.detach() / math.log(2)})
