"""Word-region / word-patch alignment by optimal transport: UNITER's WRA and ViLT's WPA.

Shapes: B batch, T text tokens, P visual tokens, D model dim, n words, m visual tokens of a pair.

Recipe (UNITER, Chen et al. 2020, §3.1 "WRA"; ViLT, Kim et al. 2021, §3.2 "WPA", the same code):
on ITM's view (half the images swapped), the cost between word i and visual token j is the cosine
distance 1 - cos(h_i, v_j) of their final states; the transport plan T minimises <C, T> under
uniform marginals (1/n per word, 1/m per token) and is found by IPOT (Xie et al. 2018, Alg. 1:
beta = 0.5, 50 outer iterations, k = 1 Sinkhorn step each), with no gradient through T. The
Wasserstein distance D = <C, T> is pulled down for matched pairs and pushed up for mismatched ones:
loss = (sum_matched D - sum_mismatched D) / B. [CLS], [SEP] and padding are not words; padded
visual tokens are not tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.config import TextSpec
from models.objectives.base import Objective, ObjectiveContext, require

IPOT_BETA = 0.5
IPOT_ITERS = 50


@torch.no_grad()
def ipot(cost_BTP: Tensor, words_BT: Tensor, tokens_BP: Tensor, beta: float = IPOT_BETA,
         iters: int = IPOT_ITERS, k: int = 1) -> Tensor:
    """[B, T, P] IPOT transport plan with uniform marginals over the valid words/tokens (0 elsewhere)."""
    cost = cost_BTP.float()
    w_BT1 = words_BT[..., None].float()
    v_B1P = tokens_BP[:, None, :].float()
    n_B11 = w_BT1.sum(1, keepdim=True).clamp(min=1)
    m_B11 = v_B1P.sum(2, keepdim=True).clamp(min=1)
    valid = w_BT1 * v_B1P
    A = torch.exp(-cost / beta) * valid
    plan = valid.clone()
    sigma_BP1 = v_B1P.transpose(1, 2) / m_B11
    for _ in range(iters):
        Q = A * plan
        for _ in range(k):
            delta_BT1 = w_BT1 / (n_B11 * (Q @ sigma_BP1)).clamp(min=1e-30)
            sigma_BP1 = v_B1P.transpose(1, 2) / (m_B11 * (Q.transpose(1, 2) @ delta_BT1)).clamp(min=1e-30)
        plan = delta_BT1 * Q * sigma_BP1.transpose(1, 2)
    return plan


def ot_distance(text_BTD: Tensor, image_BPD: Tensor, words_BT: Tensor, tokens_BP: Tensor) -> Tensor:
    """[B] Wasserstein distance <C, T> between each caption's words and its image's tokens."""
    cost_BTP = 1 - F.normalize(text_BTD.float(), dim=-1) @ F.normalize(image_BPD.float(), dim=-1).transpose(1, 2)
    plan_BTP = ipot(cost_BTP.detach(), words_BT, tokens_BP)
    return (cost_BTP * plan_BTP).sum(dim=(1, 2))


def _words(view_batch: Mapping[str, Tensor], text: TextSpec) -> Tensor:
    ids_BT = view_batch["input_ids"]
    specials = torch.tensor([text.cls_id, text.sep_id, text.pad_id], device=ids_BT.device)
    return view_batch["attention_mask"].bool() & ~torch.isin(ids_BT, specials)


class _OTAlignment(Objective):
    view: ClassVar[str] = "itm_pairs"
    requires: ClassVar[frozenset[str]] = frozenset({"text_hidden", "image_hidden", "image_mask", "cross_modal"})

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.text = ctx.text

    def forward(
        self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        dist_B = ot_distance(require(outputs, "text_hidden"), require(outputs, "image_hidden"),
                             _words(view_batch, self.text), require(outputs, "image_mask"))
        sign_B = view_batch["itm_labels"].float() * 2 - 1  # +1 matched, -1 mismatched
        loss = (sign_B * dist_B).sum() / dist_B.shape[0]
        matched = view_batch["itm_labels"].bool()
        gap = dist_B[~matched].mean() - dist_B[matched].mean() if matched.any() and (~matched).any() else dist_B.sum() * 0
        return {self.name: loss}, {f"{self.name}_gap": gap.detach()}


class WordRegionAlignment(_OTAlignment):
    """UNITER's WRA (regions as visual tokens)."""

    name: ClassVar[str] = "wra"


class WordPatchAlignment(_OTAlignment):
    """ViLT's WPA (patches as visual tokens): the same OT loss."""

    name: ClassVar[str] = "wpa"
