"""Captioning: next-token language modelling of the caption conditioned on the image.

Shapes: B batch, T text tokens, D model dim, V vocabulary, N predicted tokens in the batch.

The seq2seq objective of UNIMO (Li et al. 2021, §3.2; UniLM's mask, Dong et al. 2019): the encoder
runs with `causal_text`, so caption token t sees tokens <= t and the whole image, and the image never
sees the caption; the state at t predicts token t+1 ([CLS] predicts the first word, the last word
predicts [SEP]). The decoder is BERT's LM head tied to the word embeddings, like MLM's, with its
own transform.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from models.config import TextSpec
from models.objectives.base import CAUSAL_TEXT, IGNORE_INDEX, encoder_inputs
from models.objectives.masked import TokenPrediction


def caption_view(batch: Mapping[str, Tensor], text: TextSpec, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Clean matched pairs, text causal; adds `caption_labels` [B, T] (next token, IGNORE past the end)."""
    view = encoder_inputs(batch)
    ids_BT, keep_BT = batch["input_ids"], batch["attention_mask"].bool()
    next_BT = torch.full_like(ids_BT, IGNORE_INDEX)
    next_BT[:, :-1] = torch.where(keep_BT[:, 1:], ids_BT[:, 1:], next_BT[:, 1:])
    view["caption_labels"] = next_BT
    view[CAUSAL_TEXT] = torch.ones((), dtype=torch.bool, device=ids_BT.device)
    return view


class Captioning(TokenPrediction):
    name: ClassVar[str] = "caption"
    view: ClassVar[str] = "caption"
    labels_key: ClassVar[str] = "caption_labels"
    # cross_modal: text states must have seen the image; causal_text: the encoder honours the mask.
    requires: ClassVar[frozenset[str]] = frozenset({"text_hidden", "cross_modal", "causal_text"})
