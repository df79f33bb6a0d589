"""Input embeddings of the two modalities: BERT-style text tokens and ViLT-style image patches.

Shapes: B batch, T text tokens, C image channels, H/W image height/width, P patches, D model dim.

Both add a learned modality-type vector so a single-stream encoder can tell the modalities apart
(ViLT, Kim et al. 2021, eq. 1-3). There is no image [CLS] token: the text [CLS] at position 0 is the
pooled token, as in ViLT's pooler.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.config import ImageSpec, TextSpec


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


class PatchEmbeddings(nn.Module):
    """Conv2d patch projection (kernel = stride = patch) + learned position + modality type (ViT/ViLT).

    ViLT uses the linear patch projection precisely because it is cheap next to region features
    (ViLT §3.1); position embeddings are learned for the fixed `image.size` the pipeline delivers.
    """

    def __init__(self, image: ImageSpec, patch_size: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        if image.size % patch_size != 0:
            raise ValueError(f"image size {image.size} is not divisible by patch_size={patch_size}")
        self.image_size = image.size
        self.num_patches = (image.size // patch_size) ** 2
        self.proj = nn.Conv2d(image.channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.position_PD = nn.Parameter(torch.zeros(self.num_patches, hidden_size))
        self.type_D = nn.Parameter(torch.zeros(hidden_size))
        self.dropout = nn.Dropout(dropout)

    def forward(self, image_BCHW: Tensor) -> Tensor:
        H, W = image_BCHW.shape[-2:]
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(
                f"image is {H}x{W}, the model's position embeddings are for {self.image_size}x{self.image_size}"
            )
        x_BDhw = self.proj(image_BCHW)
        x_BPD = x_BDhw.flatten(2).transpose(1, 2)
        return self.dropout(x_BPD + self.position_PD + self.type_D)
