"""Image-text matching: is this image the one the caption describes? (ViLT, UNITER, LXMERT), with
random negatives (`itm`) or negatives mined from in-batch similarity (`itm_hard`, ALBEF).

Shapes: B batch, T text tokens, C image channels, H/W image size, D model dim, M mismatched pairs,
U distinct token ids in the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
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
from models.objectives.masked import maskable
from models.objectives.sampling import categorical, randint, randperm, uniform

HARD_NEGATIVE_TAU = 0.07  # temperature of the mining softmax: ALBEF's ITC temperature at initialisation


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
    B = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    source_B = torch.arange(B, device=device)
    swapped_M = _swapped(B, device, generator)
    if swapped_M.numel():
        shift_M = randint(1, B, (swapped_M.numel(),), device, generator)
        source_B[swapped_M] = (swapped_M + shift_M) % B
    return _pairs(batch, source_B)


def _swapped(B: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """long [M]: a random half of the samples (an odd B rounds up or down at random); none if B < 2."""
    if B < 2:
        return torch.zeros(0, dtype=torch.long, device=device)
    num_swapped = B // 2 + int(B % 2 == 1 and uniform((1,), device, generator).item() < 0.5)
    return randperm(B, device, generator)[:num_swapped]


def _same_text(ids_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """bool [B, B]: captions i and j are token-identical."""
    return (ids_BT[:, None] == ids_BT[None]).all(-1) & (mask_BT[:, None] == mask_BT[None]).all(-1)


def _pairs(batch: Mapping[str, Tensor], source_B: Tensor) -> dict[str, Tensor]:
    """Caption i with the image of sample source_B[i]; `itm_labels` [B] 1 = matched (the same
    sample, the same image (`image_id`), or a sample whose caption is identical)."""
    view = encoder_inputs(batch)
    ids_BT, mask_BT = batch["input_ids"], batch["attention_mask"]
    for key in IMAGE_COLUMNS:  # the image travels with its boxes, classes and region features
        if key in batch:
            view[key] = batch[key][source_B]
    same_text_B = (ids_BT[source_B] == ids_BT).all(dim=1) & (mask_BT[source_B] == mask_BT).all(dim=1)
    if "image_id" in batch:  # another caption's row showing the same image (COCO: 5 per image) is a match
        same_text_B = same_text_B | (batch["image_id"][source_B] == batch["image_id"])
    view["itm_labels"] = same_text_B.long()
    return view


def caption_similarity(ids_BT: Tensor, mask_BT: Tensor, text: TextSpec) -> Tensor:
    """[B, B] cosine similarity of the captions' bag-of-token count vectors (special tokens and
    padding left out); 0 against a caption with no words."""
    words_BT = maskable(ids_BT, mask_BT, text)
    unique_U, inverse_BT = torch.unique(ids_BT, return_inverse=True)  # count over the batch's U ids, not all V
    counts_BU = torch.zeros(ids_BT.shape[0], unique_U.numel(), device=ids_BT.device)
    counts_BU.scatter_add_(1, inverse_BT, words_BT.float())
    unit_BU = F.normalize(counts_BU, dim=1)
    return unit_BU @ unit_BU.T


def mine_hard_negatives(
    ids_BT: Tensor,
    mask_BT: Tensor,
    text: TextSpec,
    rows_M: Tensor,
    tau: float = HARD_NEGATIVE_TAU,
    generator: torch.Generator | None = None,
) -> Tensor:
    """long [M]: for each sample i in `rows_M`, another sample j != i drawn with probability
    softmax_j(sim(i, j) / tau), sim = `caption_similarity`. Samples whose caption is identical to
    i's are left out (the pair would be labelled matched, so it is no negative), unless no other
    sample is left, when j is uniform over the others. Needs B >= 2."""
    B = ids_BT.shape[0]
    same_BB = _same_text(ids_BT, mask_BT)
    eye_BB = torch.eye(B, dtype=torch.bool, device=ids_BT.device)
    excluded_MB = (same_BB | eye_BB)[rows_M]
    # A row with every other caption identical to its own falls back to "anyone but itself".
    excluded_MB = torch.where(excluded_MB.all(1, keepdim=True), eye_BB[rows_M], excluded_MB)
    logits_MB = caption_similarity(ids_BT, mask_BT, text)[rows_M] / tau
    return categorical(logits_MB.masked_fill(excluded_MB, float("-inf")), generator)


def itm_hard_pairs_view(
    batch: Mapping[str, Tensor], text: TextSpec, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Like `itm_pairs_view` (a random half of the samples swapped, identical captions labelled
    matched; adds `itm_labels` [B]), but a swapped sample's image is a hard negative: that of a
    sample whose caption is similar (`mine_hard_negatives`).

    ALBEF (Li et al. 2021, §3.2) draws each in-batch negative with probability softmax of its ITC
    similarity rather than taking the most similar one, which is often a false negative (an image
    the caption also describes). It mines with its contrastive head's image-text similarity; the
    view is drawn before the encoder runs, and most encoders here have no contrastive head
    (co-attention, cross, and single-stream ones without `itc`), so the similarity of the two
    captions stands in: the cosine of their bag-of-token vectors, so captions
    describing similar scenes ("a small red circle" / "a large red circle") make each other's hard
    negatives. The temperature is ALBEF's initial ITC temperature, 0.07.
    """
    B = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    source_B = torch.arange(B, device=device)
    swapped_M = _swapped(B, device, generator)
    if swapped_M.numel():
        source_B[swapped_M] = mine_hard_negatives(batch["input_ids"], batch["attention_mask"], text, swapped_M,
                                                  generator=generator)
    return _pairs(batch, source_B)


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
        return {self.name: loss}, {f"{self.name}_acc": acc}  # itm_hard reports under its own name


class ImageTextMatchingHard(ImageTextMatching):
    """ITM on hard negatives (`itm_hard_pairs_view`, ALBEF §3.2): the same classifier, Linear(D, 2)
    on the pooled [CLS], under its own name so it can run next to `itm` (each with its own head)."""

    name: ClassVar[str] = "itm_hard"
    view: ClassVar[str] = "itm_hard_pairs"
