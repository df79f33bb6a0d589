"""VQA as answer classification over a fixed answer set (VQA v2's framing, Goyal et al. 2017).

Shapes: B batch, F pair-feature size, A answers.

The classifier is ViLT's and UNITER's: Linear(F, 2D) -> GELU -> LayerNorm -> Linear(2D, A) on the
pair representation (models/heads/features.py). Every generated question has exactly one right
answer, so the loss is softmax cross-entropy (VQA v2's soft scores over 10 annotators do not arise).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from models.heads.features import pair_features, pair_mode, pair_want


class VQAHead(nn.Module):
    def __init__(self, encoder: nn.Module, feature_size: int, answers: int, hidden_size: int) -> None:
        super().__init__()
        self.mode = pair_mode(encoder)
        self.want = pair_want(encoder)
        self.classifier = nn.Sequential(nn.Linear(feature_size, 2 * hidden_size), nn.GELU(),
                                        nn.LayerNorm(2 * hidden_size), nn.Linear(2 * hidden_size, answers))

    def forward(self, outputs: dict[str, Tensor | None], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        logits_BA = self.classifier(pair_features(outputs, self.mode).float())
        labels_B = batch["label"]
        loss = F.cross_entropy(logits_BA, labels_B)
        acc = (logits_BA.argmax(-1) == labels_B).float().mean()
        return loss, {"acc": acc.detach()}, logits_BA
