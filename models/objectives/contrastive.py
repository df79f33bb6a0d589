"""Image-text contrastive learning: CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3).

Shapes: B batch, E joint embedding dim.

The B matched pairs of the (clean) batch are the positives. Negatives: when torch.distributed is
initialised (Ray Train workers), every rank's embeddings are all-gathered with
`torch.distributed.nn.functional.all_gather`, whose backward sends each rank the gradient of its own
slice (open_clip's `gather_with_grad`), so rank r scores its B images against all W*B captions and
its B captions against all W*B images, with targets r*B + i; the loss per rank is its local mean
(open_clip's "local loss"), and DDP/ZeRO's gradient averaging makes the total the global mean.
Single process: in-batch negatives only.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from models.config import TextSpec
from models.objectives.base import Objective, encoder_inputs, require


def gather_with_grad(x_BE: Tensor) -> tuple[Tensor, int]:
    """(all ranks' rows [W*B, E] with gradients flowing back to each rank's slice, this rank's index)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x_BE, 0
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the autograd-aware gather
        warnings.simplefilter("ignore", FutureWarning)
        gathered = all_gather(x_BE.contiguous())
    return torch.cat(gathered, dim=0), dist.get_rank()


def clip_loss(image_BE: Tensor, text_BE: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
    """(symmetric InfoNCE, image-to-text top-1) of L2-normalised embeddings, negatives from all ranks."""
    all_image_NE, rank = gather_with_grad(image_BE)
    all_text_NE, _ = gather_with_grad(text_BE)
    B = image_BE.shape[0]
    target_B = torch.arange(B, device=image_BE.device) + rank * B
    logits_i2t_BN = logit_scale * image_BE @ all_text_NE.T
    logits_t2i_BN = logit_scale * text_BE @ all_image_NE.T
    loss = (F.cross_entropy(logits_i2t_BN, target_B) + F.cross_entropy(logits_t2i_BN, target_B)) / 2
    acc = (logits_i2t_BN.argmax(dim=1) == target_B).float().mean()
    return loss, acc.detach()


def clean_view(batch: Mapping[str, Tensor], text: TextSpec, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The batch as it is: matched pairs, nothing masked."""
    return encoder_inputs(batch)


class ImageTextContrastive(Objective):
    """loss = (CE(s * I T^T, arange) + CE(s * T I^T, arange)) / 2 on L2-normalised embeddings, s the
    encoder's learnable `logit_scale`. Metric `itc_acc`: image-to-text top-1 within the batch."""

    name: ClassVar[str] = "itc"
    view: ClassVar[str] = "clean"
    requires: ClassVar[frozenset[str]] = frozenset({"text_embed", "image_embed", "logit_scale"})

    def forward(
        self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        image_BE = require(outputs, "image_embed").float()
        text_BE = require(outputs, "text_embed").float()
        loss, acc = clip_loss(image_BE, text_BE, require(outputs, "logit_scale").float())
        return {"itc": loss}, {"itc_acc": acc}
