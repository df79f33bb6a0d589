"""Input embeddings shared by the encoders: BERT-style text tokens, ViLBERT's box encoding, Oscar's tags.

Shapes: B batch, T text tokens, R regions/objects, D model dim, C image channels, p patch side,
P patches, F = C*p*p patch features.

Every modality adds its own learned type vector, so a single-stream encoder can tell the
modalities apart (BERT's segment embeddings; ViLT eq. 1-3). There is no image [CLS] token in the
single-stream encoders: the text [CLS] at position 0 is the pooled token, as in ViLT's pooler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import TextSpec


class TextEmbeddings(nn.Module):
    """word + learned absolute position + modality type, then LayerNorm and dropout (BERT)."""

    def __init__(self, text: TextSpec, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.max_len = text.max_len
        # padding_idx keeps the [PAD] row at zero and out of the gradient, as in BERT.
        self.word = nn.Embedding(text.vocab_size, hidden_size, padding_idx=text.pad_id)
        self.position_D = nn.Parameter(torch.zeros(text.max_len, hidden_size))
        self.type_D = nn.Parameter(torch.zeros(hidden_size))
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids_BT: Tensor) -> Tensor:
        T = input_ids_BT.shape[1]
        if T > self.max_len:
            raise ValueError(f"text has {T} tokens, more than max_len={self.max_len} position embeddings")
        x_BTD = self.word(input_ids_BT) + self.position_D[:T] + self.type_D
        return self.dropout(self.norm(x_BTD))


def patchify(image_BCHW: Tensor, patch: int) -> Tensor:
    """Non-overlapping patches as rows [B, P, C*p*p], row-major over the grid, channel-major inside
    (the layout of a Conv2d(kernel = stride = p) weight, so a Linear on it is ViT's patch projection)."""
    return F.unfold(image_BCHW, kernel_size=patch, stride=patch).transpose(1, 2)


def box5(boxes_BR4: Tensor) -> Tensor:
    """ViLBERT's 5-d region location (Lu et al. 2019, §3.2): normalised x0, y0, x1, y1 and the
    fraction of the image the box covers. Boxes are already normalised to [0, 1]."""
    wh_BR2 = (boxes_BR4[..., 2:] - boxes_BR4[..., :2]).clamp(min=0)
    return torch.cat([boxes_BR4, (wh_BR2[..., 0] * wh_BR2[..., 1])[..., None]], dim=-1)


class TagEmbeddings(nn.Module):
    """Oscar's object tags (Li et al. 2020): one token per detected object class, its own type vector.

    Oscar embeds tag *words* with BERT's word embeddings; the models here do not know which token
    ids spell the class names (the tokenizer lives in jobs/), so tags get a table of their own.
    Labels < 0 are padding: zero vectors, masked out by the encoder.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.tag = nn.Embedding(num_classes, hidden_size)
        self.type_D = nn.Parameter(torch.zeros(hidden_size))
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, labels_BR: Tensor) -> tuple[Tensor, Tensor]:
        """(tags x_BRD, keep_BR)."""
        keep_BR = labels_BR >= 0
        if bool((labels_BR >= self.num_classes).any()):
            raise ValueError(f"object label {int(labels_BR.max())} >= model.object_classes={self.num_classes}; "
                             "raise model.object_classes to the number of label classes")
        x_BRD = self.tag(labels_BR.clamp(min=0)) + self.type_D
        return self.dropout(self.norm(x_BRD)) * keep_BR[..., None], keep_BR
