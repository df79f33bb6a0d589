"""Image-text matching: is this image the one the caption describes? (ViLT, UNITER, LXMERT)

Shapes: B batch, T text tokens, C image channels, H/W image size, D model dim, M mismatched pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from models.config import TextSpec
from models.objectives.base import (
    IMAGE_COLUMNS,
    Objective,
    ObjectiveContext,
    cross_entropy_and_accuracy,
    encoder_inputs,
    require,
)
from models.objectives.sampling import randint, randperm, uniform


def itm_pairs_view(
    batch: Mapping[str, Tensor], text: TextSpec, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Half the pairs get another sample's image; adds `itm_labels` [B] (1 = matched).

    A random half of the samples (an odd batch rounds up or down at random, so 50 % on average)
    takes the image of sample (i + s) % B, s uniform in [1, B-1], so never its own. Text stays
    unmasked (ViLT computes ITM on clean text). A swapped-in image whose own caption is identical
    to this caption is labelled matched: synthetic captions repeat, and calling such a pair a
    mismatch would train the model on label noise.
    """
    view = encoder_inputs(batch)
    ids_BT, mask_BT = batch["input_ids"], batch["attention_mask"]
    B = ids_BT.shape[0]
    device = ids_BT.device
    source_B = torch.arange(B, device=device)
    if B > 1:
        num_swapped = B // 2 + int(B % 2 == 1 and uniform((1,), device, generator).item() < 0.5)
        swapped_M = randperm(B, device, generator)[:num_swapped]
        shift_M = randint(1, B, (num_swapped,), device, generator)
        source_B[swapped_M] = (swapped_M + shift_M) % B
    for key in IMAGE_COLUMNS:  # the image travels with its boxes, classes and region features
        if key in batch:
            view[key] = batch[key][source_B]
    same_text_B = (ids_BT[source_B] == ids_BT).all(dim=1) & (mask_BT[source_B] == mask_BT).all(dim=1)
    view["itm_labels"] = same_text_B.long()
    return view


class ImageTextMatching(Objective):
    """Binary classifier Linear(D, 2) on the pooled [CLS] (ViLT §3.2)."""

    name: ClassVar[str] = "itm"
    view: ClassVar[str] = "itm_pairs"
    requires: ClassVar[frozenset[str]] = frozenset({"pooled"})

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.head = nn.Linear(ctx.hidden_size, 2)

    def logits(self, outputs: Mapping[str, Tensor | None]) -> Tensor:
        """[B, 2] logits; class 1 = matched."""
        return self.head(require(outputs, "pooled"))

    def forward(
        self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        loss, acc = cross_entropy_and_accuracy(self.logits(outputs), view_batch["itm_labels"])
        return {"itm": loss}, {"itm_acc": acc}
