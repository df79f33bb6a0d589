"""Image-text retrieval fine-tuning: CLIP's symmetric InfoNCE on the encoder's ITC embeddings.

Shapes: B batch, E joint embedding dim.

Fine-tuning for retrieval continues the contrastive objective on the labelled pairs (ALBEF and
CLIP fine-tune retrieval so; the ITM re-ranking of ALBEF/ViLT is left out). The head adds no
weights: the encoder's projections and temperature are what is tuned. Captions that are token-
identical count as positives of each other (the shapes world repeats captions), as in jobs/evaluate.py.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from models.encoders.base import CONTRASTIVE


class RetrievalHead(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not CONTRASTIVE <= getattr(encoder, "provides", frozenset()):
            raise ValueError("retrieval fine-tuning needs an encoder with an ITC head (text_embed/image_embed): "
                             "pretrain with the itc objective (clip, or a single-stream preset with itc)")
        self.want = CONTRASTIVE

    def forward(self, outputs: dict[str, Tensor | None], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        t_BE, i_BE, scale = outputs["text_embed"], outputs["image_embed"], outputs["logit_scale"]
        assert t_BE is not None and i_BE is not None and scale is not None
        logits_BB = scale * i_BE.float() @ t_BE.float().T  # row: an image against every caption
        ids = batch["input_ids"]
        same_BB = (ids[:, None, :] == ids[None, :, :]).all(-1).float()
        target_BB = same_BB / same_BB.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits_BB, target_BB) + F.cross_entropy(logits_BB.T, target_BB.T)) / 2
        hit = same_BB.gather(1, logits_BB.argmax(1, keepdim=True)).mean()
        return loss, {"acc": hit.detach()}, logits_BB


def recall_at_1(image_NE: Tensor, text_NE: Tensor, ids_NT: Tensor) -> tuple[Tensor, Tensor]:
    """(i2t, t2i) R@1 counts over the whole set; an identical caption is as right as the true one."""
    same_NN = (ids_NT[:, None, :] == ids_NT[None, :, :]).all(-1)
    scores_NN = image_NE.float() @ text_NE.float().T
    i2t = same_NN.gather(1, scores_NN.argmax(1, keepdim=True)).sum()
    t2i = same_NN.T.gather(1, scores_NN.T.argmax(1, keepdim=True)).sum()
    return i2t, t2i


__all__ = ["RetrievalHead", "recall_at_1"]
