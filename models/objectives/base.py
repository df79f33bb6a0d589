"""What every pretraining objective is: a head that turns encoder outputs into named losses.

Shapes: B batch, N selected items (e.g. masked tokens), C classes.

An objective declares the input `view` it consumes (how the batch is turned into encoder inputs and
labels, e.g. masked text, mismatched pairs) and which encoder outputs it `requires`; the pretrainer
runs the encoder once per distinct view and checks `requires` when it is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import TextSpec

IGNORE_INDEX = -100  # label of positions that carry no loss (PyTorch's cross_entropy default)

# The encoder inputs every view produces; views add their labels next to these.
ENCODER_INPUTS = ("image", "input_ids", "attention_mask")
# Per-image batch columns a visual input may read besides the pixels (scene boxes and classes,
# precomputed region features; jobs/data/batch.py). Views carry the ones present, and a view that
# pairs a caption with another sample's image moves all of them with the image.
IMAGE_COLUMNS = ("image", "obj_boxes", "obj_labels", "region_feats", "region_boxes", "region_labels")
# Optional batch key, set on the host by jobs.data.batch.to_model_batch: bool [] on the CPU, True when
# no text position of the batch is padding. A view that recombines the batch's own captions keeps it
# (still no padding); the encoders then drop the attention mask (FlashAttention-eligible) without
# reading the device mask back (models/encoders/layers.py). Absent = unknown: masks are used.
TEXT_FULL = "text_full"
# Optional view keys the pretrainer passes to the encoder as options, not as inputs:
VISUAL_MASK = "visual_mask"  # bool [B, P]: visual tokens whose input features are zeroed (masked region modelling)
CAUSAL_TEXT = "causal_text"  # present (any value) = text attends causally (captioning / seq2seq LM)
# Batch key the pretrainer adds for views that draw a visual mask: long [] = P, the encoder's visual
# tokens for this batch before any sampling (a view cannot know it from the batch alone).
NUM_VISUAL_TOKENS = "num_visual_tokens"
# Output key the pretrainer adds for a view with a visual mask: [B,P,F] the visual input features
# computed WITHOUT the mask (detached), the MRFR target (`image_feats` has the masked ones zeroed).
CLEAN_FEATS = "image_feats_clean"


@dataclass(frozen=True, eq=False)
class ObjectiveContext:
    """What an objective head may need from the model it is attached to."""

    hidden_size: int
    text: TextSpec
    word_embeddings: nn.Embedding  # for heads tied to the input embeddings (BERT's MLM decoder)
    object_classes: int = 4  # model.object_classes: MRC/MOC output size
    visual_feature_size: int = 0  # F of the visual input (MRFR regression target size); 0 = no visual input


class View(Protocol):
    """batch (documented keys) -> encoder inputs (`ENCODER_INPUTS`) + this view's labels."""

    def __call__(
        self, batch: Mapping[str, Tensor], text: TextSpec, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]: ...


class Objective(nn.Module):
    """forward(outputs, view_batch) -> (named losses, named metrics); losses unweighted, scalar.

    An objective that needs more from the tokenizer than the special ids (word-piece structure,
    scene-graph words) says so in `text_problems`: building it on a TextSpec without them is an
    error, and the driver checks the run's tokenizer with it before any worker starts.
    """

    name: ClassVar[str]
    view: ClassVar[str]
    requires: ClassVar[frozenset[str]]

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__()
        problems = self.text_problems(ctx.text) if ctx is not None else []
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def text_problems(cls, text: TextSpec) -> list[str]:
        """What this objective needs from the tokenizer that `text` lacks, one sentence each; [] = fits."""
        return []

    def forward(
        self, outputs: Mapping[str, Tensor | None], view_batch: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        raise NotImplementedError


def encoder_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's inputs out of a batch (and the image columns it has), dropping other keys."""
    return {key: batch[key] for key in (*ENCODER_INPUTS, *IMAGE_COLUMNS, TEXT_FULL) if key in batch}


def require(outputs: Mapping[str, Tensor | None], key: str) -> Tensor:
    value = outputs.get(key)
    if value is None:
        raise KeyError(f"encoder output {key!r} is missing")
    return value


def cross_entropy_and_accuracy(logits_NC: Tensor, labels_N: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy over the labels that are not `IGNORE_INDEX`.

    Computed in fp32 (bf16 log-softmax over a large vocabulary loses precision). With no labelled
    item the loss is an exact 0 that is still connected to the graph, so a batch without a masked
    token neither yields NaN nor leaves the head's parameters without a gradient.
    """
    valid_N = labels_N != IGNORE_INDEX
    count = valid_N.sum().clamp(min=1)
    loss = F.cross_entropy(logits_NC.float(), labels_N, ignore_index=IGNORE_INDEX, reduction="sum") / count
    correct = ((logits_NC.argmax(-1) == labels_N) & valid_N).sum()
    return loss, (correct.float() / count).detach()
