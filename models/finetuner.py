"""A fine-tuning model: an encoder (pretrained or fresh) + one task head, with the pretrainer's contract.

Shapes: B batch; none else (the heads name theirs).

forward(batch) -> {"loss", "losses", "metrics", "moe_counts"}, as models/pretrainer.py: the same
Trainer (jobs/trainer.py), DeepSpeed engine and checkpoints serve pretraining and fine-tuning.
`scores(batch)` gives the head's logits (classification) in eval mode.

`frozen` trains the head alone: the encoder runs without gradients and stays in eval mode (no
dropout), which is what a linear probe measures: the features as pretraining left them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from models.config import ImageSpec, ModelConfig, MoEConfig, TextSpec
from models.heads import HEADS
from models.heads.features import pair_features_dim
from models.pretrainer import MOE_AUX


class Finetuner(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module, task: str, frozen: bool) -> None:
        super().__init__()
        self.encoder, self.head, self.task, self.frozen = encoder, head, task, frozen
        if frozen:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> Finetuner:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def encode(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        with torch.no_grad() if self.frozen else torch.enable_grad():
            return self.encoder(batch, want=self.head.want)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        outputs = self.encode(batch)
        loss, metrics, _ = self.head(outputs, batch)
        losses = {self.task: loss.detach()}
        aux = outputs.get("moe_aux")
        if aux is not None and not self.frozen and getattr(self.encoder, "num_moe_layers", 0):
            loss = loss + aux
            losses[MOE_AUX] = aux.detach()
        return {"loss": loss, "losses": losses, "metrics": {f"{self.task}_{k}": v for k, v in metrics.items()},
                "moe_counts": outputs.get("moe_counts")}

    @torch.no_grad()
    def scores(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.head(self.encoder(batch, want=self.head.want), batch)[2]


def build_finetuner(model: ModelConfig, moe: MoEConfig, objectives: Mapping[str, float], text: TextSpec,
                    image: ImageSpec, *, head: str, task: str, classes: int = 0, frozen: bool = False) -> Finetuner:
    """The encoder of `model` as the pretraining run built it (the same objectives decide which parts
    exist, so a pretrained state dict fits), freshly initialised, with head `head` on top."""
    from models.blocks import resolve
    from models.factory import build_pretrainer
    from models.weights import init_weights

    encoder = build_pretrainer(model, moe, objectives, text, image).encoder
    E = resolve(model).embed_dim
    if head == "probe":
        from models.heads.features import IMAGE_EMBED, image_want

        size = E if image_want(encoder) == IMAGE_EMBED else model.hidden_size
        module: nn.Module = HEADS["probe"](encoder, size, classes)
    elif head == "vqa":
        module = HEADS["vqa"](encoder, pair_features_dim(encoder, model.hidden_size, E), classes, model.hidden_size)
    else:
        module = HEADS[head](encoder)
    init_weights(module)
    return Finetuner(encoder, module, task, frozen)
