"""Linear probe: one linear layer on frozen image features (CLIP §3.2, "linear-probe evaluation").

Shapes: B batch, F feature size, C classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from models.heads.features import image_features, image_want


class ProbeHead(nn.Module):
    def __init__(self, encoder: nn.Module, feature_size: int, classes: int) -> None:
        super().__init__()
        self.want = image_want(encoder)
        self.linear = nn.Linear(feature_size, classes)

    def forward(self, outputs: dict[str, Tensor | None], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        logits_BC = self.linear(image_features(outputs).float())
        labels_B = batch["label"]
        loss = F.cross_entropy(logits_BC, labels_B)
        acc = (logits_BC.argmax(-1) == labels_B).float().mean()
        return loss, {"acc": acc.detach()}, logits_BC
